"""cbp-quantize: quantize a spiking neural network's weights to binary / ternary levels with
constrained backpropagation (CBP), then export it as a bit-packed popcount model.

With no arguments it runs the embedded demo (no download, a few minutes on a laptop CPU):
pre-train a small spiking conv net on scikit-learn's 8x8 digits in FP32, quantize it to
binary and to ternary with CBP, force the weights onto the levels, check that the packed
popcount model predicts exactly what the float quantized model predicts, and print a
table like the paper's Table 1 (accuracy, weight memory, constraint-failure score CFS).

Subcommands:
  run      quantize a model (the default subcommand); --method cbp|sigmoid|cq picks CBP or a
           peer method of the seed papers (sigmoid-sum quantization, CQ training + conversion)
  compare  run cbp, sigmoid and cq on the same pre-trained model and data: one table, one plot
  eval     evaluate an exported packed model (.safetensors) on a data set
  report   print the result table of a finished (or partial) run directory

The job itself is cbp_kernels.pipeline (run it from Python with the same options); this
module only parses the command line and prints.

Examples:
  cbp-quantize                                          # the digits demo
  cbp-quantize run --levels ternary --epochs 20 --out runs/t
  cbp-quantize run --method sigmoid --levels binary     # the sigmoid-sum peer
  cbp-quantize compare --levels binary                  # cbp vs sigmoid vs cq on digits
  cbp-quantize run --model sew_resnet18 --checkpoint sew18.pth --data imagefolder \\
      --data-path /data/imagenet --preset sew-resnet/imagenet --device cuda
  torchrun --nproc-per-node=4 -m cbp_kernels run ...    # DistributedDataParallel
  cbp-quantize run --resume runs/20260101-120000        # continue a killed run exactly
  cbp-quantize eval runs/<run>/binary/model.safetensors
  cbp-quantize report runs/<run>
"""
from __future__ import annotations

import argparse
import os
import sys

from .pipeline import RUN_DEFAULTS, RunError, evaluate_export, parse_levels, read_run, run
from .pipeline.config import COMPARE_LEVELS, CQ_WEIGHT_BITS, DEFAULT_LEVELS, METHODS
from .pipeline.tables import format_compare, format_layers, format_memory, format_table

__all__ = ["main", "build_parser", "parse_levels", "format_table", "format_compare", "format_memory"]


# ----------------------------------------------------------------------------- arguments


def _add_run_arguments(cmd: argparse.ArgumentParser, levels_default: str) -> None:
    """The options ``run`` and ``compare`` share."""
    from .data import DATASETS
    from .quant import PRESETS

    cmd.add_argument("--model", help="library model name (digits-net, sew_resnet18, ...) or a SpikingJelly-format "
                                     "checkpoint path (default: digits-net)")
    cmd.add_argument("--checkpoint", help="pre-trained weights for a library --model (SpikingJelly format); "
                                          "without one the model is pre-trained here in FP32")
    cmd.add_argument("--data", choices=sorted(DATASETS), help="data set (default: digits, embedded)")
    cmd.add_argument("--data-path", help="root of the data set (not for digits)")
    cmd.add_argument("--levels", help="comma-separated level sets: binary, ternary, or a custom set of numbers, "
                                      "written --levels=-2,-1,0,1 (';' between two custom sets); only binary and "
                                      "ternary pack into popcount layers; sigmoid needs sets symmetric about 0 "
                                      f"(default: {levels_default})")
    cmd.add_argument("--preset", help="CBP hyper-parameters of a row of the paper's Table 4: "
                                      f"{', '.join(sorted(PRESETS))} (default: the digits demo's settings)")
    cmd.add_argument("--epochs", type=int, help="quantization epochs per level set (default: the preset's); CQ "
                                                "trains its ANN for --pretrain-epochs + --epochs")
    cmd.add_argument("--pretrain-epochs", type=int,
                     help="FP32 pre-training epochs when no checkpoint is given (default 4)")
    cmd.add_argument("--pretrain-lr", type=float, help="Adam learning rate of the FP32 pre-training (default 1e-2)")
    cmd.add_argument("--batch-size", type=int, help="batch size per process (default: the preset's)")
    cmd.add_argument("--timesteps", type=int, help="T, timesteps per sample (default: the preset's / the data's)")
    cmd.add_argument("--image-size", type=int, help="crop size of imagefolder images (default 224)")
    cmd.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    cmd.add_argument("--workers", type=int, help="data loader worker processes (default 0)")
    cmd.add_argument("--out", help="output directory (default: runs/<timestamp>)")
    cmd.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config "
                                                         "(it writes into RUN_DIR, from any working directory)")
    cmd.add_argument("--allow-env-change", action="store_true",
                     help="let --resume continue under another thread count / world size than the run started "
                          "with (its results then differ from an uninterrupted run's; recorded in config.json)")
    cmd.add_argument("--quiet", action="store_true", help="print only the result table (and errors)")
    cmd.add_argument("--no-progress", action="store_true",
                     help="no progress bars, one line per epoch (the default when stderr is not a terminal)")
    cmd.add_argument("--seed", type=int, help="seed of initialisation and data order (default 0)")
    cmd.add_argument("--amp", choices=("bf16", "fp16"), help="CBP in mixed precision: forward and loss under "
                     "torch.autocast, fp16 with a GradScaler; float32 weights and multipliers (CBPConfig.amp)")
    cmd.add_argument("--float-forward", action="store_true", default=None,
                     help="CBP's quantized layers compute their forward in float32, F.conv2d(x, Q(W)) (the authors' "
                          "rounding), instead of the exact integer forward on spike inputs (CBPConfig.integer_forward)")
    cmd.add_argument("--flush-denormal", action="store_true", default=None,
                     help="the CPU computes floats below 1.18e-38 as 0 (torch.set_flush_denormal): late CPU training "
                          "steps whose gradients underflow stop slowing down many-fold; changes only such tiny "
                          "values (README: Denormals in CPU training; kept by --resume)")


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="cbp-quantize", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{run,compare,eval,report}")

    run = sub.add_parser("run", formatter_class=fmt, help="quantize a model with CBP or a peer method (default)",
                         description="Pre-train (if no checkpoint is given), quantize to each level set with "
                                     "--method, finalize, pack, export and print the result table. The output "
                                     "directory gets config.json, metrics.jsonl, pretrained.pt and, per level "
                                     "set, last.pt (checkpoint), model.safetensors (export) and PNG plots.")
    run.add_argument("--method", choices=sorted(METHODS),
                     help="cbp: constrained backpropagation; sigmoid: sigmoid-sum quantization (seed paper 001); "
                          "cq: clamp-and-quantize ANN training + conversion to an IF SNN with "
                          f"{CQ_WEIGHT_BITS}-bit weights (seed paper 003; digits only) (default: cbp)")
    _add_run_arguments(run, DEFAULT_LEVELS)
    cmp = sub.add_parser("compare", formatter_class=fmt, help="compare cbp, sigmoid and cq on the same model and data",
                         description="Runs the stages of `run` for cbp, sigmoid and cq on one pre-trained FP32 "
                                     "model and data set (digits) and writes compare.md (one table: accuracy, "
                                     "weight memory, seconds per epoch, CFS, packed = float predictions) and "
                                     "compare.png (accuracy and weight memory per method) in the run directory.")
    _add_run_arguments(cmp, COMPARE_LEVELS)

    ev = sub.add_parser("eval", formatter_class=fmt, help="evaluate an exported packed model",
                        description="Load a packed model (cbp_kernels.load_packed) and report its accuracy.")
    ev.add_argument("export", help="a model.safetensors written by `cbp-quantize run`")
    ev.add_argument("--data", choices=sorted(DATASETS), help="data set (default: the one of the run)")
    ev.add_argument("--data-path", help="root of the data set (default: the one of the run)")
    ev.add_argument("--split", choices=("train", "test"), default="test")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")

    rep = sub.add_parser("report", formatter_class=fmt, help="print the result table of a run",
                         description="Print the result table of a run directory, each quantized stage's per-layer "
                                     "results (scale, CFS before forcing, weights moved by forcing), how far an "
                                     "unfinished run got, and its files.")
    rep.add_argument("run_dir", help="the --out directory of a run")
    return parser


# ----------------------------------------------------------------------------- printing


def _run(args) -> int:
    options = {k: v for k, v in vars(args).items() if k in RUN_DEFAULTS}
    if args.command == "compare":  # the subcommand is the method (a resumed run has its own)
        options["method"] = None if args.resume else "compare"
    say = None if args.quiet else print
    result = run(args.resume, say=say, progress=False if args.no_progress or args.quiet else None,
                 allow_env_change=args.allow_env_change, **options)
    if result.main:
        print(("\n" if say else "") + result.table)
    return result.status


def _eval(args) -> int:
    r = evaluate_export(args.export, args.data, args.data_path, args.split, args.batch_size, args.device)
    if r["main"]:
        print(f"{args.export}: {r['levels']} packed model, {r['data']} {r['split']} split "
              f"({r['samples']} samples, T={r['timesteps']}): accuracy {r['accuracy']:.2f}%")
    return 0


def _report(args) -> int:
    status = read_run(args.run_dir)
    if status.finished:
        print(f"run {args.run_dir}: finished")
    else:
        done, total = status.stages
        print(f"run {args.run_dir}: unfinished ({done} of {total} stages done; continue with --resume)")
        c = status.current
        if c is not None:
            line = f"  now: {c['stage']}, {c['epochs_done']} of {c['epochs']} epochs done"
            line += f" (+ {c['batch']} batches of the next)" if c["batch"] else ""
            last = c["last_record"]
            if last:
                shown = {k: last[k] for k in ("accuracy", "cfs", "g", "loss", "time") if k in last}
                line += "; last epoch: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in shown.items())
            print(line)
    if status.table:
        print(status.table)
    for row in status.rows:
        if row.get("layers"):
            print(f"\n{row['method']} {row['precision']}: per layer")
            print(format_layers(row))
    for path in status.files:
        print("  " + path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``cbp-quantize`` command on ``argv`` (default ``sys.argv[1:]``); returns the exit
    status (callable from Python, also under torchrun)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # run is the default subcommand
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"run": _run, "compare": _run, "eval": _eval, "report": _report}[args.command](args)
    except RunError as exc:
        parser.exit(2, f"cbp-quantize: error: {exc}\n")
    except FloatingPointError as exc:
        parser.exit(1, f"cbp-quantize: {exc}\n")


def entry() -> None:
    """The ``cbp-quantize`` / ``python -m cbp_kernels`` process: exits with ``main()``'s status.
    Under torchrun the process ends with ``os._exit`` once its output is flushed (every file
    it writes is complete by then: ``run`` returns after a barrier), skipping the interpreter's
    finalization: there torch's teardown of the gloo group and autograd threads can abort a
    finished rank ("terminate called without an active exception", once in CI;
    pytorch/pytorch#190489), and ``destroy_process_group`` hung once under load."""
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
