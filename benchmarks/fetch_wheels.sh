#!/usr/bin/env bash
# Fetch (here, where pip reaches the package index) the pure-Python wheels the GPU machine lacks for the test
# suite: hydra-core, omegaconf, antlr4-python3-runtime (only an sdist upstream: built into a wheel here) and
# mlxtend. The bench itself needs none of them. They land in .whl/ (git-ignored);
# benchmarks/run_gpu.sh installs them there when .whl/ exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -m pip wheel -q --no-deps -w .whl hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
    mlxtend==0.23.4
ls -la .whl
