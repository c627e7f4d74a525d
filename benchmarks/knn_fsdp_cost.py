"""
The k-NN monitor's cost under FSDP2 against the same evaluation unsharded, side by side in one run.

    python -m benchmarks.knn_fsdp_cost [--reference_images 1000] [--query_images 500] [--rounds 3]

Under FSDP2 every process runs the whole evaluation on the same images (the root's parameters gathered with
`unshard()`, each layer gathering its own in its forward hook, as in training), so the scores equal the unsharded ones
and the cost is one unsharded evaluation per process plus the all-gathers. The script builds a `vit_micro_patch4_48`
pre-training model, times `IJepaTrainer.evaluate()` with the k-NN monitor in one process, then in a 2-process FSDP2
launch (torchrun, gloo, one thread per process) on the same weights, and prints both times and scores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "IJepaLayer",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
}


def _evaluate(output_dir: Path, reference_images: int, query_images: int, rounds: int) -> dict:
    """Time `rounds` k-NN evaluations of the seeded model through the trainer, in whatever launch this runs in."""
    import torch

    from modeling_ijepa import IJepaConfig, IJepaForPreTraining
    from modeling_ijepa.data import default_image_processor, load_digits_dataset
    from modeling_ijepa.monitoring import KnnMonitor
    from modeling_ijepa.trainer import IJepaTrainer, IJepaTrainingArguments

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = IJepaForPreTraining(IJepaConfig.from_preset("vit_micro_patch4_48"))
    digits = load_digits_dataset(48)
    monitor = KnnMonitor(
        digits["train"].select(range(reference_images)),
        digits["test"].select(range(query_images)),
        default_image_processor(48),
    )
    arguments = IJepaTrainingArguments(
        output_dir=str(output_dir), use_cpu=True, report_to=[], eval_strategy="no", per_device_eval_batch_size=256
    )
    trainer = IJepaTrainer(model=model, args=arguments, train_dataset=digits["train"], knn_monitor=monitor)
    if trainer.is_fsdp_enabled:  # wrap the model as training would, without training
        trainer.model = trainer.accelerator.prepare(trainer.model)
    seconds, scores = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        scores = trainer.evaluate()
        seconds.append(time.perf_counter() - start)
    return {"mode": trainer.distributed_mode, "seconds": seconds, "knn_accuracy": scores["eval_knn_accuracy"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_images", type=int, default=1000)
    parser.add_argument("--query_images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = _evaluate(Path(args.worker), args.reference_images, args.query_images, args.rounds)
        (Path(args.worker) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as folder:
        single = _evaluate(Path(folder) / "single", args.reference_images, args.query_images, args.rounds)
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **FSDP2_ENV)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command += [str(Path(__file__).resolve()), "--worker", folder]
        command += ["--reference_images", str(args.reference_images), "--query_images", str(args.query_images)]
        command += ["--rounds", str(args.rounds)]
        subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
        sharded = [json.loads((Path(folder) / f"rank{rank}.json").read_text()) for rank in range(2)]

    images = args.reference_images + args.query_images
    print(f"k-NN monitor, {images} images, vit_micro_patch4_48, one thread per process, {args.rounds} rounds")
    print(f"{'run':<44} {'seconds per evaluation (rounds)':<34} k-NN accuracy")
    rows = [("one process", single)] + [(f"FSDP2, process {rank} of 2", result) for rank, result in enumerate(sharded)]
    for name, result in rows:
        times = ", ".join(f"{seconds:.2f}" for seconds in result["seconds"])
        print(f"{name + ' (' + result['mode'] + ')':<44} {times:<34} {result['knn_accuracy']:.4f}")
    ratio = min(sharded[0]["seconds"]) / min(single["seconds"])
    equal = all(result["knn_accuracy"] == single["knn_accuracy"] for result in sharded)
    print(f"FSDP2 / one process (best rounds): {ratio:.2f}x; scores equal: {equal}")


if __name__ == "__main__":
    main()
