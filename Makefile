# One entry point for setting up and running everything, on a fresh machine.
#   make demo   - create .venv, install pins + FFmpeg, build the C++ extension, run the FitCLIP demo
#   make test   - the same set-up, then the test suite
#   make bench  - the CPU benchmarks (pytest-benchmark), results under benchmarks/results/
#   make aot    - compile every shipped Triton kernel for sm_80/sm_90 without a GPU
#   make aot-triton36 - the same with Triton 3.6 (the GPU test machine's) in .triton36/
#   make gpu-check - on a CUDA machine: the GPU correctness check and benchmarks

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Pins verified on the development machine (see README "Install").
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEPS := "torchcodec>=0.14,<0.18" "open_clip_torch==3.3.0" "pytest>=8" "pytest-benchmark>=4" \
        "pybind11>=2.12" "ninja" "cmake>=3.25" "setuptools>=64" "wheel" "numpy" "tqdm" \
        "safetensors" "matplotlib" \
        "pandas" "webdataset" "braceexpand"  # open_clip_train's data loading (fitclip_ext.open_clip_train)
PYTEST_ARGS ?=

.PHONY: setup deps ffmpeg build test demo bench aot aot-triton36 gpu-check clean

setup: $(VENV)/.deps-stamp ffmpeg build

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q $(DEPS)
	touch $@

ffmpeg:
	@if ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so'; then \
	  echo "FFmpeg shared libraries found"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  echo "Installing FFmpeg (needed by torchcodec)"; \
	  (apt-get install -y -qq ffmpeg >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null)); \
	else \
	  echo "WARNING: FFmpeg's shared libraries (libavcodec etc.) are missing and cannot be installed here"; \
	  echo "         (not root or no apt-get). Video decoding will fail until you install them, e.g."; \
	  echo "         'sudo apt-get install ffmpeg' or 'conda install -c conda-forge ffmpeg'."; \
	fi

build: $(VENV)/.deps-stamp
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: setup
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# The main job: FitCLIP on a synthetic video world, offline on a CPU (about 2-3 minutes).
demo: setup
	$(PY) -m fitclip_ext.demo --out demo_out

bench: setup
	$(PY) -m pytest benchmarks -q -s $(PYTEST_ARGS)
	$(PY) -m benchmarks.report > /dev/null && echo "tables: benchmarks/README.md"

aot: setup
	env -u TRITON_INTERPRET $(PY) -m fitclip_ext.kernels.aot

# Register budgets differ between Triton versions: the shipped configurations must not spill
# with the GPU machine's Triton 3.6 either (installed beside the venv's, no torch needed).
aot-triton36: setup
	test -d .triton36/triton || $(PIP) install -q --no-deps --target .triton36 triton==3.6.0
	env -u TRITON_INTERPRET PYTHONPATH=.triton36 $(PY) -m fitclip_ext.kernels.aot

# On a CUDA machine: Triton kernels vs float64 on the GPU, then the GPU benchmarks.
gpu-check:
	PYTHON=$(PY) benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info fitclip_ext/_C*.so
