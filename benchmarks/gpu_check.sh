#!/usr/bin/env bash
# The GPU check, in one command, on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh [benchmarks.gpu_throughput options]
# 1. installs what is missing: wheels from ./.whl when that folder exists (a machine with
#    no package index), else pip installs the package's test and bench extras.
#    On a CUDA image that has torch, numpy, scipy, pandas, h5py, sklearn, matplotlib,
#    lightning, jax and numba but no index, these py3.12 wheels (pip download --no-deps
#    --only-binary=:all: --python-version 3.12 ...; docrep has no wheel: pip wheel it) are
#    what its package list lacks (not yet tried there): pyro-ppl 1.9.2, pyro-api 0.1.2, anndata 0.12.19, array-api-compat
#    1.16.0, legacy-api-wrap 1.5, natsort 8.4.0, scverse-misc 0.0.3, zarr 3.1.6, numcodecs
#    0.16.6, donfig 0.8.1.post1, google-crc32c 1.9.0, arviz 0.23.4, h5netcdf 1.8.2,
#    xarray-einstats 0.9.1, platformdirs 4.14.8, scvi-tools 1.4.2, docrep 0.3.2,
#    ml_collections 1.1.0, mudata 0.3.10, session-info2 0.4.1, sparse 0.19.3, scanpy
#    1.11.5, pynndescent 0.7.0, umap-learn 0.5.12 (16 MB together);
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
