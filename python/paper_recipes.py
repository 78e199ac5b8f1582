"""The paper's experiments (CBP-QSNN, Tables 1-2 and Table 4), one row each, as thin
`cbp-quantize run` command lines: the model, the data set, the Table 4 preset, binary and
ternary levels. You bring the pre-trained checkpoint and the data (nothing is downloaded).

    python python/paper_recipes.py --list
    python python/paper_recipes.py sew-resnet18/imagenet --checkpoint sew18.pth \\
        --data-path /data/imagenet --device cuda
    python python/paper_recipes.py sew-resnet18/imagenet --print ...   # the command, not run

Any further option is passed to `cbp-quantize run` (``--epochs``, ``--out``, ``--resume`` ...).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from cbp_kernels.cli import main as cbp_quantize

# row -> (model, data set, Table 4 preset); the paper's Table 1 (direct training) and Table 2
# (SNN-Calibration) rows.
RECIPES = {
    "alexnet/cifar10": ("alexnet", "cifar10", "tssl-bp/cifar10"),
    "7conv-3fc/cifar10": ("conv7_fc3", "cifar10", "stbp/cifar10"),
    "7conv-3fc/cifar100": ("conv7_fc3", "cifar100", "stbp/cifar100"),
    "sew-resnet18/imagenet": ("sew_resnet18", "imagefolder", "sew-resnet/imagenet"),
    "sew-resnet34/imagenet": ("sew_resnet34", "imagefolder", "sew-resnet/imagenet"),
    "7b-net/dvs128-gesture": ("seven_b_net", "dvs-gesture", "sew-resnet/dvs128-gesture"),
    "wide-7b-net/cifar10-dvs": ("wide_seven_b_net", "cifar10-dvs", "sew-resnet/cifar10-dvs"),
    "vgg16/cifar10": ("vgg16", "cifar10", "snn-calib/cifar10"),
    "vgg16/cifar100": ("vgg16", "cifar100", "snn-calib/cifar100"),
}


def command(row: str, extra: list[str]) -> list[str]:
    """The `cbp-quantize` arguments of a paper row, plus ``extra``."""
    model, data, preset = RECIPES[row]
    return ["run", "--model", model, "--data", data, "--preset", preset, "--levels", "binary,ternary", *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", nargs="?", choices=sorted(RECIPES), help="the paper row to run")
    parser.add_argument("--list", action="store_true", help="list the rows and their settings")
    parser.add_argument("--print", action="store_true", help="print the cbp-quantize command instead of running it")
    args, extra = parser.parse_known_args(argv)
    if args.list or args.row is None:
        for row, (model, data, preset) in RECIPES.items():
            print(f"{row:26} model={model:18} data={data:12} preset={preset}")
        return 0
    cmd = command(args.row, extra)
    if args.print:
        print("cbp-quantize " + shlex.join(cmd))
        return 0
    return cbp_quantize(cmd)


if __name__ == "__main__":
    sys.exit(main())
