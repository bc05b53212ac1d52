#!/usr/bin/env bash
# The one command a session lent a GPU hands to the device tool (see benchmarks/RESULTS.md, "GPU check"):
#     bash benchmarks/gpu_check.sh [extra gpu_model.py arguments]
# Prints the GPU and the torch/CUDA versions, then runs benchmarks/gpu_model.py (MAE ViT-B/16 and, time
# allowing, ViT-L/16 training steps, ours beside a timm-built reference). Everything goes under $OUT when set
# (the device tool brings that folder back), else ./gpu_check_out. Without CUDA it runs the CPU --smoke mode.
# PYTHON picks the interpreter (default python3, which is the device machine's torch environment).
set -euo pipefail
export PYTHONUNBUFFERED=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEST="${OUT:-gpu_check_out}"
mkdir -p "$DEST"

# one torch import for the versions and the CUDA probe: its exit status says whether a GPU is there
cuda=0
{
    date -u
    uname -a
    if command -v nvidia-smi >/dev/null; then nvidia-smi || true; else echo "nvidia-smi: not found"; fi
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda",
torch.version.cuda, "| cudnn", torch.backends.cudnn.version(), "| cuda available", torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() else 3)' || cuda=$?
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"

if [ "$cuda" = 0 ]; then
    # ~8 s of timed steps per row; compilation dominates. The budget stops new rows after 240 s so the whole
    # command ends well inside a 540 s device call; the JSON is rewritten after every row, so a cut run keeps its rows.
    mode=(--budget-s 240)
elif [ "$cuda" = 3 ]; then
    echo "no CUDA device: running the CPU --smoke mode (tiny shapes; these figures say nothing about a GPU)"
    mode=(--smoke)
else
    echo "gpu_check: '$PY' could not import torch (exit $cuda); set PYTHON to an interpreter that has it" >&2
    exit 2
fi
"$PY" "$ROOT/benchmarks/gpu_model.py" "${mode[@]}" --json "$DEST/gpu_model.json" "$@" 2>&1 | tee "$DEST/gpu_model.log"

if command -v nvidia-smi >/dev/null; then
    # clocks, power and temperature after the run: a throttled card would explain low figures
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,memory.used \
        --format=csv 2>&1 | tee "$DEST/nvidia_smi_after.csv"
fi
echo "gpu_check: results in $DEST"
