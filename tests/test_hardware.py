"""Specification of the CPU bf16 detection and of every place that acts on it (trainer, pre-training script)."""

import pytest
import torch
from conftest import tiny_config

from modeling_ijepa import hardware


@pytest.fixture
def fresh_detection(monkeypatch):
    """Detection from scratch, on simulated hardware: the matmul probe is replaced by given timings."""

    def simulate(capability: str, avx512_bf16: bool, amx: bool, bf16_seconds: float, fp32_seconds: float = 1e-3):
        monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        seconds = {torch.float32: fp32_seconds, torch.bfloat16: bf16_seconds}
        monkeypatch.setattr(hardware, "_matmul_seconds", lambda dtype, *args, **kwargs: seconds[dtype])
        hardware.cpu_bf16_support.cache_clear()
        return hardware.cpu_bf16_support()

    yield simulate
    hardware.cpu_bf16_support.cache_clear()


def test_an_avx2_cpu_has_no_native_bf16(fresh_detection):
    support = fresh_detection("AVX2", avx512_bf16=False, amx=False, bf16_seconds=0.4)
    assert not support.native and support.slowdown == pytest.approx(400.0)
    assert "AVX2" in support.describe() and "no AVX-512-bf16 or AMX" in support.describe()


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True)], ids=["avx512-bf16", "amx"])
def test_avx512_bf16_or_amx_with_a_fast_probe_is_native(fresh_detection, avx512_bf16, amx):
    assert fresh_detection("AVX512", avx512_bf16=avx512_bf16, amx=amx, bf16_seconds=0.5e-3).native


def test_bf16_instructions_with_a_slow_probe_are_not_native(fresh_detection):
    """E.g. torch's kernels limited to AVX2 (ATEN_CPU_CAPABILITY), or a hypervisor hiding the instructions."""
    assert not fresh_detection("AVX512", avx512_bf16=True, amx=False, bf16_seconds=60e-3).native
    assert not fresh_detection("AVX2", avx512_bf16=True, amx=False, bf16_seconds=0.5e-3).native


def test_detection_runs_once_per_process():
    hardware.cpu_bf16_support.cache_clear()
    assert hardware.cpu_bf16_support() is hardware.cpu_bf16_support()


def test_requiring_bf16_without_it_names_the_slow_down_and_the_fix(cpu_without_bf16):
    with pytest.raises(ValueError, match=r"about 400x slower.*Pass `--bf16 false`"):
        hardware.require_native_cpu_bf16("--bf16")


def test_requiring_bf16_with_it_passes(cpu_with_bf16):
    hardware.require_native_cpu_bf16("--bf16")


def test_trainer_refuses_bf16_on_a_cpu_without_it(tmp_path, cpu_without_bf16):
    from modeling_ijepa import IJepaForPreTraining
    from modeling_ijepa.trainer import IJepaTrainer, IJepaTrainingArguments

    args = IJepaTrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to="none")
    with pytest.raises(ValueError, match="no native bf16"):
        IJepaTrainer(model=IJepaForPreTraining(tiny_config()), args=args)


def test_pretrain_script_fails_at_start_for_bf16_on_a_cpu_without_it(capsys, cpu_without_bf16):
    from training_scripts import pretrain

    with pytest.raises(SystemExit):
        pretrain.parse_args(["--bf16", "true", "--use_cpu", "true"])
    error = capsys.readouterr().err
    assert "--bf16 asks for bf16 on the CPU" in error and "400x slower" in error and "--bf16 false" in error


def test_pretrain_script_takes_bf16_on_a_cpu_with_it(cpu_with_bf16):
    from training_scripts import pretrain

    _, _, args, _ = pretrain.parse_args(["--bf16", "true", "--use_cpu", "true"])
    assert args.bf16


@pytest.mark.parametrize("script", ["finetune", "linear_probe"])
def test_evaluation_scripts_fail_at_start_for_bf16_on_a_cpu_without_it(script, capsys, cpu_without_bf16):
    import importlib

    module = importlib.import_module(f"training_scripts.{script}")
    with pytest.raises(SystemExit):
        module.main(
            [
                "--model_name_or_path",
                "random:vit_micro_patch4_48",
                "--bf16",
                "true",
                "--use_cpu",
                "true",
                "--output_dir",
                "/tmp/unused",
            ]
        )
    assert "no native bf16" in capsys.readouterr().err
