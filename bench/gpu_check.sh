#!/usr/bin/env bash
# kiln's GPU check on a machine that brings its own torch (the lent GPU machine, an NGC container):
# kiln's other dependencies are installed from a wheel directory into a throw-away target directory,
# and kiln runs from this working tree through PYTHONPATH (it is not pip-installed).
#
#   bench/gpu_check.sh [gpu_check.py options]        e.g. --budget-s 540 (a 10-minute call)
#
# WHEELS: the wheel directory (default .whl, made by ../shared/gpu/fetch-wheels.sh on a networked
# machine). PYTHON: the interpreter whose torch to use (default python3). The report goes to
# $OUT/gpu_check.json when OUT is set (the device tool's output folder), else runs/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
# --no-deps: pip must not replace the machine's torch (nor fetch anything: --no-index).
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: no NVIDIA GPU or driver here"
"$python" bench/gpu_check.py --out "${OUT:-runs}/gpu_check.json" "$@"
