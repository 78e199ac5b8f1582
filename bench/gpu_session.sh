#!/usr/bin/env bash
# The prepared GPU check: one call tests, one benches. Run from the repository root on a GPU
# machine (16 cores, one H100: torch with CUDA, triton, cupy, pytest-timeout, pytest-xdist):
#
#   bash bench/gpu_session.sh test  OUTDIR   # build + the GPU test cases   (under 8 min)
#   bash bench/gpu_session.sh bench OUTDIR   # build + the benchmark suites (under 9 min)
#
# Both fail fast (exit 3, one line saying why) without a CUDA device in torch or a CUDA toolkit
# (CUDA_HOME, else torch's own guess: nvcc on PATH, /usr/local/cuda), build the extension with
# its CUDA kernels and stop unless cbp_kernels.backends() reports the cuda backend.
# `test` runs only the cases marked `gpu` (every op test's cuda device: the cuda, cupy and
# triton backends on CUDA tensors; pytest -m gpu), in parallel (pytest-xdist) with a per-test
# timeout (pytest-timeout); OUTDIR gets gpu.txt, build.log, tests.log and tests.xml (junit).
# `bench` writes bench.log and last.json (pytest-benchmark): copy last.json to bench/results/
# here and run `python bench/report.py`, which files it under bench/results/<gpu name>/.
#
# SpikingJelly (the tests' and benchmarks' peer) and loguru are not in the machine's image:
# carry their wheels in .whl/ (git-ignored; `echo /.whl/ >> .git/info/exclude`), fetched
# for the machine's Python 3.12 on manylinux x86-64 with
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl spikingjelly==2.0.0 loguru==0.7.3
#
# They are installed to /tmp/site without dependencies, so the machine's torch stays; without
# them the cases that need SpikingJelly skip (marker needs_spikingjelly), the rest run.
set -euo pipefail
usage="usage: bash bench/gpu_session.sh test|bench OUTDIR"
what=${1:?$usage}
out=${2:?$usage}
case "$what" in test | bench) ;; *) echo "gpu_session.sh: unknown step '$what' ($usage)" >&2; exit 2 ;; esac
PY=${PY:-python3}
fail() { echo "gpu_session.sh: $*" >&2; exit 3; }

# ---- fail fast: a CUDA device in torch, a CUDA toolkit to build with
"$PY" -c "import torch" 2>/dev/null || fail "$PY has no torch (set PY to the python that holds a CUDA torch)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "torch.cuda is not available ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')): this step needs a CUDA GPU"
CUDA_HOME=${CUDA_HOME:-$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)}
[[ -n "$CUDA_HOME" && -x "$CUDA_HOME/bin/nvcc" ]] \
  || fail "no CUDA toolkit: CUDA_HOME is unset (or has no bin/nvcc) and torch found none; export CUDA_HOME=/path/to/cuda"
export CUDA_HOME

mkdir -p "$out"
unset TRITON_INTERPRET  # Triton compiles for the GPU here
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- build with CUDA, then insist on the cuda backend
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt" || true
"$PY" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || { tail -n 40 "$out/build.log"; fail "the build failed (build.log)"; }
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$out/build.log"; then fail "the extension has no CUDA kernels (build.log)"; fi
import torch, cbp_kernels
from cbp_kernels.ops._backend import _load_extension
table = cbp_kernels.backends()
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(), "backends:", table)
assert table.get("cuda", {}).get("cuda"), f"no cuda backend after the build: {table}; extension: {_load_extension()}"
EOF

# ---- the step, ended (SIGINT: the logs and junit are still written) so that the whole call,
# build included, stays under DEADLINE seconds: 450 for test (8 min asked), 510 for bench (9)
deadline=${DEADLINE:-$([[ $what == test ]] && echo 450 || echo 510)}
left=$((deadline - SECONDS))
((left > 60)) || fail "the build took ${SECONDS} s: no time left for $what under ${deadline} s"
set +e
case "$what" in
  test)
    # -rs lists every skip with its reason: on a GPU only the conditions a GPU cannot lift remain.
    timeout --signal=INT --kill-after=20 $left \
      "$PY" -m pytest tests -m gpu -q -rs -p no:cacheprovider -n ${XDIST_WORKERS:-8} --timeout=${TEST_TIMEOUT:-150} \
      --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log"
    rc=${PIPESTATUS[0]}
    # CBP in mixed precision end to end on the GPU (fp16 autocast + GradScaler, CBPConfig.amp), ~1 min
    left=$((deadline - SECONDS))
    if ((left > 30)); then
      timeout --signal=INT --kill-after=10 $left \
        "$PY" -m cbp_kernels run --amp fp16 --device cuda --levels binary --pretrain-epochs 1 --epochs 2 \
        --out "$out/amp_fp16_run" --no-progress 2>&1 | tee "$out/amp.log"
      amp_rc=${PIPESTATUS[0]}
      ((rc == 0)) && rc=$amp_rc
    else
      echo "gpu_session.sh: no time left for the --amp fp16 run" | tee "$out/amp.log"
    fi
    ;;
  bench)
    # bench_models.py last: its torch.compile peer compiles SpikingJelly's model (minutes when the
    # inductor cache is cold), so a cut at the deadline loses the end of that suite, no other one
    suites=$(ls bench/bench_*.py | grep -v '/bench_models.py$')
    timeout --signal=INT --kill-after=20 $left \
      "$PY" -m pytest $suites bench/bench_models.py -q -p no:cacheprovider --timeout=${BENCH_TIMEOUT:-240} \
      --benchmark-json="$out/last.json" 2>&1 | tee "$out/bench.log"
    rc=${PIPESTATUS[0]}
    ;;
esac
[[ $rc -eq 124 ]] && echo "gpu_session.sh: $what stopped at its time limit (see $out)" >&2
exit "$rc"
