#!/usr/bin/env bash
# The commands a GPU session runs for issue 6 ("GPU speed"):
#   bash benchmarks/run_gpu.sh [tests|bench|all] [biasamp.bench options]
# tests: the gpu-marked tests (bf16 vs fp32 D, compiled vs eager, auto batch size; skipped without CUDA);
# bench: the benchmark, plain vs fast path for every workload (or --workloads ...), a table on stdout and JSON
#        with device, torch version and date; all (the default): both.
# Outputs go to $OUT (default benchmarks/results): device-<stamp>.txt, gpu-tests-<stamp>.log,
# bench-<stamp>.json, bench-<stamp>.md (the table) and bench-<stamp>.log (progress, profiles, tracebacks).
# The JSON is rewritten after every workload, so a command cut off by a time limit keeps what it measured;
# `--resume <earlier bench JSON>` runs only the workloads that JSON lacks and writes one report with all of them.
# A whole benchmark takes roughly 15-20 minutes on an H100 (compile warm-up included): under a 10-minute limit
# per command, split it, e.g. `bench --workloads train_bmnist,train_64,train_32`, then
# `bench --resume <that JSON>` (see benchmarks/NOTES.md, "Running it").
set -euo pipefail
cd "$(dirname "$0")/.."
phase=all
case "${1:-}" in
  tests|bench|all) phase=$1; shift ;;
esac
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
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/device-$stamp.txt"
rc=0  # a failing test does not stop the bench, nor a failed workload the others; the exit status says so
if [ "$phase" != bench ]; then
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests-$stamp.log" || rc=$?
fi
if [ "$phase" != tests ]; then
  # the table to bench-<stamp>.md; progress, profiles and any traceback also to bench-<stamp>.log
  "$PY" -m biasamp.bench --profile --out "$OUT/bench-$stamp.json" "$@" 2> >(tee "$OUT/bench-$stamp.log" >&2) \
    | tee "$OUT/bench-$stamp.md" || rc=$?
fi
exit $rc
