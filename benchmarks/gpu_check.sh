#!/usr/bin/env bash
# The GPU check, in one command, on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh [benchmarks.gpu_throughput options]
# 1. installs what is missing: wheels from ./.whl when that folder exists (a machine with
#    no package index: the py3.12 wheels its image lacks, e.g. pyro-ppl, anndata and
#    scvi-tools with their dependencies), else pip installs the test and bench extras;
# 2. runs the GPU tests (tests/test_gpu.py, skipped on machines without a GPU);
# 3. runs python -m benchmarks.gpu_throughput (pyro_scvi and scvi-tools, 100k and 1M x 2,000).
# Results go to $RESULTS_DIR (default benchmarks/results): gpu_tests.log,
# gpu_throughput.json and gpu_throughput.md.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS_DIR"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    "$PY" -m pip install -q -e ".[test,bench]" || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS_DIR/gpu_tests.log"
"$PY" -c "import torch, pyro, pyro_scvi; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyro', pyro.__version__)" | tee -a "$RESULTS_DIR/gpu_tests.log"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee -a "$RESULTS_DIR/gpu_tests.log"
tests=${PIPESTATUS[0]}
"$PY" -m benchmarks.gpu_throughput --out "$RESULTS_DIR" "$@"
bench=$?
echo "gpu tests exit $tests, throughput exit $bench"
exit $(( tests != 0 || bench != 0 ))
