#!/usr/bin/env bash
# The GPU tier's checks, for a machine where torch sees a CUDA GPU (no vLLM needed):
# its tests on the device, then `kvmesh bench store --json` with the host<->device copy
# ceilings. Runs with $PYTHON (default python3, which must have a CUDA build of torch);
# installs what the store itself needs (numpy, xxhash, msgpack, pytest, redis) when missing,
# from the wheels in $KVMESH_WHEELS where set (a machine without a package registry).
#   scripts/gpu_check.sh [BENCH_TOTAL_BYTES]      e.g. scripts/gpu_check.sh 256MiB
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
total=${1:-128MiB}

"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU is usable here")'
if ! "$PYTHON" -c 'import numpy, xxhash, msgpack, pytest, redis' 2>/dev/null; then
    if [ -n "${KVMESH_WHEELS:-}" ]; then
        "$PYTHON" -m pip install -q --no-index --find-links "$KVMESH_WHEELS" numpy xxhash msgpack pytest redis
    else
        "$PYTHON" -m pip install -q numpy xxhash msgpack pytest redis
    fi
fi
echo "kvmesh: GPU tier tests" >&2
"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . && "$PYTHON" -m pytest -q -p no:cacheprovider tests/unit/test_tiered_store.py -k "gpu or cuda" -rs
echo "kvmesh: store benchmark ($total per case)" >&2
"$PYTHON" -m kvmesh.cluster.cli bench store --json --total-bytes "$total"
