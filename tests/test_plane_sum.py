"""The integer forward's epilogue ``ops.plane_sum_nchw`` (csrc/cpu/plane_sum.cpp) against its
reference, the torch code it replaced: bitwise, on both ISA paths, for 1..8 bit planes,
channel counts around the 16-channel tiles and maps around the 16-pixel rows."""
from __future__ import annotations

import itertools

import pytest
import torch

from cbp_kernels.ops.plane_sum import has_cpu_kernel, plane_sum_nchw

PLANES = (1, 2, 3, 8)
CHANNELS = (1, 3, 17, 33, 64, 100)
MAPS = ((1, 1), (7, 7), (5, 9), (56, 56))


def _counts(planes: int, n: int, oh: int, ow: int, o: int, gen) -> torch.Tensor:
    """Integer plane counts of a 3x3 popcount conv over 512 channels: |count| <= 4608, so that
    the plane sum stays below 2^24 (exact in float32) up to 8 planes."""
    return torch.randint(-4608, 4609, (planes * n, oh, ow, o), generator=gen).float()


@pytest.mark.skipif(not has_cpu_kernel(), reason="needs the compiled CPU kernel (make build)")
@pytest.mark.parametrize("no_avx512", ["0", "1"])
@pytest.mark.parametrize("planes", PLANES)
def test_plane_sum_is_the_torch_code_bit_for_bit(planes, no_avx512, monkeypatch):
    """Every (channels, map) pair with batches 1..5 in turn: the kernel's output equals the
    reference's bit for bit (the sum exact, the product by a scale that is not a power of two
    rounded once), contiguous NCHW."""
    monkeypatch.setenv("CBP_KERNELS_NO_AVX512", no_avx512)
    gen = torch.Generator().manual_seed(planes)
    batches = itertools.cycle(range(1, 6))
    for o, (oh, ow) in itertools.product(CHANNELS, MAPS):
        n = next(batches)
        counts = _counts(planes, n, oh, ow, o, gen)
        scale = torch.rand((), generator=gen) * 0.1 + 1e-3
        out = plane_sum_nchw(counts, planes, scale, backend="cpu")
        ref = plane_sum_nchw(counts, planes, scale, backend="reference")
        assert out.shape == (n, o, oh, ow) and out.is_contiguous()
        differ = (out != ref).nonzero()
        assert differ.numel() == 0, f"P={planes} N={n} O={o} {oh}x{ow}: {len(differ)} differ, first at {differ[0].tolist()}"


def test_plane_sum_reference_is_the_exact_sum_times_the_scale():
    """The reference (the specification) against float64: the plane sum exact, then one rounding."""
    gen = torch.Generator().manual_seed(0)
    counts, scale = _counts(3, 2, 5, 9, 17, gen), torch.tensor(0.0371)
    exact = sum(counts[2 * b:2 * b + 2].double() * 2 ** b for b in range(3))
    expected = (exact.float().double() * scale.double()).float().permute(0, 3, 1, 2)
    assert torch.equal(plane_sum_nchw(counts, 3, scale, backend="reference"), expected)


def test_plane_sum_bad_arguments():
    counts, scale = torch.zeros(4, 3, 3, 8), torch.tensor(0.5)
    with pytest.raises(ValueError, match="planes"):
        plane_sum_nchw(counts, 3, scale)  # does not divide 4
    for planes in (0, 9, True, 2.0):
        with pytest.raises(ValueError, match="planes"):
            plane_sum_nchw(torch.zeros(72, 1, 1, 2), planes, scale)
    with pytest.raises(ValueError, match="counts must be a contiguous"):
        plane_sum_nchw(counts.transpose(1, 2), 2, scale)
    with pytest.raises(ValueError, match="counts must have at least 4"):
        plane_sum_nchw(torch.zeros(4, 3, 8), 2, scale)
    with pytest.raises(ValueError, match="counts must be a contiguous"):
        plane_sum_nchw(torch.zeros(4, 3, 3, 8, 1), 2, scale)
    with pytest.raises(TypeError, match="counts"):
        plane_sum_nchw(counts.double(), 2, scale)
    with pytest.raises(TypeError, match="scale"):
        plane_sum_nchw(counts, 2, torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale must be one element"):
        plane_sum_nchw(counts, 2, torch.tensor([0.5, 0.25]))
