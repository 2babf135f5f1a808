#!/usr/bin/env bash
# Builds a virtualenv that matches the GPU image (Python 3.12, torch 2.11 + CUDA 13 wheel from PyPI,
# triton 3.6, numpy 2.5, transformers 5.17, pytest-benchmark, setuptools, pybind11, cmake, ninja; no
# diffusers, mediapipe, av or matplotlib) and runs the gpu-evidence dry run in it, so that an import
# error shows up here and not in the first GPU window. The venv lives outside the working tree (it
# is several GB: PyPI's torch 2.11 for Linux is the CUDA build and pulls the CUDA runtime wheels,
# as the image has them) and is reused on later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GPU_IMAGE_VENV:-$HOME/.cache/avatar-kernels/gpu-image-venv}"
python312="${GPU_IMAGE_PYTHON:-$(pyenv root 2>/dev/null)/versions/$(pyenv latest 3.12 2>/dev/null)/bin/python}"
if [ ! -x "$venv/bin/python" ]; then
  [ -x "$python312" ] || { echo "gpu-image-rehearsal: no Python 3.12 (set GPU_IMAGE_PYTHON)"; exit 2; }
  "$python312" -m venv "$venv"
fi
if [ ! -f "$venv/.installed" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # The image's packages, nothing else: what the code needs beyond them must travel as wheels.
  "$venv/bin/python" -m pip install -q "torch==2.11.*" "triton==3.6.*" "numpy==2.5.*" \
    "transformers==5.17.*" pytest-benchmark pybind11 cmake ninja setuptools wheel safetensors tqdm
  touch "$venv/.installed"
fi
"$venv/bin/python" -c "import sys, torch, triton, numpy; print('gpu-image venv: python',
sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy',
numpy.__version__)"
out="${OUT_DIR:-out/gpu-image-rehearsal}"
rm -rf "$out" && mkdir -p "$out"
# Triton 3.6's interpreter fails with numpy >= 2.4 (triton-lang/triton#9171); the GPU never
# interprets, so here the Triton rows and launches are skipped (with the registry's reason) and
# everything else runs: imports, collection, the build, the baselines and model rows.
GPU_EVIDENCE_INTERPRET=0 GPU_EVIDENCE_DRY_RUN=1 GPU_PYTHON="$venv/bin/python" OUT="$out" "$venv/bin/python" -m bench.gpu_evidence
