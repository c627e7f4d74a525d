"""After `import modeling_ijepa`, the transformers Auto classes build and load this package's I-JEPA classes."""

import pytest
import torch
from conftest import tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    ViTConfig,
    ViTModel,
)

from modeling_ijepa import IJepaConfig, IJepaForImageClassification, IJepaForPreTraining, IJepaModel


NUM_LABELS = 3


def pixels(config, batch_size=2):
    return torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)


def masks(batch_size=2):
    context_indices = torch.arange(0, 60).expand(batch_size, -1)
    target_indices = torch.arange(80, 104).view(1, 4, 6).expand(batch_size, -1, -1)
    return context_indices, target_indices


@pytest.fixture
def pretraining_dir(tmp_path):
    """A saved pre-training model whose target encoder differs from its (context) encoder."""
    model = IJepaForPreTraining(tiny_config())
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    return tmp_path, model.eval()


def test_auto_config_returns_our_config_with_the_ijepa_fields(tmp_path):
    tiny_config(num_target_blocks=2).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is IJepaConfig
    assert config.num_target_blocks == 2


def test_saved_weights_are_safetensors_only(tmp_path):
    IJepaModel(tiny_config()).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))


def test_auto_model_round_trip(tmp_path):
    config = tiny_config()
    model = IJepaModel(config).eval()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is IJepaModel
    assert not any(info.values()), info
    images = pixels(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).last_hidden_state, model(images).last_hidden_state, rtol=0, atol=0)


def test_auto_model_for_image_classification_round_trip(tmp_path):
    config = tiny_config(num_labels=NUM_LABELS)
    model = IJepaForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is IJepaForImageClassification
    assert not any(info.values()), info
    images = pixels(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits, rtol=0, atol=0)


def test_auto_model_for_pretraining_round_trip(pretraining_dir):
    directory, model = pretraining_dir
    loaded, info = AutoModelForPreTraining.from_pretrained(directory, output_loading_info=True)
    assert type(loaded) is IJepaForPreTraining
    assert not any(info.values()), info
    images, (context_indices, target_indices) = pixels(model.config), masks()
    with torch.no_grad():
        expected = model(images, context_indices, target_indices)
        actual = loaded(images, context_indices, target_indices)
    torch.testing.assert_close(actual.predictions, expected.predictions, rtol=0, atol=0)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=0)


def test_loaded_pretraining_model_keeps_fixed_parameters_frozen(pretraining_dir):
    loaded = IJepaForPreTraining.from_pretrained(pretraining_dir[0])
    assert not any(parameter.requires_grad for parameter in loaded.target_encoder.parameters())
    assert not loaded.encoder.embeddings.position_embeddings.requires_grad
    assert not loaded.predictor.position_embeddings.requires_grad
    assert loaded.encoder.layers[0].mlp.fc1.weight.requires_grad


def test_image_classification_from_an_encoder_checkpoint_adds_only_the_head(tmp_path):
    config = tiny_config()
    encoder = IJepaModel(config).eval()
    encoder.save_pretrained(tmp_path)
    classifier, info = AutoModelForImageClassification.from_pretrained(
        tmp_path, num_labels=NUM_LABELS, output_loading_info=True
    )
    assert type(classifier) is IJepaForImageClassification
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"]
    images = pixels(config)
    with torch.no_grad():
        torch.testing.assert_close(classifier.ijepa(images).last_hidden_state, encoder(images).last_hidden_state)


def test_auto_model_on_a_pretraining_checkpoint_returns_the_target_encoder(pretraining_dir):
    directory, model = pretraining_dir
    encoder, info = AutoModel.from_pretrained(directory, output_loading_info=True)
    assert type(encoder) is IJepaModel
    assert not info["missing_keys"]
    images = pixels(model.config)
    with torch.no_grad():
        actual = encoder(images).last_hidden_state
        torch.testing.assert_close(actual, model.target_encoder(images).last_hidden_state, rtol=0, atol=0)
        assert not torch.allclose(actual, model.encoder(images).last_hidden_state)


def test_encoder_loaded_from_a_pretraining_checkpoint_is_trainable_except_positions(pretraining_dir):
    encoder = IJepaModel.from_pretrained(pretraining_dir[0])
    frozen = {name for name, parameter in encoder.named_parameters() if not parameter.requires_grad}
    assert frozen == {"embeddings.position_embeddings"}


@pytest.fixture
def vit_dir(tmp_path):
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=48, patch_size=4
    )
    ViTModel(config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("model_class", [IJepaModel, IJepaForImageClassification, IJepaForPreTraining])
def test_checkpoint_of_another_architecture_is_refused_with_a_clear_error(vit_dir, model_class):
    # A ViT's weight names map onto ours: without the check it would load half-initialised (CLS-sized positions).
    with pytest.raises(ValueError, match=r"holds a 'vit' checkpoint \(architectures \['ViTModel'\]\)"):
        model_class.from_pretrained(vit_dir)


def test_auto_model_keeps_loading_other_architectures_with_their_own_class(vit_dir):
    assert type(AutoModel.from_pretrained(vit_dir)) is ViTModel


def test_image_classification_from_a_pretraining_checkpoint_uses_the_target_encoder(pretraining_dir):
    directory, model = pretraining_dir
    classifier, info = AutoModelForImageClassification.from_pretrained(
        directory, num_labels=NUM_LABELS, output_loading_info=True
    )
    assert type(classifier) is IJepaForImageClassification
    assert classifier.config.num_labels == NUM_LABELS
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    images = pixels(model.config)
    with torch.no_grad():
        expected = model.target_encoder(images).last_hidden_state
        torch.testing.assert_close(classifier.ijepa(images).last_hidden_state, expected, rtol=0, atol=0)
        assert classifier(images).logits.shape == (2, NUM_LABELS)
