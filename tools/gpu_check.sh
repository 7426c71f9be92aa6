#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py), unattended, on a machine with an NVIDIA GPU and no network:
#   bash tools/gpu_check.sh [--budget-s 420] [--routes ...]     (arguments go to python -m benchmarks.gpu)
# Uses whatever subset of torch (CUDA), onnxruntime-gpu and TensorRT the Python environment has; writes
# benchmarks/results/gpu-check-<model>-<size>-<gpu>.json and .md (rewritten after every route). Stops
# after 8 minutes at the latest; what was measured by then is in the report.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "gpu_check: nvidia-smi not found (the report says what the CUDA runtime sees)"
# The PyTorch reference engine reaches the runtime through this project's entry point: register it
# (offline: no dependencies, no build isolation) where the project is not installed yet.
if ! "$PYTHON" -c "from importlib.metadata import entry_points as e; import sys; \
sys.exit(not any(p.name == 'torch' for p in e(group='sd_runtime.engines')))" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . \
        || echo "gpu_check: could not register the project (pip install -e .); the torch routes will be skipped"
fi
exec timeout --signal=TERM --kill-after=20 480 "$PYTHON" -m benchmarks.gpu "$@"
