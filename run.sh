#!/usr/bin/env bash
# janus_rt's two entry points; each does all set-up on a fresh machine first (idempotent).
#   ./run.sh demo   generate images with the embedded default model (offline, CPU or GPU)
#   ./run.sh test   the test suite (CPU: Triton kernels run through the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
  # torch pinned where none is installed: on this project's machines the pin resolves to the CPU build from their
  # local package index (an unpinned torch pulls a multi-GB CUDA build); on public PyPI add
  # --index-url https://download.pytorch.org/whl/cpu for the CPU build
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
  fi
  "$PY" -m pip install -q -e '.[test]'
}

case "${1:-}" in
  demo)
    setup
    shift
    "$PY" -m janus_rt.cli generate --prompt "a red circle on a blue background" -n 4 --out out/demo "$@"
    ;;
  test)
    setup
    shift
    "$PY" -m pytest -q tests "$@"
    ;;
  *)
    echo "usage: ./run.sh demo|test [extra args]" >&2
    exit 2
    ;;
esac
