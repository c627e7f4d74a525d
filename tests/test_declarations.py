"""Each setting is declared once: a new mask setting or loss term is one declaration, and everything else follows.

The test copies the package into a temporary folder, adds ONE field to `MaskSettings` and ONE entry to `LOSS_TERMS`
(and nothing else), and checks in a fresh interpreter that the new setting reaches the configuration (default and
`config.json`), the `pretrain.py` flags, the recipes' `mask:` keys and the samplers, and that the new term reaches the
configuration (its weight field, off by default), the loss and the model output's `loss_terms` (which the trainer
logs by name).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

NEW_SETTING = """
    extra_setting: int = mask_setting(7, "A setting added for the test.", recipe_key="extra")
"""

NEW_TERM = """    LossTerm(
        "mean_loss",
        "mean_weight",
        lambda features, config: features.float().mean().abs(),
        "Weight of a term added for the test.",
    ),
"""

CHECK = textwrap.dedent(
    """
    import json, tempfile
    import torch
    from modeling_ijepa import IJepaConfig, IJepaForPreTraining
    from modeling_ijepa.masking import MASK_SETTINGS, mask_sampler_from_config
    from modeling_ijepa.cli import load_recipe
    from training_scripts.pretrain import build_config, parse_args

    # The mask setting: configuration default, config.json, flag, recipe key, sampler attribute.
    assert "extra_setting" in MASK_SETTINGS
    config = IJepaConfig.from_preset("vit_micro_patch4_48")
    assert config.extra_setting == 7
    folder = tempfile.mkdtemp()
    IJepaConfig(extra_setting=3).save_pretrained(folder)
    assert json.load(open(folder + "/config.json"))["extra_setting"] == 3
    assert IJepaConfig.from_pretrained(folder).extra_setting == 3
    model_args, _, training_args, _ = parse_args(
        ["--extra_setting", "5", "--config_overrides", "mean_weight=0.5", "--output_dir", folder]
    )
    config = build_config(model_args)
    assert config.extra_setting == 5 and config.mean_weight == 0.5
    assert mask_sampler_from_config(config).extra_setting == 5
    recipe = folder + "/recipe.yaml"
    open(recipe, "w").write("mask:\\n  extra: 9\\n")
    assert load_recipe(__import__("pathlib").Path(recipe)) == {"extra_setting": 9}

    # The loss term: weight field (off by default), the loss, the output's loss_terms.
    assert IJepaConfig().mean_weight == 0.0 and not IJepaConfig().uses_regularizers
    config = IJepaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=48, patch_size=4,
        predictor_hidden_size=16, predictor_num_hidden_layers=1, mean_weight=0.5,
    )
    model = IJepaForPreTraining(config)
    batch = mask_sampler_from_config(config)([{"pixel_values": torch.randn(3, 48, 48)} for _ in range(4)])
    outputs = model(**batch)
    terms = outputs.loss_terms
    assert set(terms) == {"prediction_loss", "mean_loss"}, terms
    torch.testing.assert_close(outputs.loss, terms["prediction_loss"] + 0.5 * terms["mean_loss"])
    print("one declaration is enough")
    """
)


def _add_after(path: Path, anchor: str, text: str) -> None:
    source = path.read_text()
    assert source.count(anchor) == 1, f"anchor {anchor!r} not found once in {path}"
    path.write_text(source.replace(anchor, anchor + text))


def test_a_new_mask_setting_and_a_new_loss_term_need_one_declaration_each(tmp_path):
    for name in ("modeling_ijepa", "training_scripts", "configuration"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    settings = tmp_path / "modeling_ijepa" / "masking" / "settings.py"
    source = settings.read_text()
    marker = "\n    # -- derived views"
    assert source.count(marker) == 1
    settings.write_text(source.replace(marker, NEW_SETTING + marker))
    _add_after(tmp_path / "modeling_ijepa" / "regularizers.py", "LOSS_TERMS: tuple[LossTerm, ...] = (\n", NEW_TERM)

    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "one declaration is enough" in result.stdout
