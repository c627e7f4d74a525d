"""Benchmarks and evidence scripts of ijepa-hf, importable as `benchmarks.<name>` (tests import them this way).

Run them from the repository root, as modules or as files:

    python -m benchmarks.benchmark_step --device cpu
    python benchmarks/benchmark_step.py --device cpu

A script that imports another module of this folder (or `training_scripts`) puts the repository root first on the
import path when it is run as a file, which is what `python -m` does from the root.
"""
