#!/usr/bin/env bash
# Every GPU figure of issue 10 in one JSON, on one CUDA GPU, in under 8 minutes (random weights from the real
# SD v1.4 / SDXL configs: nothing is downloaded). What is measured: benchmarks/gpu_figures.py's docstring.
#
#   bash benchmarks/gpu.sh [OUTPUT_JSON]          # default benchmarks/gpu_figures.json
#   bash benchmarks/gpu.sh --smoke [OUTPUT_JSON]  # tiny configs on a CPU: checks the script in about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
if [[ "${1:-}" == "--smoke" ]]; then smoke=(--smoke); shift; fi
out="${1:-benchmarks/gpu_figures.json}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[[ ${#smoke[@]} -gt 0 ]] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# 7.5 minutes at most; the JSON is rewritten after every measurement, so a cut-short run keeps what it measured.
timeout 450 python benchmarks/gpu_figures.py "${smoke[@]}" --output "$out"
echo "figures: $out"
