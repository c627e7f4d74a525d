"""Converting a training checkpoint of the authors' code (facebookresearch/ijepa) keeps its computation exactly.

The checkpoints here are built in the test in the official layout (`module.`-prefixed DDP state dicts, fused qkv, ...)
with random weights, and the converted models are compared with a plain-torch forward written over that layout.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from modeling_ijepa import IJepaForPreTraining, IJepaModel
from modeling_ijepa.convert_official_checkpoint import convert_official_checkpoint
from modeling_ijepa.convert_official_checkpoint import main as cli_main
from modeling_ijepa.output_layout import PRETRAINING_SUBDIR


TOLERANCE = 1e-5
LAYER_NORM_EPS = 1e-6
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The tiny checkpoint: encoder as conftest's tiny_config (48 px, patch 4, width 32, depth 2, 4 heads), and a predictor
# whose width, depth and MLP width differ from tiny_config's, so the converter must read them from the weights.
TINY = dict(
    width=32, depth=2, heads=4, mlp=64, patch=4, image=48, predictor_width=24, predictor_depth=3, predictor_mlp=96
)
# The `vit_micro_patch4_48` preset's geometry.
MICRO = dict(
    width=96, depth=4, heads=4, mlp=384, patch=4, image=48, predictor_width=48, predictor_depth=2, predictor_mlp=192
)


# ---------------------------------------------------------------------------------------------------------------------
# Official-layout checkpoints


def official_block(prefix, width, mlp, generator):
    def randn(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    return {
        f"{prefix}.norm1.weight": 1 + randn(width), f"{prefix}.norm1.bias": randn(width),
        f"{prefix}.attn.qkv.weight": randn(3 * width, width), f"{prefix}.attn.qkv.bias": randn(3 * width),
        f"{prefix}.attn.proj.weight": randn(width, width), f"{prefix}.attn.proj.bias": randn(width),
        f"{prefix}.norm2.weight": 1 + randn(width), f"{prefix}.norm2.bias": randn(width),
        f"{prefix}.mlp.fc1.weight": randn(mlp, width), f"{prefix}.mlp.fc1.bias": randn(mlp),
        f"{prefix}.mlp.fc2.weight": randn(width, mlp), f"{prefix}.mlp.fc2.bias": randn(width),
    }  # fmt: skip


def official_encoder(g, generator):
    num_patches = (g["image"] // g["patch"]) ** 2
    state = {
        "patch_embed.proj.weight": torch.randn(g["width"], 3, g["patch"], g["patch"], generator=generator) * 0.2,
        "patch_embed.proj.bias": torch.randn(g["width"], generator=generator) * 0.2,
        # Random rather than sin-cos, so a position embedding that is not carried over shows.
        "pos_embed": torch.randn(1, num_patches, g["width"], generator=generator),
        "norm.weight": 1 + torch.randn(g["width"], generator=generator) * 0.2,
        "norm.bias": torch.randn(g["width"], generator=generator) * 0.2,
    }
    for index in range(g["depth"]):
        state.update(official_block(f"blocks.{index}", g["width"], g["mlp"], generator))
    return state


def official_predictor(g, generator):
    num_patches = (g["image"] // g["patch"]) ** 2
    width = g["predictor_width"]
    state = {
        "predictor_embed.weight": torch.randn(width, g["width"], generator=generator) * 0.2,
        "predictor_embed.bias": torch.randn(width, generator=generator) * 0.2,
        "mask_token": torch.randn(1, 1, width, generator=generator),
        "predictor_pos_embed": torch.randn(1, num_patches, width, generator=generator),
        "predictor_norm.weight": 1 + torch.randn(width, generator=generator) * 0.2,
        "predictor_norm.bias": torch.randn(width, generator=generator) * 0.2,
        "predictor_proj.weight": torch.randn(g["width"], width, generator=generator) * 0.2,
        "predictor_proj.bias": torch.randn(g["width"], generator=generator) * 0.2,
    }
    for index in range(g["predictor_depth"]):
        state.update(official_block(f"predictor_blocks.{index}", width, g["predictor_mlp"], generator))
    return state


def official_checkpoint(g, seed=0, ddp_prefix=True):
    """A training checkpoint as the authors' `train.py` saves it (the optimiser state is a real AdamW one)."""
    generator = torch.Generator().manual_seed(seed)
    models = {
        "encoder": official_encoder(g, generator),
        "predictor": official_predictor(g, generator),
        "target_encoder": official_encoder(g, generator),  # differs from the encoder, as after EMA
    }
    params = [torch.nn.Parameter(t.clone()) for t in list(models["encoder"].values())[:3]]
    sum(p.square().sum() for p in params).backward()
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    prefix = "module." if ddp_prefix else ""
    checkpoint = {name: {prefix + key: value for key, value in state.items()} for name, state in models.items()}
    checkpoint.update(
        opt=optimizer.state_dict(), scaler=None, epoch=300, loss=0.0123, batch_size=128, world_size=16, lr=1e-3
    )
    return checkpoint, models


def save_checkpoint(tmp_path, g, name="checkpoint.pth.tar", **kwargs):
    checkpoint, models = official_checkpoint(g, **kwargs)
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path, models


# ---------------------------------------------------------------------------------------------------------------------
# Plain-torch forward over the official layout


def reference_block(x, state, prefix, heads):
    batch_size, length, width = x.shape
    h = F.layer_norm(x, (width,), state[f"{prefix}.norm1.weight"], state[f"{prefix}.norm1.bias"], LAYER_NORM_EPS)
    qkv = h @ state[f"{prefix}.attn.qkv.weight"].T + state[f"{prefix}.attn.qkv.bias"]
    q, k, v = qkv.view(batch_size, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attention = torch.softmax(q @ k.transpose(-2, -1) / (width // heads) ** 0.5, dim=-1)
    h = (attention @ v).transpose(1, 2).reshape(batch_size, length, width)
    x = x + h @ state[f"{prefix}.attn.proj.weight"].T + state[f"{prefix}.attn.proj.bias"]
    h = F.layer_norm(x, (width,), state[f"{prefix}.norm2.weight"], state[f"{prefix}.norm2.bias"], LAYER_NORM_EPS)
    h = F.gelu(h @ state[f"{prefix}.mlp.fc1.weight"].T + state[f"{prefix}.mlp.fc1.bias"])
    return x + h @ state[f"{prefix}.mlp.fc2.weight"].T + state[f"{prefix}.mlp.fc2.bias"]


def select(x, indices):
    """`x` (B, N, D), `indices` (B, K) -> (B, K, D)."""
    return torch.stack([x[b, indices[b]] for b in range(x.size(0))])


def reference_encoder(state, pixel_values, heads, context_indices=None):
    patch = state["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixel_values, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + state["pos_embed"]
    if context_indices is not None:
        x = select(x, context_indices)
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for index in range(depth):
        x = reference_block(x, state, f"blocks.{index}", heads)
    return F.layer_norm(x, (x.size(-1),), state["norm.weight"], state["norm.bias"], LAYER_NORM_EPS)


def reference_predictor(state, context, context_indices, target_block, heads):
    """One target block `(B, Nt)` predicted from the context `(B, Nc, D)`, as the authors' predictor does."""
    batch_size, num_context, _ = context.shape
    pos_embed = state["predictor_pos_embed"].expand(batch_size, -1, -1)
    x = (
        context @ state["predictor_embed.weight"].T
        + state["predictor_embed.bias"]
        + select(pos_embed, context_indices)
    )
    x = torch.cat([x, state["mask_token"] + select(pos_embed, target_block)], dim=1)
    depth = len({key.split(".")[1] for key in state if key.startswith("predictor_blocks.")})
    for index in range(depth):
        x = reference_block(x, state, f"predictor_blocks.{index}", heads)
    x = F.layer_norm(x, (x.size(-1),), state["predictor_norm.weight"], state["predictor_norm.bias"], LAYER_NORM_EPS)
    return x[:, num_context:] @ state["predictor_proj.weight"].T + state["predictor_proj.bias"]


def reference_pretraining(models, pixel_values, context_indices, target_indices, heads):
    """Returns `(loss, predictions (B, blocks, Nt, D))` of one I-JEPA step."""
    target_features = reference_encoder(models["target_encoder"], pixel_values, heads)
    target_features = F.layer_norm(target_features, (target_features.size(-1),))
    context = reference_encoder(models["encoder"], pixel_values, heads, context_indices)
    predictions, targets = [], []
    for block in range(target_indices.size(1)):
        predictions.append(
            reference_predictor(models["predictor"], context, context_indices, target_indices[:, block], heads)
        )
        targets.append(select(target_features, target_indices[:, block]))
    predictions, targets = torch.stack(predictions, 1), torch.stack(targets, 1)
    return F.smooth_l1_loss(predictions, targets), predictions


def masks(g, batch_size, generator):
    num_patches = (g["image"] // g["patch"]) ** 2
    orders = torch.stack([torch.randperm(num_patches, generator=generator) for _ in range(batch_size)])
    context_indices = orders[:, :60].sort(dim=1).values
    target_indices = orders[:, 60:96].view(batch_size, 4, 9)
    return context_indices, target_indices


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


def python_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


# ---------------------------------------------------------------------------------------------------------------------
# The tiny conversion (through the Python API, with a configuration instead of a preset)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("convert")
    checkpoint_path, models = save_checkpoint(tmp_path, TINY)
    model = convert_official_checkpoint(checkpoint_path, tmp_path / "out", config=tiny_config())
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, TINY["image"], TINY["image"], generator=generator)
    context_indices, target_indices = masks(TINY, 2, generator)
    return dict(
        model=model, models=models, output_dir=tmp_path / "out", pixel_values=pixel_values,
        context_indices=context_indices, target_indices=target_indices,
    )  # fmt: skip


def test_predictor_and_encoder_depths_are_read_from_the_checkpoint(converted):
    config = converted["model"].config
    assert (config.num_hidden_layers, config.predictor_num_hidden_layers) == (TINY["depth"], TINY["predictor_depth"])
    assert (config.predictor_hidden_size, config.predictor_intermediate_size) == (
        TINY["predictor_width"],
        TINY["predictor_mlp"],
    )


def test_converted_target_encoder_matches_the_official_forward(converted):
    expected = reference_encoder(converted["models"]["target_encoder"], converted["pixel_values"], TINY["heads"])
    encoder = IJepaModel.from_pretrained(converted["output_dir"]).eval()
    with torch.no_grad():
        differences = {
            "returned": max_abs_diff(
                converted["model"].get_encoder()(converted["pixel_values"]).last_hidden_state, expected
            ),
            "saved": max_abs_diff(encoder(converted["pixel_values"]).last_hidden_state, expected),
        }
    print(f"\ntarget encoder vs official forward: max abs diff {differences}")
    assert max(differences.values()) < TOLERANCE


def test_converted_context_encoder_matches_the_official_forward_on_context_tokens(converted):
    pixel_values, context_indices = converted["pixel_values"], converted["context_indices"]
    expected = reference_encoder(converted["models"]["encoder"], pixel_values, TINY["heads"], context_indices)
    with torch.no_grad():
        output = converted["model"].encoder(pixel_values, context_indices=context_indices).last_hidden_state
    print(f"\ncontext encoder vs official forward: max abs diff {max_abs_diff(output, expected):.3e}")
    assert max_abs_diff(output, expected) < TOLERANCE


def test_converted_pretraining_model_matches_the_official_loss_and_predictions(converted):
    inputs = (converted["pixel_values"], converted["context_indices"], converted["target_indices"])
    expected_loss, expected_predictions = reference_pretraining(converted["models"], *inputs, TINY["heads"])
    reloaded = IJepaForPreTraining.from_pretrained(converted["output_dir"] / PRETRAINING_SUBDIR).eval()
    for name, model in (("returned", converted["model"]), ("saved", reloaded)):
        with torch.no_grad():
            output = model(*inputs)
        loss_difference = abs(output.loss.item() - expected_loss.item())
        prediction_difference = max_abs_diff(output.predictions, expected_predictions)
        print(
            f"\n{name} pre-training model: loss {output.loss.item():.6f} vs official {expected_loss.item():.6f} "
            f"(diff {loss_difference:.3e}), predictions max abs diff {prediction_difference:.3e}"
        )
        assert loss_difference < TOLERANCE and prediction_difference < TOLERANCE


VANILLA_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers

    output_dir, pixel_path, result_path = sys.argv[1:]
    report = {}
    outputs = {}
    for loader in (transformers.IJepaModel, transformers.AutoModel):
        model, info = loader.from_pretrained(output_dir, output_loading_info=True)
        with torch.no_grad():
            outputs[loader.__name__] = model.eval()(torch.load(pixel_path)).last_hidden_state
        report[loader.__name__] = {
            "class": f"{type(model).__module__}.{type(model).__name__}",
            "problems": {k: sorted(map(str, v)) for k, v in info.items() if v},
        }
    processor = transformers.AutoImageProcessor.from_pretrained(output_dir)
    report["processor_size"] = dict(processor.size)
    report["modeling_ijepa_imported"] = any(m.split(".")[0] == "modeling_ijepa" for m in sys.modules)
    torch.save(outputs, result_path)
    print(json.dumps(report))
    """
)


def test_vanilla_transformers_loads_the_encoder_folder_with_equal_outputs(converted, tmp_path):
    torch.save(converted["pixel_values"], tmp_path / "pixels.pt")
    completed = subprocess.run(
        [sys.executable, "-c", VANILLA_LOADER, str(converted["output_dir"]), str(tmp_path / "pixels.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, env=python_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert not report["modeling_ijepa_imported"]
    assert report["processor_size"] == {"height": TINY["image"], "width": TINY["image"]}
    expected = reference_encoder(converted["models"]["target_encoder"], converted["pixel_values"], TINY["heads"])
    for name, output in torch.load(tmp_path / "out.pt").items():
        assert report[name]["class"].startswith("transformers.models.ijepa."), report
        assert not report[name]["problems"], report
        print(f"\nvanilla {name} vs official forward: max abs diff {max_abs_diff(output, expected):.3e}")
        assert max_abs_diff(output, expected) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------------
# Presets and the command line


def test_cli_converts_with_a_preset(tmp_path):
    checkpoint_path, models = save_checkpoint(tmp_path, MICRO, ddp_prefix=False)
    command = [sys.executable, "-m", "modeling_ijepa.convert_official_checkpoint",
               "--checkpoint", str(checkpoint_path), "--output_dir", str(tmp_path / "out"),
               "--model", "vit_micro", "--patch_size", "4", "--image_size", "48",
               "--predictor_depth", "2"]  # fmt: skip
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    encoder = IJepaModel.from_pretrained(tmp_path / "out").eval()
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        difference = max_abs_diff(
            encoder(pixel_values).last_hidden_state, reference_encoder(models["target_encoder"], pixel_values, 4)
        )
    print(f"\nCLI-converted vit_micro target encoder vs official forward: max abs diff {difference:.3e}")
    assert difference < TOLERANCE
    assert (tmp_path / "out" / PRETRAINING_SUBDIR / "config.json").is_file()


def test_cli_reports_a_non_empty_output_dir_as_an_error_message(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--checkpoint", str(tmp_path / "any.pth.tar"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code != 0 and "--overwrite" in str(exit_info.value.code)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_missing_preset_uses_the_closest_preset_of_the_model(tmp_path):
    geometry = dict(MICRO, patch=8, image=96)  # no vit_micro_patch8_96 preset: vit_micro_patch4_48 + overrides
    checkpoint_path, _ = save_checkpoint(tmp_path, geometry)
    model = convert_official_checkpoint(
        checkpoint_path, tmp_path / "out", model="vit_micro", patch_size=8, image_size=96
    )
    assert (model.config.patch_size, model.config.image_size, model.config.hidden_size) == (8, 96, 96)


def test_legacy_torch_save_format_converts(tmp_path):
    checkpoint, models = official_checkpoint(TINY)
    torch.save(checkpoint, tmp_path / "checkpoint.pth.tar", _use_new_zipfile_serialization=False)  # cannot be mmapped
    model = convert_official_checkpoint(tmp_path / "checkpoint.pth.tar", tmp_path / "out", config=tiny_config())
    pixel_values = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        output = model.get_encoder()(pixel_values).last_hidden_state
    assert max_abs_diff(output, reference_encoder(models["target_encoder"], pixel_values, TINY["heads"])) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_wrong_preset_raises_naming_key_shapes_and_the_fitting_flags(tmp_path):
    checkpoint_path, _ = save_checkpoint(tmp_path, MICRO)
    with pytest.raises(ValueError) as error:
        convert_official_checkpoint(checkpoint_path, tmp_path / "out")  # defaults: vit_huge, patch 14, 224 px
    message = str(error.value)
    assert "patch_embed.proj.weight" in message
    assert "(96, 3, 4, 4)" in message and "(1280, 3, 14, 14)" in message
    assert "--model vit_micro --patch_size 4 --image_size 48" in message
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar"]  # no staging folder left behind


def test_missing_key_raises_naming_it(tmp_path):
    checkpoint, _ = official_checkpoint(TINY)
    del checkpoint["target_encoder"]["module.blocks.1.attn.proj.bias"]
    torch.save(checkpoint, tmp_path / "checkpoint.pth.tar")
    with pytest.raises(ValueError, match=r"target_encoder: the checkpoint lacks 'blocks\.1\.attn\.proj\.bias'"):
        convert_official_checkpoint(tmp_path / "checkpoint.pth.tar", tmp_path / "out", config=tiny_config())


def test_unexpected_key_raises_naming_it(tmp_path):
    checkpoint, _ = official_checkpoint(TINY)
    checkpoint["encoder"]["module.blocks.0.attn.rel_pos_h"] = torch.zeros(23, 8)
    torch.save(checkpoint, tmp_path / "checkpoint.pth.tar")
    with pytest.raises(ValueError, match=r"encoder: unexpected key 'blocks\.0\.attn\.rel_pos_h'"):
        convert_official_checkpoint(tmp_path / "checkpoint.pth.tar", tmp_path / "out", config=tiny_config())


def test_wrong_encoder_width_in_one_tensor_raises_with_both_shapes(tmp_path):
    checkpoint, _ = official_checkpoint(TINY)
    checkpoint["predictor"]["module.predictor_proj.weight"] = torch.zeros(48, TINY["predictor_width"])
    torch.save(checkpoint, tmp_path / "checkpoint.pth.tar")
    with pytest.raises(
        ValueError, match=r"predictor: 'predictor_proj\.weight' has shape \(48, 24\).*expects \(32, 24\)"
    ):
        convert_official_checkpoint(tmp_path / "checkpoint.pth.tar", tmp_path / "out", config=tiny_config())


def test_predictor_depth_that_disagrees_with_the_checkpoint_raises(tmp_path):
    checkpoint_path, _ = save_checkpoint(tmp_path, TINY)
    with pytest.raises(ValueError, match="--predictor_depth 12 .* 3 predictor_blocks"):
        convert_official_checkpoint(checkpoint_path, tmp_path / "out", config=tiny_config(), predictor_depth=12)


def test_checkpoint_without_model_state_dicts_raises(tmp_path):
    torch.save({"encoder": {}, "epoch": 1}, tmp_path / "checkpoint.pth.tar")
    with pytest.raises(ValueError, match="'predictor', 'target_encoder'"):
        convert_official_checkpoint(tmp_path / "checkpoint.pth.tar", tmp_path / "out", config=tiny_config())


# ---------------------------------------------------------------------------------------------------------------------
# Output folder safety


def test_non_empty_output_dir_is_refused_and_left_untouched(tmp_path):
    checkpoint_path, _ = save_checkpoint(tmp_path, TINY)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_official_checkpoint(checkpoint_path, output_dir, config=tiny_config())
    assert [p.name for p in output_dir.iterdir()] == ["notes.txt"]
    assert (output_dir / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_an_earlier_conversion_and_keeps_other_files(tmp_path):
    first_path, _ = save_checkpoint(tmp_path, TINY, name="first.pth.tar", seed=1)
    second_path, second = save_checkpoint(tmp_path, TINY, name="second.pth.tar", seed=2)
    output_dir = tmp_path / "out"
    convert_official_checkpoint(first_path, output_dir, config=tiny_config())
    (output_dir / "notes.txt").write_text("mine")
    convert_official_checkpoint(second_path, output_dir, config=tiny_config(), overwrite=True)
    assert (output_dir / "notes.txt").read_text() == "mine"
    pixel_values = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        output = IJepaModel.from_pretrained(output_dir)(pixel_values).last_hidden_state
    assert max_abs_diff(output, reference_encoder(second["target_encoder"], pixel_values, TINY["heads"])) < TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.pth.tar", "out", "second.pth.tar"]
