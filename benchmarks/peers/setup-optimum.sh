#!/usr/bin/env bash
# Make the optimum-intel peer's own venv (default .venv-optimum at the repository root, git-ignored):
#   bash benchmarks/peers/setup-optimum.sh [VENV_DIR]
# optimum-intel[openvino] 2.2.0 needs torch (here 2.14.1, a CUDA build: ~5.6 GB in the venv) and
# transformers 5.5.4, and its huggingface-hub < 1.22 rules out diffusers 0.42 (the project's), so it
# takes diffusers 0.39.0. None of that may enter the project env, pinned to torch 2.13.0 CPU.
# openvino-genai and openvino-tokenizers (the openvino.genai peer of `python -m benchmarks --fewstep`,
# benchmarks/peers/genai_worker.py) are pinned to the OpenVINO release optimum-intel pulls and the project
# uses (2026.4.1): each genai / tokenizers release is built against one OpenVINO release.
# The suite finds the venv by itself (python -m benchmarks --peers optimum optimum-f32), or takes
# --optimum-python PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-optimum}"
python -m venv "$venv"
"$venv/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 \
    "optimum-intel[openvino,diffusers]==2.2.0" "diffusers==0.39.0" \
    "openvino==2026.4.1" "openvino-genai==2026.4.1.0" "openvino-tokenizers==2026.4.1.0"
"$venv/bin/python" -c "import optimum.intel, diffusers, openvino, openvino_genai, openvino_tokenizers
print('optimum-intel venv ready:', '$venv', 'openvino', openvino.__version__, 'genai', openvino_genai.__version__)"
du -sh "$venv"
