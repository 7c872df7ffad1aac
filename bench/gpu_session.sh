#!/usr/bin/env bash
# A lent GPU session in one call (the device tool runs this from the repository root; $OUT comes back):
#   janus_rt used in place, with no install (nothing can be fetched there, and the C++ extension serves only the CPU
#   path): janus_rt/kernels linked to kernels/ as setup.py maps it, the repository root on PYTHONPATH; the GPU's and
#   the packages' facts; then bench/run_gpu.py --generate inside BUDGET seconds (default 540: with a 1-2 minute start, one call fits
#   the 15 minutes of device time a session gets, with a little left), its markdown
#   rewritten after every section so a cut-short call still returns what finished.
#   Usage: bash bench/gpu_session.sh [BUDGET]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/gpu_out}
BUDGET=${1:-540}
mkdir -p "$OUT"
export OUT
start=$(date +%s)
[ -e janus_rt/kernels ] || ln -s ../kernels janus_rt/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.txt"
"$PY" -c "import janus_rt, janus_rt.kernels, torch, triton, transformers; print('janus_rt', janus_rt.__file__,
'| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__,
'| cuda', torch.cuda.is_available())" 2>&1 | tee "$OUT/versions.txt"
left=$(( BUDGET - ($(date +%s) - start) ))
"$PY" bench/run_gpu.py --generate --budget "$left" --out "$OUT/gpu_results.md"
tail -40 "$OUT/gpu_results.md" 2>/dev/null
