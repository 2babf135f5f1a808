# Two commands for a newcomer on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing, installs a CPU torch when none is importable, installs the project
# with its extras, then runs. GPU targets use the python that already has CUDA torch (GPU_PYTHON).

VENV        ?= .venv
PY          := $(VENV)/bin/python
GPU_PYTHON  ?= python3
TORCH_CPU   ?= torch==2.13.0
STAMP       := $(VENV)/.installed
OPS         := adaln attention3d warp performer frame_causal

.PHONY: test demo train-demo bench test-gpu build-cuda lint install clean

$(PY):
	python3 -m venv $(VENV)

# Reinstall when the package metadata or the pins change.
$(STAMP): pyproject.toml constraints.txt setup.py | $(PY)
	$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11 cmake
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	AVATAR_KERNELS_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q --no-build-isolation \
		-c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

# The CPU lane: every Triton kernel runs in Triton's interpreter against its reference.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -rs tests

demo: $(STAMP)
	$(VENV)/bin/avatar-kernels demo --out out

# Reproduces assets/demo/ (the bundled checkpoint, its loss curve and the patch-PCA codec):
# 5000 steps, batch 8, lr 1e-3, seed 0; about 18 minutes on one CPU thread.
train-demo: $(STAMP)
	$(VENV)/bin/avatar-kernels demo --train

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Compiles csrc/ into kernels/_cuda*.so in place; fails loudly if it cannot (CI runs this where
# nvcc exists, so a broken CUDA source is a red build).
build-cuda: $(STAMP)
	AVATAR_KERNELS_REQUIRE_CUDA_BUILD=1 $(PY) setup.py -q build_ext --inplace

# GPU lane, on a machine with CUDA torch: every backend vs the reference at real shapes.
test-gpu:
	AVATAR_KERNELS_REQUIRE_CUDA_BUILD=1 $(GPU_PYTHON) setup.py -q build_ext --inplace
	$(GPU_PYTHON) -m pytest -q -rs tests/kernels

bench:
	@for op in $(OPS); do $(GPU_PYTHON) -m bench.bench_$$op || exit 1; done

clean:
	rm -rf build kernels/_cuda*.so out

# Compile-only static profile (no GPU): every Triton kernel variant the launchers use, built for
# sm_90a and sm_80; registers, spills, occupancy, mma kind, loads, fences, atomics, loop sizes
# into bench/static/<arch>.json and .md (issue 15). Cached per kernel source hash.
.PHONY: static-profile
static-profile: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m bench.static_profile
