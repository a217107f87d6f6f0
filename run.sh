#!/usr/bin/env bash
# The two commands a fresh machine needs; both install into .venv first if needed.
#   ./run.sh demo [ARGS]   start a local cluster, run sample prompts through it, stop it
#   ./run.sh test [ARGS]   run the test suite (ARGS go to pytest)
#   ./run.sh kvmesh ARGS   any other kvmesh command, e.g. ./run.sh kvmesh serve
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-}
[ $# -gt 0 ] && shift
case "$what" in
    demo)   scripts/bootstrap.sh && exec .venv/bin/kvmesh demo "$@" ;;
    test)   scripts/bootstrap.sh && exec .venv/bin/python -m pytest "$@" ;;
    kvmesh) scripts/bootstrap.sh && exec .venv/bin/kvmesh "$@" ;;
    *) echo "usage: ./run.sh demo|test|kvmesh [ARGS]" >&2; exit 2 ;;
esac
