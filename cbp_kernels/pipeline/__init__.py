"""The job of ``cbp-quantize``, callable from Python with the same options: pre-train (or load)
an FP32 spiking model, quantize it to each level set with CBP or a peer method, force the
weights onto the levels, pack, check and export, evaluate, plot; every file in one run
directory that ``run(resume=DIR)`` continues from any working directory.

    from cbp_kernels.pipeline import run, read_run
    result = run(levels="binary", epochs=2, pretrain_epochs=1, out="runs/nb")
    result.rows[1]["accuracy"], result.rows[1]["layers"]       # per-layer scale, CFS, moved
    print(result.table)
    read_run("runs/nb").finished
"""
from .config import RUN_DEFAULTS, RunError, parse_levels, resolve_config
from .job import RunResult, RunStatus, evaluate_export, read_run, run

__all__ = ["run", "RunResult", "read_run", "RunStatus", "evaluate_export", "resolve_config", "parse_levels",
           "RunError", "RUN_DEFAULTS"]
