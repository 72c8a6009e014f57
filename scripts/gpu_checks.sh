#!/usr/bin/env bash
# The GPU checks, run on a lent GPU machine (see docs/benchmarks.md): the CUDA parity
# tests and the Llama-7B-shaped benchmarks. Logs go to $OUT (default ./gpu-out).
# Wheels for versions the machine lacks can sit in .whl/ (installed to /tmp/site).
#   bash scripts/gpu_checks.sh [tests|bench|all]   (default all)
set -u
WHAT=${1:-all}
rc=0
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$OUT/machine.txt"
if [ "$WHAT" != bench ]; then
  CNALENS_DEBUG=1 timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    >"$OUT/test_cuda.txt" 2>&1 || rc=1
  tail -n 5 "$OUT/test_cuda.txt"
fi
if [ "$WHAT" != tests ]; then
  set -o pipefail
  timeout 200 $PY benchmarks/head_scan.py --llama7b --device cuda 2>&1 \
    | tee "$OUT/head_scan_llama7b.txt" || rc=1
  timeout 150 $PY benchmarks/neuron_scores.py --llama7b --device cuda 2>&1 \
    | tee "$OUT/neuron_scores_llama7b.txt" || rc=1
fi
exit $rc
