#!/usr/bin/env bash
# One GPU check of mst_compile in two parts of at most 5 minutes each (benchmarks/gpu_check.py): the
# tile-sparse linear against cuBLAS and HSA against flash attention, then a compiled GPT-2-small
# training step (dense vs MST ultra with tiles and unstructured) and the CUDA tests. Output is
# streamed unbuffered; every row is also appended to gpu_check.md (--table) the moment it is measured.
#
#   bash benchmarks/gpu_check.sh --only kernels,attention   # part 1 (on a machine with a CUDA GPU)
#   bash benchmarks/gpu_check.sh --only train,tests         # part 2
#   bash benchmarks/gpu_check.sh --dry-run                  # CPU, tiny sizes: checks the script itself (CI)
#
# Installs nothing: the interpreter is $PYTHON (default python3), with torch (CUDA), Triton and, for
# the onnx section, onnxruntime-gpu already in it.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"  # the table goes to the caller's folder, the code comes from here
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -u "$ROOT/benchmarks/gpu_check.py" "$@"
