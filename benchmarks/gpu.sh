#!/usr/bin/env bash
# Every GPU figure of issues 10, 18 and 21 in one JSON, on one CUDA GPU (random weights from the real SD v1.4, SDXL,
# SD3.5-medium, SD3.5-large and FLUX.1-dev configs: nothing is downloaded). What is measured and in which order:
# benchmarks/gpu_figures.py's docstring; `python benchmarks/gpu_figures.py --list` prints the pieces and the H100 plan.
#
#   bash benchmarks/gpu.sh [OUTPUT_JSON] [gpu_figures.py options]          # default benchmarks/gpu_figures.json
#   bash benchmarks/gpu.sh --smoke [OUTPUT_JSON] [options]                 # tiny configs on a CPU: checks the script
#   bash benchmarks/gpu.sh OUT.json --resume                               # finish a run that was cut short
#
# The script skips a piece that would end past 540 s (its --budget_s) and the whole run is killed at 570 s; the JSON is
# rewritten after every piece, so a cut-short run keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
if [[ "${1:-}" == "--smoke" ]]; then smoke=(--smoke); shift; fi
out="benchmarks/gpu_figures.json"
if [[ $# -gt 0 && "$1" != --* ]]; then out="$1"; shift; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ ${#smoke[@]} -gt 0 ]]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
timeout 570 python benchmarks/gpu_figures.py "${smoke[@]}" --output "$out" "$@"
