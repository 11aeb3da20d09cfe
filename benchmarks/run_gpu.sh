#!/usr/bin/env bash
# The one command a GPU session runs for issue 6 ("GPU speed"):
#   bash benchmarks/run_gpu.sh [extra biasamp.bench options, e.g. --workloads train_bmnist,sample_bmnist]
# 1. the gpu-marked tests (bf16 vs fp32 D, compiled vs eager; skipped without CUDA);
# 2. the benchmark, plain vs fast path for every workload, table on stdout and JSON with device, torch
#    version and date.
# Outputs go to $OUT (default benchmarks/results): gpu-tests-<date>.log, bench-<date>.json, bench-<date>.md.
# The whole benchmark takes several minutes (compile warm-up included); split it with --workloads when a
# session limits one command's time.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
# a bare GPU machine: biasamp from this checkout, and the wheels of benchmarks/fetch_wheels.sh (hydra-core,
# omegaconf, antlr4, mlxtend: the tests need them, the bench does not) when .whl/ was carried along
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! "$PY" -c "import hydra, omegaconf, mlxtend" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
stamp=$(date -u +%Y-%m-%d-%H%M)
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests-$stamp.log"
"$PY" -m biasamp.bench --profile --out "$OUT/bench-$stamp.json" "$@" | tee "$OUT/bench-$stamp.md"
