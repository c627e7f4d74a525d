"""Checkpoints move both ways between this package and vanilla transformers' built-in `ijepa`, with equal outputs.

Vanilla loading of our checkpoints runs in a subprocess that never imports `modeling_ijepa`: importing it re-routes
the `"ijepa"` Auto classes to our classes, which would hide an incompatibility.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from transformers.models.ijepa import modeling_ijepa as vanilla

from modeling_ijepa import IJepaForImageClassification, IJepaForPreTraining, IJepaModel


TOLERANCE = 1e-5
NUM_LABELS = 5

VANILLA_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers
    from transformers.models.ijepa import modeling_ijepa as vanilla

    work_dir = sys.argv[1]
    jobs = json.loads(open(f"{work_dir}/jobs.json").read())
    pixel_values = torch.load(f"{work_dir}/pixel_values.pt")
    results, report = {}, {}
    for name, (directory, head) in jobs.items():
        classes = (
            [vanilla.IJepaForImageClassification, transformers.AutoModelForImageClassification]
            if head == "classification"
            else [vanilla.IJepaModel, transformers.AutoModel]
        )
        for loader in classes:
            model, info = loader.from_pretrained(directory, output_loading_info=True)
            with torch.no_grad():
                output = model.eval()(pixel_values)
            key = f"{name}/{loader.__name__}"
            results[key] = output.logits if head == "classification" else output.last_hidden_state
            report[key] = {
                "class": f"{type(model).__module__}.{type(model).__name__}",
                "problems": {k: sorted(map(str, v)) for k, v in info.items() if v},
            }
    report["modeling_ijepa_imported"] = any(m.split(".")[0] == "modeling_ijepa" for m in sys.modules)
    torch.save(results, f"{work_dir}/outputs.pt")
    open(f"{work_dir}/report.json", "w").write(json.dumps(report))
    """
)


def pixels(config, batch_size=2):
    return torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


def trained_pretraining_model(config):
    """A pre-training model after one optimiser step and an EMA update, so the target encoder is not its init."""
    model = IJepaForPreTraining(config).train()
    context_indices = torch.arange(0, 60).expand(2, -1)
    target_indices = torch.arange(80, 104).view(1, 4, 6).expand(2, -1, -1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(pixels(config), context_indices, target_indices).loss.backward()
    optimizer.step()
    model.update_target_encoder(0.5)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Vanilla transformers -> ours


def test_vanilla_encoder_checkpoint_loads_into_ours_with_equal_outputs(tmp_path):
    config = tiny_config()
    reference = vanilla.IJepaModel(config).eval()
    reference.save_pretrained(tmp_path)
    model, info = IJepaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    images = pixels(config)
    with torch.no_grad():
        difference = max_abs_diff(model(images).last_hidden_state, reference(images).last_hidden_state)
    print(f"\nvanilla IJepaModel -> ours: max abs diff {difference:.3e}")
    assert difference < TOLERANCE


def test_vanilla_classifier_checkpoint_loads_into_ours_with_equal_logits(tmp_path):
    config = tiny_config(num_labels=NUM_LABELS)
    reference = vanilla.IJepaForImageClassification(config).eval()
    with torch.no_grad():
        reference.classifier.bias.normal_()  # a head that is not at its zero-bias init
    reference.save_pretrained(tmp_path)
    model, info = IJepaForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    images = pixels(config)
    with torch.no_grad():
        difference = max_abs_diff(model(images).logits, reference(images).logits)
    print(f"\nvanilla IJepaForImageClassification -> ours: max abs diff {difference:.3e}")
    assert difference < TOLERANCE


def test_position_embeddings_stay_fixed_after_loading_a_vanilla_checkpoint(tmp_path):
    vanilla.IJepaModel(tiny_config()).save_pretrained(tmp_path)
    assert not IJepaModel.from_pretrained(tmp_path).embeddings.position_embeddings.requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# Ours -> vanilla transformers (in a process that never imports modeling_ijepa)


@pytest.fixture(scope="module")
def vanilla_round_trip(tmp_path_factory):
    """Saves our encoder, our classifier and a trained pre-training model's encoder, loads them in vanilla."""
    torch.manual_seed(0)
    work_dir = tmp_path_factory.mktemp("interop")
    config = tiny_config()
    images = pixels(config)
    torch.save(images, work_dir / "pixel_values.pt")

    encoder = IJepaModel(config).eval()
    classifier = IJepaForImageClassification(tiny_config(num_labels=NUM_LABELS)).eval()
    with torch.no_grad():
        classifier.classifier.bias.normal_()
    trained_encoder = trained_pretraining_model(config).get_encoder().eval()
    saved = {"encoder": (encoder, "base"), "classifier": (classifier, "classification")}
    saved["pretrained_target_encoder"] = (trained_encoder, "base")
    expected = {}
    with torch.no_grad():
        for name, (model, head) in saved.items():
            model.save_pretrained(work_dir / name)
            output = model(images)
            expected[name] = output.logits if head == "classification" else output.last_hidden_state
    (work_dir / "jobs.json").write_text(json.dumps({n: (str(work_dir / n), h) for n, (_, h) in saved.items()}))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    completed = subprocess.run(
        [sys.executable, "-c", VANILLA_LOADER, str(work_dir)], cwd=work_dir, env=env, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads((work_dir / "report.json").read_text())
    return expected, torch.load(work_dir / "outputs.pt"), report


def test_vanilla_process_never_imports_modeling_ijepa(vanilla_round_trip):
    _, _, report = vanilla_round_trip
    assert report["modeling_ijepa_imported"] is False


@pytest.mark.parametrize(
    ("name", "loader", "vanilla_class"),
    [
        ("encoder", "IJepaModel", "IJepaModel"),
        ("encoder", "AutoModel", "IJepaModel"),
        ("classifier", "IJepaForImageClassification", "IJepaForImageClassification"),
        ("classifier", "AutoModelForImageClassification", "IJepaForImageClassification"),
        ("pretrained_target_encoder", "IJepaModel", "IJepaModel"),
        ("pretrained_target_encoder", "AutoModel", "IJepaModel"),
    ],
)
def test_our_checkpoint_loads_in_vanilla_transformers_with_equal_outputs(
    vanilla_round_trip, name, loader, vanilla_class
):
    expected, outputs, report = vanilla_round_trip
    key = f"{name}/{loader}"
    assert report[key]["class"] == f"transformers.models.ijepa.modeling_ijepa.{vanilla_class}"
    assert report[key]["problems"] == {}
    difference = max_abs_diff(outputs[key], expected[name])
    print(f"\nours {name} -> vanilla {loader}: max abs diff {difference:.3e}")
    assert difference < TOLERANCE
