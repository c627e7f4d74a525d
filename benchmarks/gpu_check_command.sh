#!/usr/bin/env bash
# The GPU check as ONE device command, run from the repository root on a machine with one H100 / H200 / A100 and no
# network, with the wheels of .whl/ carried along (pip download list: README, section "GPU check"):
#
#     bash benchmarks/gpu_check_command.sh            # results in $OUT (default outputs/gpu-check)
#
# The wheels add what that machine lacks (datasets 5.2 and the packages it pins: pyarrow, pandas with dateutil,
# xxhash, fsspec, dill, multiprocess; evaluate; simplejpeg; huggingface_hub 1.33 where the machine's is too old).
# Pillow and numpy are taken from the machine (torch's usual companions; the versions block says if one is missing). transformers, accelerate, huggingface_hub and tokenizers are the
# machine's own (transformers 5.17 and accelerate 1.15 were checked on CPU against this code with the smoke run).
# gpu_check.py writes gpu_check.json / gpu_check.md into $OUT section by section, so a timeout keeps what finished.
set -u
OUT="${OUT:-outputs/gpu-check}"
mkdir -p "$OUT"
SITE=/tmp/ijepa-site
{
    echo "== install"
    # huggingface_hub 1.33 (datasets 5.2 needs >= 1.31, transformers 5.17 < 2) only if the machine's is older.
    HUB_OK=$(python -c "import huggingface_hub as h; from packaging.version import Version as V; print(int(V(h.__version__) >= V('1.31')))" 2>/dev/null || echo 0)
    WHEELS=$(ls .whl/*.whl | grep -v huggingface_hub)
    [ "$HUB_OK" = 1 ] || WHEELS="$WHEELS $(ls .whl/huggingface_hub-*.whl)"
    echo "machine's huggingface_hub >= 1.31: $HUB_OK"
    pip install --no-index --no-deps --target "$SITE" $WHEELS 2>&1 | tail -n 3
    export PYTHONPATH="$SITE:$PWD"
    echo "== versions"
    python - <<'EOF'
import importlib

for name in ("torch", "transformers", "accelerate", "huggingface_hub", "datasets", "pyarrow", "pandas", "PIL", "numpy", "simplejpeg"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", error)
import torch

print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | head -n 3
    echo "== gpu_check"
    # 420 s of measurements + start-up, under 8 minutes in all (installing the wheels takes ~10-20 s).
    timeout -k 10 450 python -m benchmarks.gpu_check --output_dir "$OUT" --budget_s 420
    echo "gpu_check exit status $?"
} > "$OUT/device_command.log" 2>&1
tail -n 40 "$OUT/device_command.log"
cat "$OUT/gpu_check.md" 2>/dev/null
