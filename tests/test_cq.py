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

    config = CQConfig(timesteps=8, epochs=4)
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
    with pytest.raises(TypeError, match="CQConfig"):
        CQTrainer(_toy_ann()[0], config={"timesteps": 8})
