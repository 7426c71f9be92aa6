#!/usr/bin/env bash
# Make the stable-diffusion.cpp peer's own venv (default .venv-sdcpp at the repository root, git-ignored):
#   bash benchmarks/peers/setup-sdcpp.sh [VENV_DIR]
# stable-diffusion-cpp-python 0.4.7 is a source distribution: pip builds stable-diffusion.cpp and
# ggml with cmake (CPU backend, default flags, i.e. GGML_NATIVE: -march=native, so the library fits
# the machine that built it). About 9 minutes on 2 cores. SDCPP_SOURCE may name a downloaded sdist
# instead of the PyPI release. Its own venv keeps the compiled library out of the project env.
# The suite finds the venv by itself (python -m benchmarks --peers sdcpp), or takes --sdcpp-python PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-sdcpp}"
python -m venv "$venv"
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$venv/bin/python" -m pip install numpy "${SDCPP_SOURCE:-stable-diffusion-cpp-python==0.4.7}"
"$venv/bin/python" -c "import stable_diffusion_cpp; print('stable-diffusion.cpp venv ready:', '$venv')"
du -sh "$venv"
