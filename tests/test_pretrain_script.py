"""training_scripts/pretrain.py: recipes, flags, data sources (embedded, local, streamed, 2 processes), bad input."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_ijepa import IJepaForPreTraining, IJepaModel
from modeling_ijepa.data import load_digits_dataset, load_image_dataset, shard_for_process
from training_scripts import pretrain


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training_scripts" / "pretrain.py"

# The recipe's k-NN monitor runs every --eval_steps; keeping the best model needs --save_steps a multiple of it.
FAST = [
    "--per_device_train_batch_size",
    "16",
    "--logging_steps",
    "1",
    "--save_steps",
    "2",
    "--eval_steps",
    "2",
    "--monitor_max_train_samples",
    "100",
    "--monitor_max_eval_samples",
    "50",
    "--disable_tqdm",
    "true",
]


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def messy_image_folder(tmp_path_factory) -> Path:
    """An imagefolder of real digits plus every kind of awkward file a scraped dataset holds."""
    root = tmp_path_factory.mktemp("images")
    digits = load_digits_dataset(48)["train"]
    for index in range(40):
        example = digits[index]
        folder = root / str(example["label"])
        folder.mkdir(exist_ok=True)
        example["image"].save(folder / f"{index}.png")
    odd = root / "odd"
    odd.mkdir()
    (odd / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    buffer = io.BytesIO()
    digits[0]["image"].save(buffer, format="JPEG")
    (odd / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    digits[1]["image"].convert("CMYK").save(odd / "cmyk.jpg")
    digits[2]["image"].convert("RGBA").save(odd / "rgba.png")
    digits[3]["image"].convert("L").save(odd / "gray.png")
    sixteen = (np.asarray(digits[4]["image"].convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    sixteen_bit = Image.fromarray(sixteen)
    assert sixteen_bit.mode.startswith("I;16")
    sixteen_bit.save(odd / "sixteen_bit.png")
    digits[5]["image"].resize((6, 5)).save(odd / "tiny.png")  # far smaller than the 48 px crop
    return root


# ------------------------------------------------------------------------------------------------------------------
# Arguments and recipes
# ------------------------------------------------------------------------------------------------------------------
def test_default_recipe_is_the_embedded_cpu_run():
    model_args, data_args, training_args, recipe = pretrain.parse_args([])
    assert recipe.endswith("tiny-cpu.yaml")
    assert model_args.model_preset == "vit_micro_patch4_48"
    assert data_args.dataset_name is None and data_args.train_dir is None
    assert training_args.max_steps == 300 and training_args.per_device_train_batch_size == 64
    assert training_args.learning_rate == 1e-3 and training_args.start_lr == 2e-4


def test_small_folder_recipe_is_the_default_schedule_with_vicreg_and_a_shorter_ema(tmp_path):
    model_args, data_args, args, recipe = pretrain.parse_args(
        ["--config", "small-folder", "--train_dir", str(tmp_path), "--config_overrides", "sigreg_weight=0.01"]
    )
    default_args = pretrain.parse_args([])[2]
    config = pretrain.build_config(model_args)
    assert recipe.endswith("small-folder.yaml") and data_args.train_dir == str(tmp_path)
    assert (config.vicreg_variance_weight, config.vicreg_covariance_weight) == (0.1, 0.004)
    assert config.regularized_features == "pooled_context" and config.sigreg_weight == 0.01  # the flag adds to it
    assert (args.ema_momentum_start, args.ema_momentum_end) == (0.98, 1.0)
    for name in ("max_steps", "learning_rate", "warmup_steps", "per_device_train_batch_size", "eval_steps"):
        assert getattr(args, name) == getattr(default_args, name), name
    assert args.load_best_model_at_end and args.metric_for_best_model == "knn_accuracy"
    assert args.best_model_rule == "latest_within_stderr" and default_args.best_model_rule == "best"
    assert (data_args.monitor_max_train_samples, data_args.monitor_max_eval_samples) == (4000, 1000)


@pytest.mark.parametrize(
    "name, preset, predictor_depth, max_steps, warmup",
    [
        ("in1k-vith14-ep300", "vit_huge_patch14_224", 12, 187_500, 25_000),
        ("in1k-vith16-448-ep300", "vit_huge_patch16_448", 12, 187_500, 25_000),
        ("in22k-vith14-ep66", "vit_huge_patch14_224", 12, 457_512, 20_796),
        ("in22k-vitg16-ep44", "vit_giant_patch16_224", 16, 305_008, 20_796),
    ],
)
def test_official_recipes(name, preset, predictor_depth, max_steps, warmup, cpu_with_bf16):
    model_args, data_args, args, _ = pretrain.parse_args(
        ["--config", name, "--train_dir", "/data/imagenet", "--use_cpu", "true"]  # bf16 needs a GPU unless on CPU
    )
    config = pretrain.build_config(model_args)
    assert model_args.model_preset == preset and config.predictor_num_hidden_layers == predictor_depth
    assert config.predictor_hidden_size == 384 and config.num_target_blocks == 4
    assert (args.max_steps, args.warmup_steps) == (max_steps, warmup)
    assert (args.learning_rate, args.start_lr, args.final_lr) == (1e-3, 2e-4, 1e-6)
    assert (args.weight_decay, args.final_weight_decay) == (0.04, 0.4)
    assert (args.ema_momentum_start, args.ema_momentum_end) == (0.996, 1.0)
    assert (data_args.crop_scale_min, data_args.crop_scale_max) == (0.3, 1.0)
    assert args.bf16 and args.per_device_train_batch_size == 128 and data_args.streaming


def test_command_line_overrides_the_recipe(cpu_with_bf16):
    model_args, _, args, _ = pretrain.parse_args(
        [
            "--config",
            "in1k-vith14-ep300",
            "--learning_rate",
            "5e-4",
            "--model_preset",
            "vit_small_patch16_224",
            "--use_cpu",
            "true",
        ]
    )
    assert args.learning_rate == 5e-4 and model_args.model_preset == "vit_small_patch16_224"
    assert args.warmup_steps == 25_000  # untouched recipe values stay


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_stepz", "3"], "did you mean --max_steps"),
        (["--max_step", "3"], "did you mean --max_steps"),  # no abbreviations: every flag is exact
        (["--config", "no-such-recipe"], "Recipe 'no-such-recipe' not found"),
        (["--crop_scale_min", "0"], "--crop_scale_min"),
        (["--streaming", "--max_steps", "-1"], "set --max_steps"),
        (["--config", "in22k-vith14-ep66", "--use_cpu", "true"], "needs data: pass --dataset_name or --train_dir"),
        (["extra"], "unexpected positional"),
    ],
)
def test_bad_flags_give_an_argparse_error(argv, message, capsys, cpu_with_bf16):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_recipe_key_is_named(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("learning_rat: 0.1\nmax_steps: 3\n")
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config", str(recipe)])
    assert "--learning_rat (did you mean --learning_rate?)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [("image_size=50", "divisible"), ("num_attention_heads=5", "not a multiple of the number of attention heads")],
)
def test_bad_model_settings_name_the_fix(overrides, message):
    with pytest.raises(SystemExit, match=message):
        pretrain.main(["--config_overrides", overrides, "--max_steps", "1", "--output_dir", "/tmp/unused"])


# ------------------------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------------------------
def test_embedded_default_run_writes_a_loadable_encoder(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    output = pretrain.main(
        ["--max_steps", "4", "--max_train_samples", "64", "--output_dir", str(tmp_path), "--warmup_steps", "1", *FAST]
    )
    encoder = AutoModel.from_pretrained(output)
    assert type(encoder) is IJepaModel
    full = IJepaForPreTraining.from_pretrained(os.path.join(output, "pretraining"))
    for name, value in full.target_encoder.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], value, rtol=0, atol=0)
    assert not torch.equal(full.encoder.layers[0].mlp.fc1.weight, full.target_encoder.layers[0].mlp.fc1.weight)
    processor = AutoImageProcessor.from_pretrained(output)
    assert processor.size == {"height": 48, "width": 48}
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_local_folder_with_bad_images_is_trained_on(messy_image_folder, tmp_path, caplog):
    pretrain.main(["--train_dir", str(messy_image_folder), "--max_steps", "3", "--output_dir", str(tmp_path), *FAST])
    assert (tmp_path / "model.safetensors").exists()
    assert "undecodable images were skipped" in caplog.text


def test_a_folder_without_labels_trains_with_the_monitor_off_unless_the_monitor_was_named(tmp_path, caplog):
    """The recipes' k-NN monitor needs class sub-folders: on an unlabelled folder it is turned off, and said so."""
    folder = tmp_path / "flat"
    folder.mkdir()
    digits = load_digits_dataset(48)["train"]
    for index in range(40):
        digits[index]["image"].save(folder / f"{index}.png")
    out = tmp_path / "run"
    pretrain.main(
        ["--config", "small-folder", "--train_dir", str(folder), "--max_steps", "2", "--output_dir", str(out), *FAST]
    )
    assert (out / "model.safetensors").exists()
    assert "k-NN monitor off" in caplog.text and "no class sub-folders" in caplog.text
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert not any("eval_knn_accuracy" in entry for entry in state["log_history"])
    with pytest.raises(SystemExit, match="has no labels"):
        pretrain.main(
            ["--train_dir", str(folder), "--monitor_train_dir", str(folder), "--max_steps", "2"]
            + ["--output_dir", str(tmp_path / "named"), *FAST]
        )


def test_stream_shards_are_disjoint_per_process(messy_image_folder):
    stream = load_image_dataset(train_dir=str(messy_image_folder), streaming=True)
    seen = []
    for rank in range(2):
        seen.append({example["image"]["path"] for example in shard_for_process(stream, rank, 2)})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == len(list(messy_image_folder.rglob("*.*")))


def test_two_process_launch_on_local_streamed_data(messy_image_folder, tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        str(SCRIPT),
        "--train_dir",
        str(messy_image_folder),
        "--streaming",
        "--max_steps",
        "3",
        "--output_dir",
        str(tmp_path),
        "--shuffle_buffer_size",
        "8",
        *FAST,
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2" in result.stderr and "process 1 of 2" in result.stderr
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "checkpoint-2").is_dir()
    # Vanilla transformers loads the result without our package.
    check = (
        "import sys, transformers; m = transformers.IJepaModel.from_pretrained(sys.argv[1]); "
        "assert 'modeling_ijepa' not in sys.modules; print(type(m).__module__)"
    )
    loaded = subprocess.run([sys.executable, "-c", check, str(tmp_path)], env=_env(), capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip().startswith("transformers.")


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens
    ],
    ids=["offline-mode", "unreachable-endpoint"],
)
def test_hub_dataset_fails_fast_offline(env, tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dataset_name",
            "ILSVRC/imagenet-1k",
            "--streaming",
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path),
        ],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "Cannot reach the Hugging Face Hub" in result.stderr and "--train_dir" in result.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s to fail"


# ------------------------------------------------------------------------------------------------------------------
# Mask settings and model fields from the command line and from recipes
# ------------------------------------------------------------------------------------------------------------------
def test_mask_settings_change_from_the_command_line():
    model_args, _, _, _ = pretrain.parse_args(
        [
            "--mask_strategy",
            "random",
            "--target_scale",
            "0.1",
            "0.25",
            "--num_target_blocks",
            "3",
            "--context_aspect_ratio",
            "0.9",
            "1.1",
        ]
    )
    config = pretrain.build_config(model_args)
    assert config.mask_strategy == "random" and config.num_target_blocks == 3
    assert config.target_scale == [0.1, 0.25] and config.context_aspect_ratio == [0.9, 1.1]
    assert config.target_aspect_ratio == [0.75, 1.5]  # untouched settings keep the preset's values


def test_config_overrides_take_lists():
    model_args, _, _, _ = pretrain.parse_args(
        ["--config_overrides", "target_scale=[0.1,0.2],predictor_num_hidden_layers=1,mask_strategy=random"]
    )
    config = pretrain.build_config(model_args)
    assert config.target_scale == [0.1, 0.2] and config.predictor_num_hidden_layers == 1
    assert config.mask_strategy == "random"


def test_recipe_model_and_mask_mappings_merge_into_the_preset(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "model:\n  predictor_num_hidden_layers: 1\n  predictor_hidden_size: 32\n"
        "mask:\n  strategy: multiblock\n  target_scale: [0.1, 0.2]\n  num_target_blocks: 2\nmax_steps: 3\n"
    )
    model_args, _, args, _ = pretrain.parse_args(["--config", str(recipe), "--config_overrides", "hidden_size=64"])
    config = pretrain.build_config(model_args)
    assert (config.predictor_num_hidden_layers, config.predictor_hidden_size, config.hidden_size) == (1, 32, 64)
    assert config.target_scale == [0.1, 0.2] and config.num_target_blocks == 2 and args.max_steps == 3
    # Flags override the recipe's mask settings.
    model_args, _, _, _ = pretrain.parse_args(["--config", str(recipe), "--num_target_blocks", "4"])
    assert pretrain.build_config(model_args).num_target_blocks == 4


def test_impossible_mask_settings_fail_at_start():
    with pytest.raises(SystemExit, match="min_context_patches"):
        pretrain.main(["--min_context_patches", "500", "--max_steps", "1", "--output_dir", "/tmp/unused"])


def test_every_mask_setting_is_a_flag_and_a_config_field():
    from modeling_ijepa import IJepaConfig
    from modeling_ijepa.masking import MASK_SETTINGS

    flags = {field.name for field in dataclasses.fields(pretrain.ModelArguments)}
    assert set(MASK_SETTINGS) <= flags
    assert all(hasattr(IJepaConfig(), name) for name in MASK_SETTINGS)
