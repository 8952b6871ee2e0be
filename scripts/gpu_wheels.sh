#!/usr/bin/env bash
# The pure-Python wheels benchmarks/gpu_check.py installs offline on a GPU machine whose image
# has torch, timm, onnx and onnxruntime but not the test runner or the export's graph tools:
#   bash scripts/gpu_wheels.sh            # -> .whl/ (git-ignored; a few MB)
#   python benchmarks/gpu_check.py --out DIR --wheels .whl     # on the GPU machine
# The versions are the ones this checkout's .venv has, so the GPU run tests what CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${1:-.whl}
pkgs=$("$PY" - <<'PY'
import importlib.metadata as md
import sys
sys.path.insert(0, "benchmarks")
from gpu_check import WHEELS
print(" ".join(f"{n}=={md.version(n)}" for n in WHEELS))
PY
)
mkdir -p "$DEST"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" $pkgs
ls -1 "$DEST"
