#!/usr/bin/env bash
# The GPU half of the benchmark suite, in one short script for a session lent a CUDA device:
# benchmarks/gpu_bench.py on a ~1B Llama in bf16 (its docstring lists what it measures:
# LoRA and QLoRA training beside HF PEFT and the floor, mixed-adapter decoding, compiled
# against eager, `peftkit train --task causal-lm --bf16` with and without gradient
# checkpointing). About 3-4 minutes on an H200; sections not started after --budget seconds
# (270) are skipped. Results: ${OUT:-benchmarks/results}/gpu_bench.json (written after every
# section; gpu_bench_tiny.json with SMOKE=1).
#
# Needs python3 with torch (CUDA), transformers and peft; runs peftkit from the tree
# (PYTHONPATH=src). bitsandbytes, when it is not importable, is installed from its wheel, which
# travels with the tree: $BNB_WHEEL, else benchmarks/wheels/bitsandbytes-*.whl. That directory
# is git-ignored (43 MB): hand it to the device run with carry ["benchmarks/wheels"]; fetch it
# on a machine with the package index with
#   pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: \
#       --platform manylinux_2_24_x86_64 --python-version 3.12 -d benchmarks/wheels
# (the wheel is py3-none: any CPython 3; CUDA 11.8-13.2 kernels inside). Without a wheel the
# QLoRA rows are skipped and the JSON says why.
#
#   benchmarks/gpu_check.sh [gpu_bench.py options]     # on the GPU machine, from anywhere
#   SMOKE=1 PYTHON=.venv/bin/python benchmarks/gpu_check.sh   # the tiny CPU version (a check of the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

if ! "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
    WHEEL=${BNB_WHEEL:-$(ls benchmarks/wheels/bitsandbytes-*.whl 2>/dev/null | sort | tail -n 1 || true)}
    if [ -n "$WHEEL" ] && [ -f "$WHEEL" ]; then
        BNB_DIR=${BNB_DIR:-${TMPDIR:-/tmp}/peftkit-bnb}
        rm -rf "$BNB_DIR"
        mkdir -p "$BNB_DIR"
        # A wheel is a zip of the files as installed (package and .dist-info): unpacking it
        # onto the path installs it, with no pip and no package index.
        "$PY" -m zipfile -e "$WHEEL" "$BNB_DIR"
        export PYTHONPATH="$BNB_DIR${PYTHONPATH:+:$PYTHONPATH}"
        "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__, 'from $WHEEL')"
    else
        echo "gpu_check: bitsandbytes is not installed and there is no wheel (\$BNB_WHEEL or" \
             "benchmarks/wheels/bitsandbytes-*.whl): the QLoRA rows will be skipped" >&2
    fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if [ "${SMOKE:-0}" = 1 ]; then
    exec "$PY" benchmarks/gpu_bench.py --tiny --device cpu "$@"
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
exec "$PY" benchmarks/gpu_bench.py --device cuda "$@"
