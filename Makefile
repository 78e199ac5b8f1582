# Everything a newcomer runs. `make demo` and `make test` work on a fresh machine with only
# Python: they create .venv, install torch (2.13.0, CPU build where it lies on disk) and the
# dependencies, build the extension against that torch (no build isolation), then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.setup-done

.PHONY: setup build demo test test-fast cuda-check bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q triton numpy pybind11 ninja tqdm matplotlib safetensors scikit-learn \
		pytest pytest-benchmark hypothesis
	# spikingjelly declares torchvision/torchaudio, which would replace torch: no deps, then its light ones.
	$(BIN)/python -m pip install -q --no-deps spikingjelly==2.0.0
	$(BIN)/python -m pip install -q scipy loguru h5py
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Rebuild the extension in place after editing csrc/ (ninja: only what changed).
build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

demo: $(STAMP)
	$(BIN)/cbp-quantize

# Triton kernels run on CPU tensors under the interpreter, so the whole suite sees them.
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -x -m "not slow" tests

# Compile-only check of every CUDA source for sm_80 and sm_90 (no GPU needed), with setup.py's
# nvcc flags; it compiles the launchers' CBP_IMPL registrations too, so a CUDA kernel whose C++
# type differs from its op's declaration (csrc/common/<op>_api.h) fails here (the old 2-D
# `at::Tensor bitpack_cuda(const at::Tensor&)`: "cannot overload functions distinguished by
# return type alone"), not when the extension loads. Host code
# includes csrc/cuda/torch_cuda.h (c10/cuda only), not ATen/cuda/CUDAContext.h, whose
# cuSPARSE/cuBLAS headers a bare CUDA toolkit lacks.
TORCH_INC = $(shell $(BIN)/python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PY_INC = $(shell $(BIN)/python -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])")
cuda-check: $(STAMP)
	@set -e; for f in $$(find csrc -name '*.cu'); do \
		echo "nvcc $$f"; \
		nvcc -std=c++20 -O3 --fmad=false -c $$f -o /dev/null -Icsrc $(TORCH_INC) $(PY_INC) \
			-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90; \
	done

# One OpenMP thread unless set: on a small shared CPU, descheduled threads skew every provider.
# glibc's malloc keeps freed memory (no mmap, no trim): otherwise whether a large output is a
# fresh mapping, whose first-touch page faults cost as much as a memory-bound kernel on this VM,
# depends on what the suite ran before (measured: the same LIF step 38 ms or 88 ms at T = 16).
BENCH_MALLOC = glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
# Each suite runs in a process of its own, joined by report.py --merge: a suite's timings do not
# depend on what another left in the heap (measured: our float32 LIF step at [64, 2^20], one
# thread, 128-130 ms in two runs where bench_neuron followed bench_cbp_step and bench_models in
# one process, 84-87 ms in four runs of bench_neuron's cases alone).
SUITE_RUNS = build/bench-runs
bench: $(STAMP)
	rm -rf $(SUITE_RUNS) && mkdir -p $(SUITE_RUNS)
	for suite in bench/bench_*.py; do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} GLIBC_TUNABLES=$${GLIBC_TUNABLES:-$(BENCH_MALLOC)} \
			$(BIN)/python -m pytest -q $$suite --benchmark-json=$(SUITE_RUNS)/$$(basename $$suite .py).json \
			|| exit 1; \
	done
	$(BIN)/python bench/report.py --merge $(SUITE_RUNS)/*.json

clean:
	rm -rf build *.egg-info cbp_kernels/*.so
