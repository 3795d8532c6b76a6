# One entry point for setting up and running everything, on a fresh machine.
#   make demo   - create .venv, install pins + FFmpeg, build the C++ extension, run the FitCLIP demo
#   make test   - the same set-up, then the test suite
#   make test-fast - the edit-test loop (a few minutes on a set-up venv): see docs/TESTING.md
#   make bench  - the CPU benchmarks (pytest-benchmark), results under benchmarks/results/
#   make aot    - compile every candidate Triton kernel configuration for sm_80/sm_90 without a GPU (make test compiles the defaults)
#   make aot-triton36 - the same with Triton 3.6 (the GPU test machine's) in .triton36/
#   make test-gpu-stack - the Triton tests (interpreter) on the GPU machine's torch 2.11 + Triton 3.6
#   make wheels    - the fused-loss peers' pure-Python wheels into .whl/ (carried to the GPU machine)
#   make gpu-stack-check - gpu_check.sh --tiny exactly as a device call runs it: the device's stack
#                    (torch 2.11, Triton 3.6, no open_clip), an export of HEAD, the wheels in .whl/
#   make gpu-check - on a CUDA machine: the GPU correctness check and benchmarks

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Pins verified on the development machine (see README "Install").
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEPS := "torchcodec>=0.14,<0.18" "open_clip_torch==3.3.0" "pytest>=8" "pytest-benchmark>=4" "pytest-xdist>=3" \
        "pybind11>=2.12" "ninja" "cmake>=3.25" "setuptools>=64" "wheel" "numpy" "tqdm" \
        "safetensors" "matplotlib" "flask>=3" "waitress>=3" "selenium>=4.20" \
        "pandas" "webdataset" "braceexpand" \
        "transformers==5.25.0"  # pandas..braceexpand: open_clip_train's data loading; transformers: the HF drop-in test
PYTEST_ARGS ?=

.PHONY: setup deps ffmpeg browser build test test-fast demo bench aot aot-triton36 test-gpu-stack gpu-stack-venv wheels \
        gpu-stack-check gpu-check clean

setup: $(VENV)/.deps-stamp ffmpeg browser build

# torch's CUDA build and its libraries take about 6 GB in the venv: say so before pip runs out of
# space half-way (a warning, not a refusal: pip may still fit).
NEED_GB := 7
$(VENV)/.deps-stamp: Makefile  # (re-run when the pins or the dependency list change)
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ -n "$$free" ] && [ "$$free" -lt $(NEED_GB) ]; then \
	  echo "WARNING: $$free GB free on the disk holding $(VENV); the set-up needs about $(NEED_GB) GB" \
	       "(torch 2.14.1 with its CUDA libraries). pip will fail with 'No space left on device' if it runs out."; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS) $(DEPS)
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

# Debian's chromium and its driver for the search page's browser test (skipped, saying why, without them).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "chromium and chromedriver found"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  echo "Installing chromium and chromium-driver (the browser test of fitclip serve)"; \
	  (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)) || \
	  echo "WARNING: could not install chromium; the browser test will be skipped"; \
	else \
	  echo "NOTE: chromium/chromedriver missing and not installable here (not root or no apt-get);" \
	       "the browser test of fitclip serve will be skipped"; \
	fi

build: $(VENV)/.deps-stamp
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: setup
	$(PY) -m pytest tests -q -n auto $(PYTEST_ARGS)

# The edit-test loop on a set-up venv: every op on every backend and dtype against float64 (the
# first shapes of each), validation, the command line and the trainer's unit tests; the build,
# packaging, ahead-of-time, browser, GPU-script and end-to-end tests (marked slow) are left to make test.
test-fast:
	@test -x $(PY) || (echo "make test-fast runs on a set-up venv: run make setup (or make test) first" && exit 2)
	$(PY) -m pytest tests -q -n auto --fast $(PYTEST_ARGS)

# The main job: FitCLIP on a synthetic video world, offline on a CPU (about 2-3 minutes).
demo: setup
	$(PY) -m fitclip_ext.demo --out demo_out

bench: setup
	$(PY) -m pytest benchmarks -q -s $(PYTEST_ARGS)
	$(PY) -m benchmarks.report > /dev/null && echo "tables: benchmarks/README.md"

aot: setup
	env -u TRITON_INTERPRET $(PY) -m fitclip_ext.kernels.aot --scope all

# Register budgets differ between Triton versions: the shipped configurations must not spill
# with the GPU machine's Triton 3.6 either (installed beside the venv's, no torch needed).
aot-triton36: setup
	test -d .triton36/triton || $(PIP) install -q --no-deps --target .triton36 triton==3.6.0
	env -u TRITON_INTERPRET PYTHONPATH=.triton36 $(PY) -m fitclip_ext.kernels.aot --scope all

# The GPU test machine runs torch 2.11 and Triton 3.6: the Triton tests through the interpreter
# on that stack, in .venv-gpu-stack (about 4 GB), from a clean export of HEAD (no C++ extension
# built for another torch). numpy < 2.4: Triton 3.6's interpreter converts 1-element arrays to
# Python ints, which numpy 2.4 refuses.
GPU_STACK := .venv-gpu-stack
gpu-stack-venv:
	test -x $(GPU_STACK)/bin/python || ($(PYTHON) -m venv $(GPU_STACK) && \
	  $(GPU_STACK)/bin/pip install -q torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest pytest-benchmark)

test-gpu-stack: gpu-stack-venv
	rm -rf $(GPU_STACK)/src && mkdir -p $(GPU_STACK)/src && git archive HEAD | tar -x -C $(GPU_STACK)/src
	cd $(GPU_STACK)/src && PYTHONPATH=. FITCLIP_ALLOW_NO_CPP=1 TRITON_INTERPRET=1 ../bin/python -m pytest \
	  tests/test_contrastive.py tests/test_distill.py tests/test_triton_ops.py tests/test_frames.py \
	  tests/test_sigmoid.py -q -k triton -p no:cacheprovider -W ignore::DeprecationWarning $(PYTEST_ARGS)

# The peers the GPU check runs beside ours: pure-Python wheels (no network on the GPU machine).
PEER_WHEELS := open_clip_torch==3.3.0 inf-cl==1.2.1 memeff==0.3.1 siglip-kernel==0.1.2
wheels:
	mkdir -p .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl $(PEER_WHEELS)

# What a device call does, here: the device's stack, a clean export of HEAD with .whl/ beside it,
# gpu_check.sh --tiny, then the results checked (finished, every section, every peer named).
gpu-stack-check: gpu-stack-venv wheels
	rm -rf $(GPU_STACK)/check && mkdir -p $(GPU_STACK)/check/out && git archive HEAD | tar -x -C $(GPU_STACK)/check
	cp -r .whl $(GPU_STACK)/check/.whl
	cd $(GPU_STACK)/check && OUT=out PYTHON=../bin/python FITCLIP_COMMIT=$$(git rev-parse --short HEAD) \
	  bash benchmarks/gpu_check.sh --tiny
	cd $(GPU_STACK)/check && PYTHONPATH=. ../bin/python -m benchmarks.gpucheck.verify out/tiny-cpu-*.json --all-done

# On a CUDA machine: Triton kernels vs float64 on the GPU, then the GPU benchmarks.
gpu-check:
	PYTHON=$(PY) benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info fitclip_ext/_C*.so
