# Two commands for a newcomer on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing, installs a CPU torch when none is importable, installs the project
# with its extras, then runs. GPU targets use the python that already has CUDA torch (GPU_PYTHON).

VENV        ?= .venv
PY          := $(VENV)/bin/python
GPU_PYTHON  ?= python3
TORCH_CPU   ?= torch==2.13.0
STAMP       := $(VENV)/.installed
OPS         := adaln attention3d warp performer frame_causal

.PHONY: test demo train-demo demo-report demo-diagnose bench test-gpu build-cuda lint install clean bench-host \
	gpu-evidence import-evidence gpu-image-rehearsal

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

# The fuzz suite with a longer budget than CI's (AVATAR_FUZZ_EXAMPLES=3 by default in `make test`).
FUZZ_EXAMPLES ?= 100
.PHONY: fuzz
fuzz: $(STAMP)
	AVATAR_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) TRITON_INTERPRET=1 $(PY) -m pytest -q -rxX \
		tests/kernels/test_fuzz.py

demo: $(STAMP)
	$(VENV)/bin/avatar-kernels demo --out out

# Rewrites assets/demo/ (checkpoint, loss curve, patch-PCA codec) with the fine-world recipe of
# docs/demo.md: 6000 steps, batch 8, lr 1e-3, seed 0; about an hour on one CPU thread (estimate).
train-demo: $(STAMP)
	$(VENV)/bin/avatar-kernels demo --train

# The fixed evaluation protocol of docs/demo.md (8 held-out pairs, 96 frames, the paper's
# comparison and the floor; add autoregressive to --methods for the extra arm):
demo-report: $(STAMP)
	$(VENV)/bin/avatar-kernels demo --out out-report --pairs 8 --frames 96 \
		--methods anchored,multidiffusion,independent

# Where the demo model loses fidelity (docs/demo.md, "Why the fidelity target is missed"):
# one-step x0 predictions per noise level with true / null / another identity's G; ~40 s.
demo-diagnose: $(STAMP)
	$(PY) -m samplers.demo.diagnose --out docs/demo_results/diagnose.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Compiles csrc/ into kernels/_cuda*.so in place; fails loudly if it cannot (CI runs this where
# nvcc exists, so a broken CUDA source is a red build).
build-cuda: $(STAMP)
	AVATAR_KERNELS_REQUIRE_CUDA_BUILD=1 $(PY) setup.py -q build_ext --inplace

# GPU lane, on a machine with CUDA torch: every backend vs the reference at real shapes, then the
# sanitizer launches and the host-overhead benchmarks (they run on CUDA tensors there).
test-gpu:
	AVATAR_KERNELS_REQUIRE_CUDA_BUILD=1 $(GPU_PYTHON) setup.py -q build_ext --inplace
	$(GPU_PYTHON) -m pytest -q -rs tests/kernels tests/test_bench_host_overhead.py

# bench and bench-host run on the GPU's python where there is a GPU, else in the project venv.
HAS_GPU      := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
BENCH_PYTHON  = $(if $(HAS_GPU),$(GPU_PYTHON),$(PY))
BENCH_DEPS    = $(if $(HAS_GPU),,$(STAMP))

# Every op's benchmarks + the end-to-end model rows -> bench/results/<device>/*.json, tables, PNGs.
# Without a GPU: a reduced sweep (<= 2 min) under bench/results/cpu-<machine>/, wiring only.
# Options: make bench BENCH_ARGS="--op attention3d --quick".
bench: $(BENCH_DEPS)
	$(BENCH_PYTHON) -m bench $(BENCH_ARGS)

# Host-side overhead of every public op (launch swallowed) vs a bare torch call, pytest-benchmark.
# Saved under bench/results/host-overhead/; compare with a saved run by
# `make bench-host BENCH_HOST_ARGS=--benchmark-compare` (or =--benchmark-compare=0001).
bench-host: $(BENCH_DEPS)
	$(if $(HAS_GPU),,TRITON_INTERPRET=1) BENCH_HOST_ROUNDS=20 BENCH_HOST_ITERATIONS=500 \
		$(BENCH_PYTHON) -m pytest -q tests/test_bench_host_overhead.py \
		--benchmark-only --benchmark-autosave --benchmark-storage=bench/results/host-overhead \
		--benchmark-columns=min,median,iqr,rounds --benchmark-sort=name $(BENCH_HOST_ARGS)

# One command for a GPU window (H200: within 9 min): build, GPU test subset, quick sweep + model
# rows, compute-sanitizer; everything in $$OUT (default out/gpu-evidence). GPU_EVIDENCE_DRY_RUN=1
# rehearses every step at smoke size on a CPU. See bench/README.md.
gpu-evidence: $(BENCH_DEPS)
	GPU_PYTHON=$(BENCH_PYTHON) $(BENCH_PYTHON) -m bench.gpu_evidence

# Files a gpu-evidence folder under bench/results/<device>/ and regenerates docs/PERFORMANCE.md.
import-evidence: $(BENCH_DEPS)
	@test -n "$(DIR)" || { echo "usage: make import-evidence DIR=<gpu-evidence folder>"; exit 2; }
	$(BENCH_PYTHON) -m bench.report import $(DIR)

# Builds a venv like the GPU image (Python 3.12, torch 2.11, triton 3.6, numpy 2.5, transformers;
# several GB, kept in ~/.cache) and runs the gpu-evidence dry run in it. Not part of `make test`.
gpu-image-rehearsal:
	bash bench/gpu_image_rehearsal.sh

clean:
	rm -rf build kernels/_cuda*.so out

# Compile-only static profile (no GPU): every Triton kernel variant the launchers use, built for
# sm_90a and sm_80; registers, spills, occupancy, mma kind, loads, fences, atomics, loop sizes
# into bench/static/<arch>.json and .md (issue 15). Cached per kernel source hash.
.PHONY: static-profile
static-profile: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m bench.static_profile

# Rewrites assets/lavieid/ (docs/lavieid.md): the toy LaVieID base model, then the four Table 2
# arms (baseline, router, TAM, both) for fine-tuning seeds 1 and 2, every one trained by
# `avatar-kernels train lavieid` on one CPU thread (about 15 min in all).
.PHONY: train-lavieid
train-lavieid: $(STAMP)
	$(VENV)/bin/avatar-kernels demo lavieid --train

# Rewrites assets/lookahead/ (issue 17): the toy base model, then the lookahead fine-tune and the
# baseline fine-tune from it (same steps, same seed), each compacted to EMA float16 weights.
# Recipe and measured wall times: docs/lookahead.md ("Toy models").
LOOKAHEAD_ASSETS ?= assets/lookahead
LOOKAHEAD_SHAPE  := --config tiny --set input_height=16 --set input_width=16 --set patch=4 \
	--set frames=8 --set hidden=96 --set depth=4 --set heads=4
LOOKAHEAD_MODEL  := --starting-frames 2 --d-max 24 --distance 12 --batch-size 8 \
	--ema-decay 0.99 --no-progress
LOOKAHEAD_COMPACT = $(PY) -c "import sys; from samplers.demo.train import ship_checkpoint; \
	ship_checkpoint(sys.argv[1], keep_training_log=True)"
.PHONY: train-lookahead train-lookahead-base train-lookahead-finetunes
train-lookahead: train-lookahead-base train-lookahead-finetunes
train-lookahead-base: $(STAMP)
	mkdir -p $(LOOKAHEAD_ASSETS)
	OMP_NUM_THREADS=1 $(VENV)/bin/avatar-kernels train lookahead --stage base $(LOOKAHEAD_SHAPE) \
		$(LOOKAHEAD_MODEL) --steps 600 --lr 1e-3 --warmup-steps 30 --seed 0 \
		--out $(LOOKAHEAD_ASSETS)/base.safetensors
	$(LOOKAHEAD_COMPACT) $(LOOKAHEAD_ASSETS)/base.safetensors
train-lookahead-finetunes: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/avatar-kernels train lookahead --stage lookahead \
		$(LOOKAHEAD_MODEL) --init $(LOOKAHEAD_ASSETS)/base.safetensors --steps 300 --lr 5e-4 \
		--warmup-steps 10 --seed 1 --out $(LOOKAHEAD_ASSETS)/lookahead.safetensors
	$(LOOKAHEAD_COMPACT) $(LOOKAHEAD_ASSETS)/lookahead.safetensors
	OMP_NUM_THREADS=1 $(VENV)/bin/avatar-kernels train lookahead --stage base \
		$(LOOKAHEAD_MODEL) --init $(LOOKAHEAD_ASSETS)/base.safetensors --steps 300 --lr 5e-4 \
		--warmup-steps 10 --seed 1 --out $(LOOKAHEAD_ASSETS)/baseline.safetensors
	$(LOOKAHEAD_COMPACT) $(LOOKAHEAD_ASSETS)/baseline.safetensors

# MCDM toy models (docs/mcdm.md, "Toy models"): stages 0-2 shared, stage 3 full and w/o MTA,
# written to assets/mcdm/ by `avatar-kernels train mcdm`; ~15 min on one CPU thread.
.PHONY: train-mcdm sweep-mcdm
train-mcdm: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m samplers.demo.mcdm_train --out assets/mcdm

# Table 8 / Fig. 7: stage 3 per a in {2,4,8,16} and alpha in {0,0.1,0.5,0.9}, seeds 3-5, from
# assets/mcdm/s2.safetensors (23 runs, ~2 min each on one thread; docs/mcdm.md, "Table 8").
sweep-mcdm: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m samplers.demo.mcdm_train --sweep \
		--out out/mcdm-sweep

# Evaluates the sweep-mcdm checkpoints (resumable) into bench/results/cpu/mcdm/table8.json.
.PHONY: sweep-mcdm-eval
sweep-mcdm-eval: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m samplers.demo.mcdm_sweep \
		--sweep-dir out/mcdm-sweep --plot docs/mcdm_results/table8_fig7.png

# Fig. 5 at 1800 frames (docs/mcdm.md): the demo's pre-registered protocol at the paper's length,
# ~80 min on one CPU thread, then the windows fixed before the run into one result json.
.PHONY: fig5-mcdm
fig5-mcdm: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m samplers demo mcdm --frames 1800 \
		--out out/mcdm-fig5
	$(PY) -m bench.mcdm_fig5 out/mcdm-fig5/mcdm_demo.json \
		--out bench/results/cpu/mcdm/fig5_1800.json --plot docs/mcdm_results/fig5_1800.png

# Rewrites assets/warpface/ (issue 18, docs/warpface.md): the Table 3 arms (WarpCA, plain
# cross-attention, WarpCA without timestep modulation) x seeds 0, 1, each 500 steps of the toy
# recipe through `avatar-kernels train warpface`; about 14 min on one CPU thread in all.
.PHONY: train-warpface demo-warpface
train-warpface: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/avatar-kernels demo warpface --train

# The fixed evaluation of docs/warpface.md on the shipped checkpoints -> out/warpface/.
demo-warpface: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/avatar-kernels demo warpface --out out/warpface

# The committed docs/warpface_results/: the same protocol at the issue's full size, 20 driving
# frames per pair and mode (about 25 min on one CPU thread).
.PHONY: eval-warpface
eval-warpface: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/avatar-kernels demo warpface --frames 20 \
		--out out/warpface
