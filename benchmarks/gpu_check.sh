#!/usr/bin/env bash
# One GPU check of mst_compile, under 8 minutes on one GPU: the CUDA tests, then HSA vs flash SDPA,
# a GPT-2-small-shaped bf16 training step under torch.compile (dense vs MST ultra) and onnxruntime-gpu
# latency, printed as one table (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh             # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes: checks the script itself (CI)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# the CUDA tests (skipped without a GPU); their summary line goes into the table
log=$(mktemp)
timeout 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_attention_residue.py \
    tests/test_device.py tests/test_export_provider.py >"$log" 2>&1
status=$?
tail -n 30 "$log"
summary=$(grep -E '(passed|failed|skipped|error|deselected)' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
rm -f "$log"
[ $status -eq 124 ] && summary="timed out after 240 s: $summary"

"$PY" benchmarks/gpu_check.py --tests "${summary:-no summary (exit $status)}" "$@"
bench=$?
# exit 5: pytest collected nothing to run, which is what a CPU-only machine gives
if [ $status -ne 0 ] && [ $status -ne 5 ]; then exit $status; fi
exit $bench
