"""The level sets (``LevelSet``) and the export (``save_packed`` / ``load_packed``): level
names, plane counts, the stored codes, round trips for binary, ternary and custom sets, a
user's own architecture, and ``cbp-quantize eval`` on a custom set's export."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cbp_kernels import LIFConv2d, load_packed, save_packed
from cbp_kernels.export import pack_model, read_metadata
from cbp_kernels.models import DigitsNet
from cbp_kernels.nn import PackedConv2d, PackedLinear
from cbp_kernels.nn.lifconv import PackedLIFConv2d
from cbp_kernels.ops.bitconv import pack_codes, unpack_codes, weight_levels
from cbp_kernels.ops.levels import LevelSet
from cbp_kernels.quant import CBPQuantizer

CUSTOM = [-2.0, -1.0, 0.0, 1.0]
SETS = ["binary", "ternary", CUSTOM, [-1.0, -0.5, 0.0, 0.5, 1.0]]


# --- LevelSet ------------------------------------------------------------------------------------

@pytest.mark.parametrize("given,name,planes,bits", [
    ("binary", "binary", 1, 1), ([-1, 1], "binary", 1, 1), (torch.tensor([-1.0, 0.0, 1.0]), "ternary", 2, 2),
    ((-1, 0, 1), "ternary", 2, 2), (CUSTOM, None, None, 2), ([-1, -0.5, 0, 0.5, 1], None, None, 3),
])
def test_level_set_names_and_values(given, name, planes, bits):
    levels = LevelSet(given)
    assert levels.name == name and levels.planes == planes and levels.bits == bits
    assert levels.popcount == (name is not None)
    assert LevelSet(levels) == levels and LevelSet(levels.label if name else list(levels.values)) == levels
    assert levels.tensor().dtype == torch.float32 and levels.tensor().tolist() == list(levels.values)


def test_level_set_label_of_a_custom_set():
    assert LevelSet(CUSTOM).label == "levels-2_-1_0_1"


@pytest.mark.parametrize("levels", SETS)
def test_encode_decode_round_trip_and_refusal(levels):
    levels = LevelSet(levels)
    torch.manual_seed(0)
    codes = torch.randint(0, len(levels), (6, 5, 3, 3))
    w = levels.decode(codes, 0.37)
    assert torch.equal(levels.encode(w, 0.37).long(), codes)
    off = w.clone()
    off[2, 1, 0, 2] += 1e-3
    with pytest.raises(ValueError, match=r"w\[2, 1, 0, 2\]"):
        levels.encode(off, 0.37, "w")


@pytest.mark.parametrize("shape", [(8, 40, 3, 3), (5, 33), (3, 1, 1, 1)])
@pytest.mark.parametrize("n_bits", [1, 2, 3])
def test_code_planes_round_trip(shape, n_bits):
    torch.manual_seed(1)
    codes = torch.randint(0, 2 ** n_bits, shape)
    planes = pack_codes(codes, n_bits)
    words = (shape[1] + 31) // 32
    assert planes.dtype == torch.int32 and planes.shape[0] == n_bits and planes.shape[-1] == words
    assert torch.equal(unpack_codes(planes, shape), codes)


# --- save_packed / load_packed -------------------------------------------------------------------

def _quantized_digits_net(levels):
    torch.manual_seed(0)
    net = DigitsNet()
    q = CBPQuantizer(net, levels)
    model, export = q.finalize()
    return model.eval(), export


def _spikes(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < 0.4).float()


@pytest.mark.parametrize("levels", SETS)
def test_digits_net_round_trip(tmp_path, levels):
    model, export = _quantized_digits_net(levels)
    level_set = LevelSet(levels)
    path = tmp_path / "m.safetensors"
    save_packed(model, path, layers=list(export), arch={"name": "digits-net", "kwargs": {}}, metadata={"run": 7})
    meta = read_metadata(path)
    assert meta["run"] == 7 and sorted(meta["packed"]) == ["conv2", "fc1"]
    tensors = load_file(str(path))
    for name, info in meta["packed"].items():
        assert LevelSet(info["levels"]) == level_set and info["shape"] == list(export[name]["codes"].shape)
        assert float(tensors[f"{name}.scale"]) == export[name]["scale"]
        if level_set.popcount:  # popcount planes: the integer level q of each weight is Q[code]
            planes = tensors[f"{name}.planes"]
            assert info["levels"] == level_set.name and planes.shape[0] == level_set.planes
            q = weight_levels(planes, info["shape"][1]).reshape(info["shape"])
            assert torch.equal(q, level_set.tensor()[export[name]["codes"].long()])
        else:  # ceil(log2 |Q|) planes of codes, the codes finalize() returns
            planes = tensors[f"{name}.codes"]
            assert info["levels"] == list(level_set.values) and planes.shape[0] == level_set.bits
            assert torch.equal(unpack_codes(planes, tuple(info["shape"])), export[name]["codes"].long())
    loaded = load_packed(path)
    x = _spikes(4, 8, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        got = loaded(x)
    if level_set.popcount:
        assert isinstance(loaded.conv2, PackedConv2d) and isinstance(loaded.fc1, PackedLinear)
        assert torch.equal(loaded.conv2.planes, tensors["conv2.planes"]), "planes must load as they are"
        with torch.no_grad():
            assert torch.equal(got, pack_model(copy.deepcopy(model), dict.fromkeys(export))(x))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # popcount vs float sums: rounding order
    else:  # the float layers hold scale * Q[codes]: the very weights saved
        assert type(loaded.conv2) is nn.Conv2d and type(loaded.fc1) is nn.Linear
        assert torch.equal(loaded.conv2.weight, model.conv2.weight) and torch.equal(loaded.fc1.weight, model.fc1.weight)
        assert torch.equal(got, want)


@pytest.mark.parametrize("via", ["cbp", "weight_levels"])
@pytest.mark.parametrize("levels", ["ternary", CUSTOM])
def test_own_architecture_loads_with_model(tmp_path, levels, via):
    """A user's model (a LIFConv2d stack, quantized by CBPQuantizer or by its own
    ``weight_levels``), saved with arch=None or an unknown name: loading needs model=, then
    predicts what the saved model did."""
    torch.manual_seed(0)
    own = levels if via == "weight_levels" else None

    def build():
        return nn.Sequential(*[LIFConv2d(c_in, c_out, 3, padding=1, weight_levels=own)
                               for c_in, c_out in ((3, 16), (16, 16), (16, 8))])

    net = build()
    with torch.no_grad():
        for layer in net:
            layer.bn.running_mean.uniform_(-0.2, 0.2)
            layer.bn.weight.uniform_(2.0, 6.0)
            layer.bn.bias.uniform_(0.0, 1.0)
    if via == "cbp":
        model, export = CBPQuantizer(net, levels, exclude=[]).finalize()
    else:
        model, export = net, {"0": None, "1": None, "2": None}
    model.eval()
    path = tmp_path / "own.safetensors"
    save_packed(model, path, layers=list(export), arch={"name": "my-net"})
    with pytest.raises(ValueError, match="pass model="):
        load_packed(path)
    save_packed(model, path, layers=list(export))
    with pytest.raises(ValueError, match="pass model="):
        load_packed(path)
    loaded = load_packed(path, model=build())
    x = _spikes(3, 2, 3, 8, 8, seed=1)
    with torch.no_grad():
        got = loaded(x)
        if LevelSet(levels).popcount:
            assert all(isinstance(layer, PackedLIFConv2d) for layer in loaded)
            want = pack_model(copy.deepcopy(model), dict.fromkeys(export))(x)
        else:
            for layer in model:
                layer.reset()
            want = model(x)
    assert want.sum() > 0, "no spike at all: the test would prove nothing"
    assert torch.equal(got, want)


def test_save_packed_refuses_layers_without_levels_or_off_them(tmp_path):
    model, export = _quantized_digits_net(CUSTOM)
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="'conv1'.*no levels"):
        save_packed(model, path, layers=["conv1"])
    with torch.no_grad():
        model.fc1.weight[3, 5] += 1e-3
    with pytest.raises(ValueError, match=r"fc1.weight\[3, 5\]"):
        save_packed(model, path, layers=list(export))
    assert not path.exists()


def test_eval_command_on_a_custom_set_export(tmp_path, capsys):
    from cbp_kernels.cli import main

    model, export = _quantized_digits_net(CUSTOM)
    path = tmp_path / "m.safetensors"
    save_packed(model, path, layers=list(export), arch={"name": "digits-net", "kwargs": {}},
                metadata={"levels": "levels-2_-1_0_1", "data": "digits", "timesteps": 2})
    assert main(["eval", str(path)]) == 0
    out = capsys.readouterr().out
    assert "levels-2_-1_0_1" in out and "accuracy" in out


def test_reads_format_1_files(tmp_path):
    """Files of the first format (binary / ternary planes only, no storage field) still load."""
    import json

    from safetensors.torch import save_file

    model, export = _quantized_digits_net("ternary")
    path = tmp_path / "m.safetensors"
    save_packed(model, path, layers=list(export), arch={"name": "digits-net", "kwargs": {}})
    meta = read_metadata(path)
    old = {name: {"levels": info["levels"], "shape": info["shape"]} for name, info in meta["packed"].items()}
    header = {"format": "cbp_kernels.packed/1", "arch": json.dumps(meta["arch"]), "packed": json.dumps(old),
              "metadata": "{}"}
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=header)
    x = _spikes(2, 3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "old.safetensors")(x), load_packed(path)(x))
