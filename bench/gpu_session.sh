#!/usr/bin/env bash
# Everything a GPU machine is needed for, in as few calls as possible: build the extension
# with CUDA, run the test suite there (every cuda / cupy / triton-on-GPU case un-skips), then
# the benchmark suites. Run from the repository root on the GPU machine:
#
#   bash bench/gpu_session.sh test  OUTDIR   # build + tests        (~5 min on 16 cores)
#   bash bench/gpu_session.sh bench OUTDIR   # build + benchmarks   (~5 min)
#
# OUTDIR receives the logs, `last.json` (pytest-benchmark) and the test report (junit XML).
# Copy `last.json` to bench/results/ here and run `python bench/report.py`: it files the
# numbers under bench/results/<gpu name>/ and rewrites REPORT.md.
# The machine's own python3 (with a CUDA torch, triton and cupy) is used. SpikingJelly, the
# peer of the tests and benchmarks, is pure Python: where it is missing, carry its wheel and
# loguru's in .whl/ (pip download --no-deps spikingjelly==2.0.0 loguru -d .whl); they are
# installed to /tmp/site without dependencies, so the machine's torch stays.
set -euo pipefail
what=${1:?usage: gpu_session.sh test|bench OUTDIR}
out=${2:?usage: gpu_session.sh test|bench OUTDIR}
mkdir -p "$out"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$PY setup.py -q build_ext --inplace 2>&1 | tail -n 20 | tee "$out/build.log"
$PY -c "import cbp_kernels, torch; print(torch.__version__, cbp_kernels.backends())" | tee -a "$out/build.log"

case "$what" in
  test)
    # -rs lists every skip with its reason: on a GPU only the conditions a GPU cannot lift remain.
    $PY -m pytest -q -rs -p no:cacheprovider tests --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log"
    # CBP in mixed precision end to end on the GPU (fp16 autocast + GradScaler, CBPConfig.amp)
    $PY -m cbp_kernels run --amp fp16 --device cuda --levels binary --pretrain-epochs 1 --epochs 2 \
      --out "$out/amp_fp16_run" 2>&1 | grep -v "it/s" | tee "$out/amp.log"
    ;;
  bench)
    $PY -m pytest -q -p no:cacheprovider bench/bench_*.py --benchmark-json="$out/last.json" 2>&1 | tee "$out/bench.log"
    ;;
  *)
    echo "unknown step $what (test or bench)" >&2
    exit 2
    ;;
esac
