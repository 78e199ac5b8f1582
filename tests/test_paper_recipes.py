"""python/paper_recipes.py: every paper row names a library model, data set and Table 4
preset that exist, and its command line parses as `cbp-quantize run`'s."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cbp_kernels.cli import build_parser
from cbp_kernels.data import DATASETS
from cbp_kernels.export import architectures
from cbp_kernels.quant import PRESETS

_spec = importlib.util.spec_from_file_location("paper_recipes", Path(__file__).parents[1] / "python" / "paper_recipes.py")
recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipes)


@pytest.mark.parametrize("row", sorted(recipes.RECIPES))
def test_recipe_is_a_valid_cbp_quantize_run(row):
    model, data, preset = recipes.RECIPES[row]
    assert model in architectures() and data in DATASETS and preset in PRESETS
    args = build_parser().parse_args(recipes.command(row, ["--data-path", "/data", "--epochs", "1"]))
    assert (args.model, args.data, args.preset, args.epochs) == (model, data, preset, 1)


def test_print_and_list(capsys):
    assert recipes.main(["vgg16/cifar10", "--print", "--data-path", "/d"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("cbp-quantize run --model vgg16 --data cifar10 --preset snn-calib/cifar10")
    assert recipes.main(["--list"]) == 0
    assert "sew-resnet34/imagenet" in capsys.readouterr().out
