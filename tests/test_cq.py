"""CQ (seed paper 003): clamp-and-quantize STE, BN fusion, fixed point, and the conversion
of a CQ-trained ANN to an IF-neuron SNN whose predictions match the quantized ANN's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cbp_kernels.quant.cq import ClampQuantize, fixed_point, fuse_bn, to_snn

from conftest import assert_close


def test_clamp_quantize_values_and_clipped_ste():
    x = torch.tensor([-0.5, 0.0, 0.124, 0.125, 0.5, 0.99, 1.0, 1.7], requires_grad=True)
    y = ClampQuantize(8)(x)
    assert y.tolist() == [0.0, 0.0, 0.0, 0.125, 0.5, 0.875, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # the incoming gradient is clipped too (hardtanh, the CQ authors' Quantization.backward)
    x.grad = None
    ClampQuantize(8)(x).backward(torch.tensor([3.0, 3.0, -2.5, 0.5, 7.0, -7.0, 1.5, 9.0]))
    assert x.grad.tolist() == [0.0, 1.0, -1.0, 0.5, 1.0, -1.0, 1.0, 0.0]


def test_to_snn_normalises_by_weights_and_biases_and_rounds_both():
    """max(max|W|, max|b|) per layer (the authors' normalize_weight): here the bias is larger;
    weights and biases on the 8-bit grid; the threshold scaled by the same factor."""
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [0.1, 0.2, 0.3]]))
        lin.bias.copy_(torch.tensor([2.0, -0.3]))
    snn = to_snn(nn.Sequential(lin, ClampQuantize(4), nn.Linear(2, 2)), 4, weight_bits=8)
    layer = snn.layers[0]
    assert layer.weight.tolist() == fixed_point(lin.weight.detach() / 2.0, 8).tolist()
    assert layer.bias.tolist() == fixed_point(lin.bias.detach() / 2.0, 8).tolist()
    assert snn.thresholds[0] == 0.5 and float(layer.bias.detach()[1]) != -0.15  # -0.15 rounded to 1/128


def _if_counts(currents, threshold):
    """Spike count of one IF neuron (reset by subtraction) over a list of input currents."""
    v, n = 0.0, 0
    for c in currents:
        v += c
        if v >= threshold:
            v, n = v - threshold, n + 1
    return n


def test_snn_input_if_encoded_and_output_spike_count():
    """Input x in [0, 1] IF-encoded (threshold 1, reset by subtraction), the output the last
    layer's spike count / T: a scalar simulation of both IF stages; the analog options differ."""
    from cbp_kernels.quant.cq import CQSpikingNet

    identity = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        identity.weight.fill_(1.0)
    xs = [0.0, 0.3, 0.5, 0.625, 1.0]
    x = torch.tensor(xs).unsqueeze(1)
    nets = {(enc, out): CQSpikingNet([identity], [0.75], [nn.Identity()], 8, input_encoding=enc, readout=out)
            for enc in ("if", "current") for out in ("count", "potential")}
    with torch.no_grad():
        got = {key: net(x).squeeze(1).tolist() for key, net in nets.items()}
    spikes_in = [[float(_if_counts([v] * (t + 1), 1.0) - _if_counts([v] * t, 1.0)) for t in range(8)] for v in xs]
    assert got["if", "count"] == [_if_counts(s, 0.75) / 8 for s in spikes_in]
    assert got["if", "potential"] == [sum(s) / 8 for s in spikes_in]
    assert got["current", "count"] == [_if_counts([v] * 8, 0.75) / 8 for v in xs]
    assert len({tuple(v) for v in got.values()}) == 4  # the options are told apart
    with pytest.raises(ValueError, match="input_encoding"):
        CQSpikingNet([identity], [1.0], [nn.Identity()], 8, input_encoding="poisson")


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fuse_bn_is_exact_in_float64(kind):
    layer = nn.Conv2d(3, 5, 3, bias=kind == "conv").double() if kind == "conv" else nn.Linear(6, 5).double()
    bn = (nn.BatchNorm2d(5) if kind == "conv" else nn.BatchNorm1d(5)).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64) if kind == "conv" else torch.randn(4, 6, dtype=torch.float64)
    assert_close(fuse_bn(layer, bn)(x), bn(layer(x)), 1e-12, 1e-12, "fused vs layer+bn")


def test_fixed_point_rounding():
    w = torch.tensor([-1.0, -0.3, 0.0, 0.01, 0.2, 0.999])
    assert fixed_point(w, 8).tolist() == (torch.round(w * 128) / 128).tolist()
    assert fixed_point(w, 2).tolist() == [-1.0, -0.5, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="bits"):
        fixed_point(w, 1)


def _digits(timesteps):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def test_converted_snn_matches_quantized_ann_on_digits():
    timesteps = 16
    x_train, y_train, x_test, y_test = _digits(timesteps)
    ann = nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), ClampQuantize(timesteps),
        nn.Linear(128, 64), nn.BatchNorm1d(64), ClampQuantize(timesteps),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(ann.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(ann(x_train), y_train).backward()
        opt.step()
    ann.eval()
    with torch.no_grad():
        ann_pred = ann(x_test).argmax(1)
        snn = to_snn(ann, timesteps)
        snn_pred = snn(x_test).argmax(1)
        snn8_pred = to_snn(ann, timesteps, weight_bits=8)(x_test).argmax(1)
    ann_acc = (ann_pred == y_test).float().mean().item()
    agreement = (snn_pred == ann_pred).float().mean().item()
    assert ann_acc > 0.85, f"the CQ ANN did not learn digits (accuracy {ann_acc:.3f})"
    # Stated tolerance: the SNN agrees with the quantized ANN on >= 95% of the test set
    # (exact for the first layer's constant input; later layers see spike trains).
    assert agreement >= 0.95, f"SNN agrees with the ANN on only {agreement:.3f} of the test set"
    assert (snn8_pred == snn_pred).float().mean().item() >= 0.95


def test_to_snn_bad_configs():
    with pytest.raises(ValueError, match="trained for T=4"):
        to_snn(nn.Sequential(nn.Linear(2, 2), ClampQuantize(4), nn.Linear(2, 2)), 8)
    with pytest.raises(ValueError, match="cannot convert a ReLU"):
        to_snn(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), 4)
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        to_snn(nn.Sequential(ClampQuantize(4)), 4)
    with pytest.raises(ValueError, match="positive int"):
        ClampQuantize(0)


def _toy_ann(timesteps=8):
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), ClampQuantize(timesteps), nn.Linear(32, 4))
    x = torch.randn(256, 8)
    y = x[:, :4].argmax(1)
    return ann, x, y, [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]


def test_cq_trainer_trains_converts_and_resumes(tmp_path):
    from cbp_kernels.quant import CQConfig, CQTrainer

    # inputs in R: the analog input current and potential readout (the IF input encoding needs [0, 1])
    config = CQConfig(timesteps=8, epochs=4, input_encoding="current", readout="potential")
    ann, x, y, loader = _toy_ann()
    trainer = CQTrainer(ann, config)
    history = trainer.fit(loader, nn.functional.cross_entropy, epochs=4, progress=False, checkpoint_dir=tmp_path)
    assert history[-1]["loss"] < history[0]["loss"]
    assert len(history[-1]["weight_hist"]) > 0
    ann2, _, _, _ = _toy_ann()
    with torch.no_grad():
        for p in ann2.parameters():
            p.add_(1.0)  # differ from the trained weights
    resumed = CQTrainer(ann2, config)
    resumed.load_checkpoint(tmp_path / "last.pt")
    assert resumed.epoch == 4 and all(torch.equal(a, b) for a, b in zip(ann.state_dict().values(),
                                                                       ann2.state_dict().values()))
    snn, export = trainer.finalize()
    assert set(export) == {"0", "3"} and export["0"]["bits"] == 8
    with torch.no_grad():
        agreement = (snn(x).argmax(1) == ann(x).argmax(1)).float().mean().item()
    assert agreement >= 0.9, agreement


def test_cq_trainer_bad_configs():
    from cbp_kernels.quant import CQConfig, CQTrainer

    with pytest.raises(ValueError, match="timesteps"):
        CQTrainer(_toy_ann(8)[0], CQConfig(timesteps=4))
    with pytest.raises(ValueError, match="weight_bits"):
        CQConfig(weight_bits=1)
    with pytest.raises(ValueError, match="readout"):
        CQConfig(readout="rate")
    with pytest.raises(TypeError, match="CQConfig"):
        CQTrainer(_toy_ann()[0], config={"timesteps": 8})
