"""Anti-collapse options of `IJepaForPreTraining`: VICReg variance / covariance, SIGReg, DynTanh targets.

Every option is off by default, and the loss is then the official one bit for bit.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import TrainerCallback

from modeling_ijepa import IJepaConfig, IJepaForPreTraining
from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor, load_digits_dataset
from modeling_ijepa.masking import mask_sampler_from_config
from modeling_ijepa.regularizers import sigreg_loss, vicreg_covariance_loss, vicreg_variance_loss
from modeling_ijepa.trainer import IJepaTrainer, IJepaTrainingArguments


BATCH_SIZE = 4


def batch_for(config, batch_size=BATCH_SIZE, seed=0):
    """Images and masks drawn by the configuration's own mask sampler."""
    examples = [{"pixel_values": torch.randn(3, 48, 48)} for _ in range(batch_size)]
    return mask_sampler_from_config(config, seed=seed)(examples)


def official_loss(model, batch):
    """The I-JEPA loss restated from the model's parts: smooth-L1 to layer-normed target features."""
    images, context_indices, target_indices = batch["pixel_values"], batch["context_indices"], batch["target_indices"]
    with torch.no_grad():
        features = model.target_encoder(images).last_hidden_state
        features = F.layer_norm(features, (features.size(-1),))
        targets = torch.stack([features[b][target_indices[b]] for b in range(images.size(0))])
    context = model.encoder(images, context_indices=context_indices).last_hidden_state
    predictions = model.predictor(context, context_indices, target_indices)
    return F.smooth_l1_loss(predictions.float(), targets.float())


# ---------------------------------------------------------------------------------------------------------------------
# Defaults


def test_every_option_is_off_by_default():
    config = IJepaConfig()
    assert (config.vicreg_variance_weight, config.vicreg_covariance_weight, config.sigreg_weight) == (0.0, 0.0, 0.0)
    assert config.target_normalization == "layer_norm" and not config.uses_regularizers


def test_with_every_option_off_the_loss_is_the_official_one_bit_for_bit():
    config = tiny_config()
    model = IJepaForPreTraining(config)
    batch = batch_for(config)
    outputs = model(**batch)
    assert torch.equal(outputs.loss, official_loss(model, batch))
    for name in ("loss_terms", "context_mask"):
        assert getattr(outputs, name) is None, name
    assert len(model(**batch, return_dict=False)) == 5  # the tuple output keeps its official entries only


# ---------------------------------------------------------------------------------------------------------------------
# The regularisers as functions


def test_vicreg_variance_is_zero_above_unit_std_and_one_for_constant_features():
    torch.manual_seed(0)
    spread = torch.randn(512, 8) * 3.0
    assert vicreg_variance_loss(spread) == 0.0
    constant = torch.ones(16, 8)
    assert float(vicreg_variance_loss(constant)) == pytest.approx(1.0 - math.sqrt(1e-4))
    half = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # dim 0: std sqrt(2) -> 0; dim 1: constant -> 1 - 0.01
    assert float(vicreg_variance_loss(half)) == pytest.approx((1.0 - 0.01) / 2)


def test_vicreg_covariance_is_zero_for_decorrelated_features_and_counts_off_diagonal_terms():
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # zero-mean, uncorrelated columns
    assert float(vicreg_covariance_loss(signs)) == pytest.approx(0.0, abs=1e-7)
    column = torch.tensor([1.0, -1.0, 2.0, -2.0])
    identical = torch.stack([column, column], dim=1)  # covariance 10/3 off the diagonal, twice, divided by dim 2
    assert float(vicreg_covariance_loss(identical)) == pytest.approx(2 * (10.0 / 3.0) ** 2 / 2)


def test_sigreg_of_a_point_mass_is_the_epps_pulley_integral():
    """All samples at 0: every projection is 0 whatever the directions, |1 - exp(-t^2/2)|^2 is left to integrate."""
    num_samples = 32
    t = np.linspace(-3.0, 3.0, 20001)
    integrand = (1.0 - np.exp(-(t**2) / 2)) ** 2 * np.exp(-(t**2) / 2)
    expected = num_samples * float(np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(t)))
    statistic = float(sigreg_loss(torch.zeros(num_samples, 6), num_projections=8))
    assert statistic == pytest.approx(expected, rel=2e-2)


def test_sigreg_of_gaussian_features_is_its_null_mean_and_collapse_is_far_above():
    """For N(0, 1) samples, E|mean exp(itx) - exp(-t^2/2)|^2 = (1 - exp(-t^2)) / N: the statistic's mean is the
    integral of (1 - exp(-t^2)) exp(-t^2/2), about 1.05, whatever N. (Width 1: every projection is the sample itself,
    so independent samples give independent draws of the statistic.)"""
    torch.manual_seed(0)
    t = np.linspace(-3.0, 3.0, 20001)
    integrand = (1.0 - np.exp(-(t**2))) * np.exp(-(t**2) / 2)
    null_mean = float(np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(t)))
    gaussian = np.mean([float(sigreg_loss(torch.randn(128, 1), num_projections=1)) for _ in range(200)])
    assert gaussian == pytest.approx(null_mean, rel=0.12)  # seeds 0-7 all give 0.95-1.06
    collapsed = float(sigreg_loss(torch.randn(1024, 1).expand(-1, 16) * 0.1, num_projections=64))
    shifted = float(sigreg_loss(torch.randn(1024, 16) + 1.0, num_projections=64))
    assert min(collapsed, shifted) > 20 * null_mean


def test_regularisers_need_two_samples():
    with pytest.raises(ValueError, match="at least 2 images"):
        vicreg_variance_loss(torch.randn(1, 8))


# ---------------------------------------------------------------------------------------------------------------------
# The regularisers in the model


def test_loss_adds_the_weighted_regularisers_and_exposes_each_term():
    config = tiny_config(vicreg_variance_weight=0.5, vicreg_covariance_weight=0.04, sigreg_weight=0.1)
    model = IJepaForPreTraining(config)
    batch = batch_for(config)
    outputs = model(**batch)
    assert torch.equal(outputs.loss_terms["prediction_loss"], official_loss(model, batch))
    expected = (
        outputs.loss_terms["prediction_loss"]
        + 0.5 * outputs.loss_terms["vicreg_variance_loss"]
        + 0.04 * outputs.loss_terms["vicreg_covariance_loss"]
        + 0.1 * outputs.loss_terms["sigreg_loss"]
    )
    torch.testing.assert_close(outputs.loss, expected)
    pooled = outputs.context_hidden_state.mean(dim=1)  # default: one pooled context feature per image
    torch.testing.assert_close(outputs.loss_terms["vicreg_variance_loss"], vicreg_variance_loss(pooled))
    torch.testing.assert_close(outputs.loss_terms["vicreg_covariance_loss"], vicreg_covariance_loss(pooled))


@pytest.mark.parametrize(
    ("features", "select"),
    [
        ("predictions", lambda outputs: outputs.predictions.flatten(0, 2)),
        ("context", lambda outputs: outputs.context_hidden_state.flatten(0, 1)),
        ("pooled_context", lambda outputs: outputs.context_hidden_state.mean(dim=1)),
    ],
)
def test_regularized_features_choose_what_the_regularisers_see(features, select):
    config = tiny_config(vicreg_variance_weight=1.0, regularized_features=features)
    outputs = IJepaForPreTraining(config)(**batch_for(config))
    torch.testing.assert_close(outputs.loss_terms["vicreg_variance_loss"], vicreg_variance_loss(select(outputs)))


def test_regularisers_send_gradients_to_the_encoder_and_never_the_target_encoder():
    config = tiny_config(sigreg_weight=1.0)
    model = IJepaForPreTraining(config)
    model(**batch_for(config)).loss_terms["sigreg_loss"].backward()
    assert model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.target_encoder.parameters())


def test_dyn_tanh_targets_are_bounded_tanh_of_the_target_features():
    config = tiny_config(target_normalization="dyn_tanh", dyn_tanh_alpha=0.7)
    model = IJepaForPreTraining(config)
    batch = batch_for(config)
    outputs = model(**batch)
    with torch.no_grad():
        features = torch.tanh(0.7 * model.target_encoder(batch["pixel_values"]).last_hidden_state)
    expected = torch.stack([features[b][batch["target_indices"][b]] for b in range(BATCH_SIZE)])
    torch.testing.assert_close(outputs.targets, expected)
    assert outputs.targets.abs().max() < 1.0
    torch.testing.assert_close(outputs.loss, F.smooth_l1_loss(outputs.predictions, expected))


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(vicreg_variance_weight=-1.0), "vicreg_variance_weight=-1.0 must be a finite number >= 0"),
        (dict(vicreg_covariance_weight=float("inf")), "vicreg_covariance_weight=inf must be a finite number"),
        (dict(sigreg_weight=-0.1), "sigreg_weight=-0.1"),
        (dict(sigreg_num_projections=0), "sigreg_num_projections=0 must be a positive integer"),
        (dict(regularized_features="tokens"), "regularized_features='tokens' is not one of"),
        (dict(target_normalization="batch_norm"), "'layer_norm' is the official one"),
        (dict(dyn_tanh_alpha=0.0), "dyn_tanh_alpha=0.0 must be a finite number > 0"),
    ],
)
def test_invalid_anti_collapse_options_raise_naming_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_anti_collapse_options_survive_a_save_and_load(tmp_path):
    config = tiny_config(
        vicreg_variance_weight=0.1,
        vicreg_covariance_weight=0.004,
        sigreg_weight=0.05,
        sigreg_num_projections=32,
        regularized_features="context",
        target_normalization="dyn_tanh",
        dyn_tanh_alpha=0.3,
    )
    config.save_pretrained(tmp_path)
    restored = IJepaConfig.from_pretrained(tmp_path)
    for name in (
        "vicreg_variance_weight",
        "vicreg_covariance_weight",
        "sigreg_weight",
        "sigreg_num_projections",
        "regularized_features",
        "target_normalization",
        "dyn_tanh_alpha",
    ):
        assert getattr(restored, name) == getattr(config, name), name


# ---------------------------------------------------------------------------------------------------------------------
# Trainer


class _Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated kill")


def test_trainer_logs_the_loss_terms_and_resumes_exactly_with_regularisers_and_full_contexts(tmp_path):
    """SIGReg draws its directions from torch's global generator, which the Trainer's checkpoints restore."""
    config = tiny_config(
        vicreg_variance_weight=0.1, sigreg_weight=0.05, sigreg_num_projections=16, context_truncation="none"
    )

    def trainer(output_dir, callbacks=()):
        torch.manual_seed(0)
        args = IJepaTrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=8,
            max_steps=4,
            warmup_steps=1,
            logging_steps=1,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_drop_last=True,
            seed=0,
        )
        collator = IJepaPretrainingCollator(mask_sampler_from_config(config), default_image_processor(48))
        dataset = load_digits_dataset(48)["train"].select(range(32))
        return IJepaTrainer(
            IJepaForPreTraining(config), args, train_dataset=dataset, data_collator=collator, callbacks=list(callbacks)
        )

    straight = trainer(tmp_path / "straight")
    straight.train()
    logged = [entry for entry in straight.state.log_history if "loss" in entry][-1]
    assert {"prediction_loss", "vicreg_variance_loss", "sigreg_loss"} <= set(logged)
    assert "vicreg_covariance_loss" not in logged and logged["sigreg_loss"] > 0
    assert logged["context_tokens"] > 10  # real tokens per image, padding not counted
    killed = trainer(tmp_path / "killed", callbacks=[_Kill()])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = trainer(tmp_path / "killed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-2"))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
