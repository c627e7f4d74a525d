"""Pictures: the script writes every PNG from a pre-training folder, deterministically; the numbers tell trained
features from random ones."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from modeling_ijepa import IJepaForPreTraining, IJepaModel
from modeling_ijepa.data import ImageClassificationCollator, default_image_processor, load_digits_dataset
from modeling_ijepa.masking import mask_sampler_from_config
from modeling_ijepa.output_layout import write_output_layout
from modeling_ijepa.visualization import PcaBasis, patch_features, position_share, spatial_coherence
from training_scripts import visualize


@pytest.fixture(scope="module")
def pretraining_folder(tmp_path_factory) -> Path:
    """A pre-training output_dir (encoder on top, full model in pretraining/) of a tiny random-init model."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = IJepaForPreTraining(tiny_config())
    model.save_pretrained(folder / "pretraining")
    write_output_layout(folder, model.get_encoder(), default_image_processor(48))
    return folder


def _pixels(count: int = 16) -> torch.Tensor:
    images = load_digits_dataset(48)["test"].select(range(count))
    return ImageClassificationCollator(default_image_processor(48))(list(images))["pixel_values"]


def test_script_writes_every_picture_deterministically(pretraining_folder, tmp_path):
    argv = ["--model_name_or_path", str(pretraining_folder), "--num_images", "3"]
    first = visualize.main([*argv, "--output_dir", str(tmp_path / "a")])
    second = visualize.main([*argv, "--output_dir", str(tmp_path / "b")])
    names = ["pca_features.png", "attention.png", "masks.png", "predictions.png"]
    assert [Path(p).name for p in first["pictures"]] == names
    for name in names:
        data = (tmp_path / "a" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert data == (tmp_path / "b" / name).read_bytes(), name
    assert first["spatial_coherence"] == second["spatial_coherence"]
    assert json.loads((tmp_path / "a" / "numbers.json").read_text())["attention_entropy"] == first["attention_entropy"]
    other_seed = visualize.main([*argv, "--output_dir", str(tmp_path / "c"), "--seed", "1"])
    assert (tmp_path / "c" / "masks.png").read_bytes() != (tmp_path / "a" / "masks.png").read_bytes()
    assert other_seed["spatial_coherence"] != first["spatial_coherence"]  # other images


def test_an_encoder_folder_gives_the_encoder_pictures_only(pretraining_folder, tmp_path):
    encoder_only = tmp_path / "encoder"
    IJepaModel.from_pretrained(pretraining_folder).save_pretrained(encoder_only)
    result = visualize.main(
        ["--model_name_or_path", str(encoder_only), "--num_images", "2", "--output_dir", str(tmp_path / "out")]
    )
    assert [Path(p).name for p in result["pictures"]] == ["pca_features.png", "attention.png", "masks.png"]


def test_pca_basis_maps_features_to_rgb():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 6, 16) @ torch.diag(torch.tensor([10.0, 4.0, 2.0] + [0.1] * 13))
    basis = PcaBasis.fit(features)
    rgb = basis.to_rgb(features)
    assert rgb.shape == (2, 6, 6, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
    torch.testing.assert_close(basis.components @ basis.components.T, torch.eye(3), atol=1e-5, rtol=0)
    assert basis.components[0].abs().argmax() == 0  # the largest-variance direction comes first


def test_spatial_coherence_of_smooth_and_noisy_maps():
    torch.manual_seed(0)
    rows = torch.linspace(0, 1, 8).view(1, 8, 1, 1)
    smooth = torch.cat([rows.expand(1, 8, 8, 1), 1 - rows.expand(1, 8, 8, 1)], dim=-1) + 0.01 * torch.randn(1, 8, 8, 2)
    noisy = torch.randn(1, 8, 8, 32)
    assert spatial_coherence(smooth) > 0.5 > abs(spatial_coherence(noisy))


def test_a_few_pretraining_steps_make_features_depend_on_the_image():
    """A random-init ViT's patch features mostly encode the (fixed sin-cos) position; pre-training adds content."""
    torch.manual_seed(0)
    config = tiny_config()
    model = IJepaForPreTraining(config)
    pixels = _pixels(16)
    random_share = position_share(patch_features(model.encoder, pixels, (12, 12))[0])
    sampler = mask_sampler_from_config(config, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        context, targets = sampler.sample_masks(len(pixels), generator)
        loss = model(pixel_values=pixels, context_indices=context, target_indices=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained_share = position_share(patch_features(model.encoder, pixels, (12, 12))[0])
    assert random_share > 0.7  # the PCA picture of a random init is a map of positions
    assert trained_share < random_share - 0.05
