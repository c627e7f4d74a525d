"""Specification of the I-JEPA encoder, predictor and pre-training model (tiny configurations, CPU)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from modeling_ijepa import IJepaForPreTraining, IJepaModel, gather_tokens, get_2d_sincos_pos_embed
from modeling_ijepa.modeling_ijepa import IJepaSelfAttention


BATCH_SIZE = 2


def pixels(config, batch_size=BATCH_SIZE, size=None):
    size = size or config.image_size
    return torch.randn(batch_size, config.num_channels, size, size)


def random_masks(config, batch_size=BATCH_SIZE, num_context=40, num_blocks=3, num_target=6):
    """Disjoint context and target patch indices per sample, shaped like the mask collator's output."""
    context, targets = [], []
    for _ in range(batch_size):
        order = torch.randperm(config.num_patches)
        context.append(order[:num_context].sort().values)
        targets.append(order[num_context : num_context + num_blocks * num_target].view(num_blocks, num_target))
    return torch.stack(context), torch.stack(targets)


def official_2d_sincos_pos_embed(embed_dim, rows, columns):
    """Independent restatement of facebookresearch/ijepa `get_2d_sincos_pos_embed` (generalised to rectangles)."""

    def one_dimension(dim, positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(columns, dtype=float), np.arange(rows, dtype=float)), axis=0)
    # The official code names the first half "emb_h" but, meshgrid(w, h) being xy-indexed, it encodes the column.
    return np.concatenate([one_dimension(embed_dim // 2, grid[0]), one_dimension(embed_dim // 2, grid[1])], axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder


def test_encoder_output_shapes(config):
    outputs = IJepaModel(config).eval()(pixels(config))
    assert outputs.last_hidden_state.shape == (BATCH_SIZE, config.num_patches, config.hidden_size)
    assert outputs.pooler_output.shape == (BATCH_SIZE, config.hidden_size)


def test_pooler_output_is_the_mean_of_the_tokens(config):
    outputs = IJepaModel(config).eval()(pixels(config))
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(dim=1))


def test_context_indices_keep_only_the_context_tokens(config):
    model = IJepaModel(config).eval()
    context_indices, _ = random_masks(config, num_context=30)
    outputs = model(pixels(config), context_indices=context_indices)
    assert outputs.last_hidden_state.shape == (BATCH_SIZE, 30, config.hidden_size)


def test_context_indices_equal_running_the_layers_on_the_gathered_embeddings(config):
    model = IJepaModel(config).eval()
    images = pixels(config)
    context_indices, _ = random_masks(config, num_context=30)
    with torch.no_grad():
        hidden_states = gather_tokens(model.embeddings(images), context_indices)
        for layer in model.layers:
            hidden_states = layer(hidden_states)
        expected = model.layernorm(hidden_states)
        actual = model(images, context_indices=context_indices).last_hidden_state
    torch.testing.assert_close(actual, expected)


def test_dropped_patches_do_not_influence_the_context_features(config):
    model = IJepaModel(config).eval()
    images = pixels(config, batch_size=1)
    context_indices = torch.arange(0, config.num_patches, 2).unsqueeze(0)  # even patches: columns 0, 2, 4, ...
    perturbed = images.clone()
    patch = config.patch_size
    for column in range(1, config.grid_size[1], 2):
        perturbed[..., column * patch : (column + 1) * patch] = torch.randn_like(perturbed[..., :patch])
    with torch.no_grad():
        original = model(images, context_indices=context_indices).last_hidden_state
        changed = model(perturbed, context_indices=context_indices).last_hidden_state
        full_changed = model(perturbed).last_hidden_state
    torch.testing.assert_close(original, changed)
    assert not torch.allclose(model(images).last_hidden_state, full_changed)


def test_eager_and_sdpa_attention_agree_and_both_paths_run(monkeypatch):
    images = pixels(tiny_config())
    sdpa_calls = []
    original_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        sdpa_calls.append(1)
        return original_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    sdpa_model = IJepaModel(tiny_config(attn_implementation="sdpa")).eval()
    eager_model = IJepaModel(tiny_config(attn_implementation="eager")).eval()
    eager_model.load_state_dict(sdpa_model.state_dict())
    with torch.no_grad():
        eager_output = eager_model(images).last_hidden_state
        assert sdpa_calls == []
        sdpa_output = sdpa_model(images).last_hidden_state
        assert len(sdpa_calls) == sdpa_model.config.num_hidden_layers
    assert (eager_output - sdpa_output).abs().max() < 1e-5


def test_set_attn_implementation_switches_the_kernel(config, monkeypatch):
    calls = []
    original_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original_sdpa(*a, **k)
    )
    model = IJepaModel(config).eval()
    images = pixels(config)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager_output = model(images).last_hidden_state
        assert calls == []
        model.set_attn_implementation("sdpa")
        sdpa_output = model(images).last_hidden_state
        assert len(calls) == config.num_hidden_layers
    assert (eager_output - sdpa_output).abs().max() < 1e-5


def test_default_attention_is_sdpa(config):
    assert IJepaModel(config).config._attn_implementation == "sdpa"


def test_output_attentions_are_row_stochastic(config):
    outputs = IJepaModel(config).eval()(pixels(config), output_attentions=True)
    assert len(outputs.attentions) == config.num_hidden_layers
    for attention in outputs.attentions:
        assert attention.shape == (BATCH_SIZE, config.num_attention_heads, config.num_patches, config.num_patches)
        torch.testing.assert_close(attention.sum(dim=-1), torch.ones(attention.shape[:-1]))


def test_output_hidden_states_has_one_entry_per_layer_plus_embeddings(config):
    outputs = IJepaModel(config).eval()(pixels(config), output_hidden_states=True)
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (BATCH_SIZE, config.num_patches, config.hidden_size) for h in outputs.hidden_states)


def test_output_hidden_states_as_layer_indices_keeps_only_those(config):
    """transformers v5: a list of indices (negative ones too) selects hidden states; the others are None."""
    model = IJepaModel(config).eval()
    images = pixels(config)
    with torch.no_grad():
        every = model(images, output_hidden_states=True).hidden_states
        selected = model(images, output_hidden_states=[0, -1]).hidden_states
    assert len(selected) == config.num_hidden_layers + 1
    assert selected[1] is None
    torch.testing.assert_close(selected[0], every[0])
    torch.testing.assert_close(selected[-1], every[-1])


def test_hidden_states_follow_the_context_tokens(config):
    model = IJepaModel(config).eval()
    context_indices, _ = random_masks(config, num_context=30)
    outputs = model(pixels(config), context_indices=context_indices, output_hidden_states=True)
    assert all(h.shape == (BATCH_SIZE, 30, config.hidden_size) for h in outputs.hidden_states)


def test_output_flags_from_the_configuration(config):
    config.output_hidden_states = True
    config.output_attentions = True
    outputs = IJepaModel(config).eval()(pixels(config))
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1
    assert len(outputs.attentions) == config.num_hidden_layers


def test_classifier_passes_output_options_to_the_encoder(config):
    from modeling_ijepa import IJepaForImageClassification

    config.num_labels = 3
    model = IJepaForImageClassification(config).eval()
    outputs = model(pixels(config), output_hidden_states=[1], output_attentions=True)
    assert outputs.hidden_states[1] is not None and outputs.hidden_states[0] is None
    assert len(outputs.attentions) == config.num_hidden_layers
    logits, hidden_states = model(pixels(config), output_hidden_states=True, return_dict=False)
    assert logits.shape == (BATCH_SIZE, 3) and len(hidden_states) == config.num_hidden_layers + 1


def test_classifier_accepts_the_trainers_num_items_in_batch(config):
    from modeling_ijepa import IJepaForImageClassification

    config.num_labels = 3
    model = IJepaForImageClassification(config).eval()
    labels = torch.tensor([0, 2])
    mean_loss = model(pixels(config), labels=labels).loss
    summed_loss = model(pixels(config), labels=labels, num_items_in_batch=torch.tensor(1)).loss
    assert summed_loss > mean_loss


@pytest.mark.parametrize("model_class", ["IJepaModel", "IJepaForImageClassification", "IJepaForPreTraining"])
def test_unknown_forward_keywords_raise(config, model_class):
    import modeling_ijepa

    model = getattr(modeling_ijepa, model_class)(config).eval()
    context_indices, target_indices = random_masks(config)
    inputs = {"pixel_values": pixels(config)}
    if model_class == "IJepaForPreTraining":
        inputs.update(context_indices=context_indices, target_indices=target_indices)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['output_hidden_state'\]"):
        model(**inputs, output_hidden_state=True)


def test_tuple_output_when_return_dict_is_false(config):
    model = IJepaModel(config).eval()
    images = pixels(config)
    sequence_output, pooled_output = model(images, return_dict=False)
    torch.testing.assert_close(sequence_output, model(images).last_hidden_state)
    torch.testing.assert_close(pooled_output, sequence_output.mean(dim=1))


@pytest.mark.parametrize(("rows", "columns"), [(12, 12), (4, 6)])
def test_sincos_position_embedding_matches_the_official_formula(rows, columns):
    expected = official_2d_sincos_pos_embed(32, rows, columns)
    actual = get_2d_sincos_pos_embed(32, (rows, columns)).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_sincos_first_half_encodes_the_column():
    embedding = get_2d_sincos_pos_embed(16, (3, 5)).view(3, 5, 16)
    torch.testing.assert_close(embedding[0, :, :8], embedding[2, :, :8])  # same column, other row: first half equal
    torch.testing.assert_close(embedding[:, 0, 8:], embedding[:, 4, 8:])  # same row, other column: second half equal


def test_position_embeddings_are_fixed_sincos_in_encoder_and_predictor(config):
    model = IJepaForPreTraining(config)
    encoder_expected = torch.from_numpy(official_2d_sincos_pos_embed(config.hidden_size, *config.grid_size)).float()
    predictor_expected = torch.from_numpy(
        official_2d_sincos_pos_embed(config.predictor_hidden_size, *config.grid_size)
    ).float()
    for encoder in (model.encoder, model.target_encoder):
        torch.testing.assert_close(encoder.embeddings.position_embeddings[0], encoder_expected)
        assert not encoder.embeddings.position_embeddings.requires_grad
    torch.testing.assert_close(model.predictor.position_embeddings[0], predictor_expected)
    assert not model.predictor.position_embeddings.requires_grad


def test_sincos_rejects_a_width_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(30, (4, 4))


def test_residual_output_weights_are_depth_scaled():
    config = tiny_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    model = IJepaModel(config)
    for index, layer in enumerate(model.layers):
        reference_std = layer.mlp.fc1.weight.std().item()
        assert reference_std == pytest.approx(config.initializer_range, rel=0.03)
        expected_ratio = 1.0 / math.sqrt(2.0 * (index + 1))
        assert layer.mlp.fc2.weight.std().item() / reference_std == pytest.approx(expected_ratio, rel=0.05)
        assert layer.attention.o_proj.weight.std().item() / reference_std == pytest.approx(expected_ratio, rel=0.05)
        assert layer.attention.q_proj.weight.std().item() / reference_std == pytest.approx(1.0, rel=0.05)


def test_biases_start_at_zero_and_layer_norms_at_identity(config):
    model = IJepaForPreTraining(config)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0, name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.count_nonzero(module.bias) == 0, name
            assert module.eps == 1e-6


def test_image_size_not_a_multiple_of_the_patch_raises(config):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        IJepaModel(config)(pixels(config, size=50))


def test_out_of_range_context_indices_raise(config):
    context_indices = torch.tensor([[0, 1, config.num_patches]] * BATCH_SIZE)
    with pytest.raises(ValueError, match=r"outside \[0, 144\)"):
        IJepaModel(config)(pixels(config), context_indices=context_indices)


def test_context_indices_of_the_wrong_shape_raise(config):
    with pytest.raises(ValueError, match="mask sampler"):
        IJepaModel(config)(pixels(config), context_indices=torch.tensor([0, 1, 2]))


def test_interpolate_pos_encoding_runs_on_a_larger_image(config):
    model = IJepaModel(config).eval()
    outputs = model(pixels(config, size=64), interpolate_pos_encoding=True)
    assert outputs.last_hidden_state.shape == (BATCH_SIZE, (64 // config.patch_size) ** 2, config.hidden_size)
    assert torch.isfinite(outputs.last_hidden_state).all()


# ---------------------------------------------------------------------------------------------------------------------
# Pre-training model


def test_pretraining_output_shapes(config):
    model = IJepaForPreTraining(config)
    context_indices, target_indices = random_masks(config, num_context=40, num_blocks=3, num_target=6)
    outputs = model(pixels(config), context_indices, target_indices)
    assert outputs.loss.shape == ()
    assert outputs.predictions.shape == (BATCH_SIZE, 3, 6, config.hidden_size)
    assert outputs.targets.shape == outputs.predictions.shape
    assert outputs.context_hidden_state.shape == (BATCH_SIZE, 40, config.hidden_size)
    assert outputs.target_pooler_output.shape == (BATCH_SIZE, config.hidden_size)


def test_loss_is_smooth_l1_to_layer_normed_target_features(config):
    model = IJepaForPreTraining(config)
    with torch.no_grad():  # make the target encoder differ from the context encoder
        for parameter in model.target_encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    images = pixels(config)
    context_indices, target_indices = random_masks(config)
    outputs = model(images, context_indices, target_indices)

    with torch.no_grad():
        features = model.target_encoder(images).last_hidden_state
        features = F.layer_norm(features, (config.hidden_size,))
        expected_targets = torch.stack(
            [torch.stack([features[b, block] for block in target_indices[b]]) for b in range(BATCH_SIZE)]
        )
        context = model.encoder(images, context_indices=context_indices).last_hidden_state
        expected_predictions = model.predictor(context, context_indices, target_indices)
    torch.testing.assert_close(outputs.targets, expected_targets)
    torch.testing.assert_close(outputs.predictions, expected_predictions)
    torch.testing.assert_close(outputs.loss, F.smooth_l1_loss(expected_predictions, expected_targets))
    torch.testing.assert_close(outputs.target_pooler_output, model.target_encoder(images).pooler_output)


def test_each_block_is_predicted_from_the_context_and_that_block_only(config):
    model = IJepaForPreTraining(config).eval()
    images = pixels(config)
    context_indices, target_indices = random_masks(config, num_context=40, num_blocks=3, num_target=6)
    moved = target_indices.clone()
    moved[:, 2] = torch.arange(100, 106)  # another block 2, disjoint from the context and the other blocks
    with torch.no_grad():
        original = model(images, context_indices, target_indices).predictions
        changed = model(images, context_indices, moved).predictions
    torch.testing.assert_close(original[:, :2], changed[:, :2])
    assert not torch.allclose(original[:, 2], changed[:, 2])


def test_gradients_reach_encoder_and_predictor_but_never_the_target_encoder(config):
    model = IJepaForPreTraining(config).train()
    model(pixels(config), *random_masks(config)).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("target_encoder."):
            assert not parameter.requires_grad, name
            assert parameter.grad is None, name
        elif parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any(name.startswith("encoder.") for name in trainable)
    assert any(name.startswith("predictor.") for name in trainable)


def test_target_encoder_starts_as_an_exact_copy_of_the_encoder(config):
    model = IJepaForPreTraining(config)
    encoder_state = model.encoder.state_dict()
    target_state = model.target_encoder.state_dict()
    assert encoder_state.keys() == target_state.keys()
    for name, value in encoder_state.items():
        assert torch.equal(value, target_state[name]), name
        assert value.data_ptr() != target_state[name].data_ptr(), f"{name} is shared, not copied"


def _perturb_encoder(model):
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.add_(torch.randn_like(parameter))


def test_update_target_encoder_is_the_ema_formula(config):
    model = IJepaForPreTraining(config)
    _perturb_encoder(model)
    before = {name: p.clone() for name, p in model.target_encoder.named_parameters()}
    online = dict(model.encoder.named_parameters())
    model.update_target_encoder(0.9)
    for name, parameter in model.target_encoder.named_parameters():
        torch.testing.assert_close(parameter, 0.9 * before[name] + 0.1 * online[name])


def test_update_target_encoder_with_momentum_one_changes_nothing(config):
    model = IJepaForPreTraining(config)
    _perturb_encoder(model)
    before = {name: p.clone() for name, p in model.target_encoder.named_parameters()}
    model.update_target_encoder(1.0)
    for name, parameter in model.target_encoder.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_update_target_encoder_with_momentum_zero_copies_the_encoder(config):
    model = IJepaForPreTraining(config)
    _perturb_encoder(model)
    model.update_target_encoder(0.0)
    online = dict(model.encoder.named_parameters())
    for name, parameter in model.target_encoder.named_parameters():
        assert torch.equal(parameter, online[name]), name


def test_train_mode_keeps_the_target_encoder_in_eval_mode(config):
    model = IJepaForPreTraining(config)
    model.train()
    assert model.encoder.training and model.predictor.training
    assert not model.target_encoder.training
    assert not any(module.training for module in model.target_encoder.modules())


@pytest.mark.parametrize("missing", ["context_indices", "target_indices"])
def test_missing_indices_point_to_the_mask_sampler(config, missing):
    context_indices, target_indices = random_masks(config)
    inputs = dict(context_indices=context_indices, target_indices=target_indices)
    inputs[missing] = None
    with pytest.raises(ValueError, match="mask sampler"):
        IJepaForPreTraining(config)(pixels(config), **inputs)


def test_out_of_range_target_indices_raise(config):
    context_indices, target_indices = random_masks(config)
    target_indices[0, 0, 0] = config.num_patches
    with pytest.raises(ValueError, match="target_indices"):
        IJepaForPreTraining(config)(pixels(config), context_indices, target_indices)


def test_get_encoder_is_the_target_encoder(config):
    model = IJepaForPreTraining(config)
    assert model.get_encoder() is model.target_encoder
    assert isinstance(model.get_encoder(), IJepaModel)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(config, monkeypatch):
    images = pixels(config)
    context_indices, target_indices = random_masks(config)
    model = IJepaForPreTraining(config).train()

    def loss_and_gradients():
        model.zero_grad()
        loss = model(images, context_indices, target_indices).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_gradients = loss_and_gradients()

    attention_calls = []
    original_forward = IJepaSelfAttention.forward

    def counting_forward(self, *args, **kwargs):
        attention_calls.append(1)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(IJepaSelfAttention, "forward", counting_forward)
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()

    # Trainable layers (context encoder + predictor) run twice: forward and recompute; the no-grad target encoder once.
    trainable_layers = config.num_hidden_layers + config.predictor_num_hidden_layers
    assert len(attention_calls) == 2 * trainable_layers + config.num_hidden_layers
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert checkpointed_gradients.keys() == plain_gradients.keys()
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, msg=name)


def test_fused_qkv_projection_equals_separate_projections_and_respects_hooks():
    torch.manual_seed(0)
    model = IJepaModel(tiny_config()).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        fused = model(images).last_hidden_state
    calls = []
    attention = model.layers[0].attention
    handle = attention.q_proj.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    with torch.no_grad():
        separate = model(images).last_hidden_state
    handle.remove()
    assert calls, "a hooked q_proj must be called (no fused path around it)"
    torch.testing.assert_close(fused, separate, rtol=0, atol=1e-5)
