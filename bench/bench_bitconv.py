"""Bit-packed popcount convolution against F.conv2d, per layer.

Layers: the spiking convolutions of SEW-ResNet-18 at ImageNet size (224x224 input; conv1
reads the analog image, not spikes, so it is left out) and one DVS 7B-Net layer (32 -> 32
channels, 3x3, 128x128 events), T = 4 timesteps folded into the batch. On the CPU: batch 1
(N*T = 4) on ONE thread for every provider, so the ratios compare kernels, not thread
counts on a shared machine. On a GPU: batch 8 (N*T = 32).

Providers (same spikes and weights):
- ``packed-binary`` / ``packed-ternary``: ``packed_conv2d`` on spikes already packed (NHWC),
  as in a chain of packed layers; ``packed-binary+pack`` also packs the float NCHW spikes;
  ``packed-binary+lif`` is the fused epilogue (affine + LIF over T + packed output spikes;
  the ``cpu`` or ``cuda`` kernel by device);
- ``f32`` / ``bf16``: ``F.conv2d`` on NCHW tensors (the default layout);
- ``bf16-cl``: ``F.conv2d`` on channels-last bfloat16 (oneDNN's fastest CPU path, AMX).
``extra_info`` holds the layer, the provider and the MACs, so the ratios follow from the
JSON (``python bench/bench_bitconv.py RESULTS.json`` prints them). A last case records the
weight memory of a packed SEW-ResNet-18 checkpoint in bytes (from the layer shapes).

Run: ``python -m pytest -q bench/bench_bitconv.py --benchmark-json=OUT.json`` (< 1 min on CPU).
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from cbp_kernels.ops import pack_spikes, pack_weight, packed_conv2d, packed_conv2d_lif, packed_linear
from cbp_kernels.ops.bitpack import bitpack, packed_size

from harness import run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = 4
BATCH = 8 if DEVICE == "cuda" else 1

# (name, C_in, C_out, input H = W, kernel, stride): SEW-ResNet-18's spiking convs (one per
# distinct shape; layer1 has four 64x64 convs, layers 2-4 three of the second shape), then
# a DVS 7B-Net layer.
LAYERS = [
    ("sew18.layer1.conv", 64, 64, 56, 3, 1),
    ("sew18.layer2.0.conv1", 64, 128, 56, 3, 2),
    ("sew18.layer2.conv", 128, 128, 28, 3, 1),
    ("sew18.layer2.0.downsample", 64, 128, 56, 1, 2),
    ("sew18.layer3.0.conv1", 128, 256, 28, 3, 2),
    ("sew18.layer3.conv", 256, 256, 14, 3, 1),
    ("sew18.layer3.0.downsample", 128, 256, 28, 1, 2),
    ("sew18.layer4.0.conv1", 256, 512, 14, 3, 2),
    ("sew18.layer4.conv", 512, 512, 7, 3, 1),
    ("sew18.layer4.0.downsample", 256, 512, 14, 1, 2),
    ("dvs7b.conv32", 32, 32, 128, 3, 1),
]
# How often each LAYERS shape occurs in SEW-ResNet-18 (for the whole-network total).
LAYER_COUNT = {"sew18.layer1.conv": 4, "sew18.layer2.conv": 3, "sew18.layer3.conv": 3, "sew18.layer4.conv": 3}
PROVIDERS = ["packed-binary", "packed-binary+pack", "packed-binary+lif", "packed-ternary", "f32", "bf16", "bf16-cl"]
SCALE = 0.0371


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    threads = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(C, O, H, k, stride, provider):
    """The layer for ``provider``: a zero-argument callable and the MACs it computes."""
    torch.manual_seed(0)
    x = (torch.rand(T * BATCH, C, H, H, device=DEVICE) < 0.2).float()  # ~20% firing rate
    levels = "ternary" if provider == "packed-ternary" else "binary"
    q = torch.randint(-1, 2, (O, C, k, k), device=DEVICE).float()
    q = q if levels == "ternary" else torch.where(q >= 0, 1.0, -1.0)
    w = q * SCALE
    pad = k // 2
    OH = (H + 2 * pad - k) // stride + 1
    macs = T * BATCH * C * O * k * k * OH * OH
    if provider.startswith("packed"):
        packed = pack_weight(w, levels, SCALE)
        if provider == "packed-binary+lif":
            xp = pack_spikes(x.permute(0, 2, 3, 1))
            return (lambda: packed_conv2d_lif(xp, packed, T, None, None, stride, pad)), macs
        if provider == "packed-binary+pack":
            return (lambda: packed_conv2d(pack_spikes(x.permute(0, 2, 3, 1)), packed, None, stride, pad)), macs
        xp = pack_spikes(x.permute(0, 2, 3, 1))
        return (lambda: packed_conv2d(xp, packed, None, stride, pad)), macs
    if provider == "f32":
        return (lambda: F.conv2d(x, w, None, stride, pad)), macs
    xb, wb = x.bfloat16(), w.bfloat16()
    if provider == "bf16-cl":
        xb, wb = xb.to(memory_format=torch.channels_last), wb.to(memory_format=torch.channels_last)
    return (lambda: F.conv2d(xb, wb, None, stride, pad)), macs


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer[0])
def test_bitconv_layer(benchmark, layer, provider):
    name, C, O, H, k, stride = layer
    fn, macs = _setup(C, O, H, k, stride, provider)
    benchmark.group = f"bitconv {name}"
    run(benchmark, fn, device=DEVICE, rounds=15, warmup=2, layer=name, provider=provider, macs=macs,
        threads=torch.get_num_threads(), batch=T * BATCH)


@pytest.mark.parametrize("provider", ["packed-binary", "f32", "bf16"])
def test_bitconv_fc(benchmark, provider):
    """SEW-ResNet-18's classifier 512 -> 1000 on the T*N pooled spike vectors."""
    torch.manual_seed(0)
    x = (torch.rand(T * BATCH, 512, device=DEVICE) < 0.2).float()
    w = torch.where(torch.rand(1000, 512, device=DEVICE) < 0.5, -SCALE, SCALE)
    if provider == "packed-binary":
        packed, xp = pack_weight(w, "binary", SCALE), bitpack(x, -1)
        fn = lambda: packed_linear(xp, packed)  # noqa: E731
    elif provider == "f32":
        fn = lambda: F.linear(x, w)  # noqa: E731
    else:
        xb, wb = x.bfloat16(), w.bfloat16()
        fn = lambda: F.linear(xb, wb)  # noqa: E731
    benchmark.group = "bitconv sew18.fc"
    run(benchmark, fn, device=DEVICE, rounds=15, warmup=2, layer="sew18.fc", provider=provider,
        macs=T * BATCH * 512 * 1000, threads=torch.get_num_threads(), batch=T * BATCH)


# Every weight of SEW-ResNet-18 (ImageNet): conv1, the 16 block convs, 3 downsamples, fc.
SEW_RESNET18_WEIGHTS = (
    [(64, 3, 7, 7)] + [(64, 64, 3, 3)] * 4
    + [w for cin, c in [(64, 128), (128, 256), (256, 512)]
       for w in [(c, cin, 3, 3), (c, c, 3, 3), (c, c, 3, 3), (c, c, 3, 3), (c, cin, 1, 1)]]
    + [(1000, 512)]
)


def _packed_bytes(shape, planes: int) -> int:
    """Bytes of one packed weight: planes x O x taps x ceil(C/32) words + the float32 scale."""
    O, C, *kernel = shape
    taps = kernel[0] * kernel[1] if kernel else 1
    return planes * O * taps * packed_size(C) * 4 + 4


def test_packed_sew_resnet18_weight_bytes(benchmark):
    """Times packing every SEW-ResNet-18 weight; records the checkpoint's weight bytes."""
    torch.manual_seed(0)
    weights = [torch.where(torch.rand(s) < 0.5, -SCALE, SCALE) for s in SEW_RESNET18_WEIGHTS]
    packed = benchmark.pedantic(lambda: [pack_weight(w, "binary", SCALE) for w in weights], rounds=1, iterations=1)
    binary = sum(p.nbytes for p in packed)
    assert binary == sum(_packed_bytes(s, 1) for s in SEW_RESNET18_WEIGHTS)
    float32 = sum(w.numel() * 4 for w in weights)
    benchmark.extra_info.update(
        layer="sew18.checkpoint", provider="weight-bytes", params=sum(w.numel() for w in weights),
        float32_bytes=float32, binary_packed_bytes=binary,
        ternary_packed_bytes=sum(_packed_bytes(s, 2) for s in SEW_RESNET18_WEIGHTS),
    )


def summary(path: str) -> str:
    """Per-layer ratios (best of the rounds: the machine is shared, so min is the stable statistic) of a --benchmark-json file of this suite."""
    data = json.load(open(path))
    times, info = {}, {}
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        if "macs" in extra:
            times[(extra["layer"], extra["provider"])] = b["stats"]["min"]
        elif extra.get("provider") == "weight-bytes":
            info = extra
    lines = [f"device: {data['machine_info'].get('cbp_device')}",
             "layer | packed-binary ms | GMAC/s | vs f32 | vs bf16 | vs bf16-cl | +pack vs f32 | fused LIF vs f32 | ternary vs f32"]
    for layer in dict.fromkeys(l for l, _ in times):
        t = {p: times.get((layer, p)) for p in PROVIDERS}
        b = t["packed-binary"]
        macs = next(x["extra_info"]["macs"] for x in data["benchmarks"] if x.get("extra_info", {}).get("layer") == layer)
        ratio = lambda p, ref=b: f"{t[p] / ref:.2f}x" if t.get(p) and ref else "-"  # noqa: E731
        pack = f"{t['f32'] / t['packed-binary+pack']:.2f}x" if t.get("packed-binary+pack") else "-"
        tern = f"{t['f32'] / t['packed-ternary']:.2f}x" if t.get("packed-ternary") else "-"
        lif = f"{t['f32'] / t['packed-binary+lif']:.2f}x" if t.get("packed-binary+lif") else "-"
        lines.append(f"{layer} | {b * 1e3:.3f} | {macs / b / 1e9:.0f} | {ratio('f32')} | {ratio('bf16')} | "
                     f"{ratio('bf16-cl')} | {pack} | {lif} | {tern}")
    sew = [layer for layer in dict.fromkeys(l for l, _ in times) if layer.startswith("sew18.layer")]
    total = {p: sum(LAYER_COUNT.get(l, 1) * times.get((l, p), float("nan")) for l in sew) for p in PROVIDERS}
    lines.append(
        f"SEW-ResNet-18 spiking convs (all {sum(LAYER_COUNT.get(l, 1) for l in sew)}): packed-binary "
        f"{total['packed-binary'] * 1e3:.2f} ms, {total['f32'] / total['packed-binary']:.2f}x f32, "
        f"{total['bf16'] / total['packed-binary']:.2f}x bf16, {total['bf16-cl'] / total['packed-binary']:.2f}x bf16-cl; "
        f"fused LIF {total['f32'] / total['packed-binary+lif']:.2f}x f32; ternary {total['f32'] / total['packed-ternary']:.2f}x f32"
    )
    if info:
        lines.append(f"SEW-ResNet-18 weights: {info['params']} params, float32 {info['float32_bytes']} B, "
                     f"binary packed {info['binary_packed_bytes']} B, ternary packed {info['ternary_packed_bytes']} B")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
