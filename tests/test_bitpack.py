"""bitpack / bitunpack: every backend bit for bit against the reference (the format: LSB first,
zero padded, int32 words), round trips in every spike dtype, the CPU kernel's paths and its
fused 0/1 check, strided input and bad input."""
from __future__ import annotations

import pytest
import torch

from cbp_kernels.ops import bitpack, bitunpack
from cbp_kernels.ops.bitpack import pack_bits

from conftest import device_backends, devices, kernel_backends


def _backends(device: str = "cpu") -> list[str]:
    """Every backend of bitpack / bitunpack that runs on ``device`` here, the reference included."""
    return ["reference"] + kernel_backends(device, "bitpack", "cbp_kernels.ops.bitpack")


def _spikes(shape, p=0.4, device="cpu"):
    return (torch.rand(shape, device=device) < p).float()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_bitpack_round_trip_every_backend(device, dtype):
    for size, dim in [(1, 0), (31, 1), (32, -1), (33, 1), (65, -1), (257, 0)]:
        shape = [3, 4, 2]
        shape[dim] = size
        x = _spikes(shape, device=device).to(dtype)
        ref = bitpack(x, dim, backend="reference")
        assert ref.dtype == torch.int32 and ref.shape[dim] == -(-size // 32)
        for b in _backends(device):
            words = bitpack(x, dim, backend=b)
            assert torch.equal(words, ref), f"{b}: words differ from the reference (size {size}, dim {dim})"
            back = bitunpack(words, dim, size, dtype, backend=b)
            assert back.dtype == dtype and torch.equal(back, x), f"{b}: round trip failed (size {size}, dim {dim})"


@pytest.mark.parametrize("device,backend", device_backends("bitpack", "cbp_kernels.ops.bitpack", reference=True))
def test_bitpack_bit_order_lsb_first_zero_padded(device, backend):
    x = torch.zeros(2, 70, device=device)
    x[0, 0] = x[0, 33] = x[0, 69] = 1  # word 0 bit 0, word 1 bit 1, word 2 bit 5
    x[1, 31] = 1  # the sign bit of word 0
    words = bitpack(x, -1, backend=backend)
    assert words.tolist() == [[1, 2, 32], [-(2**31), 0, 0]]


@pytest.mark.parametrize("no_avx512", ["0", "1"])
@pytest.mark.parametrize("dim", [1, -1], ids=["nchw", "nhwc"])
def test_bitpack_cpu_paths_and_fused_value_check(no_avx512, dim, monkeypatch):
    """The CPU pack reads NCHW (pixels contiguous) and NHWC (channels contiguous) float32
    without a copy, and counts non-binary values in the same pass: each path must refuse them."""
    monkeypatch.setenv("CBP_KERNELS_NO_AVX512", no_avx512)
    x = _spikes((2, 37, 5, 7))  # 35 pixels: not a multiple of 16
    x = x if dim == 1 else x.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(bitpack(x, dim, backend="cpu"), bitpack(x, dim, backend="reference"))
    for value in [0.5, float("nan"), -1.0]:
        bad = x.clone()
        bad[1, 3, 4, 2] = value
        with pytest.raises(ValueError, match="only 0 and 1"):
            bitpack(bad, dim, backend="cpu")


@pytest.mark.parametrize("no_avx512", ["0", "1"])
def test_bitunpack_cpu_float32_paths(no_avx512, monkeypatch):
    """The CPU unpack to float32 (AVX-512: 16 values per masked move; the scalar loop without
    it) against the reference: rows whose size ends mid-word and mid-half-word, every bit
    pattern of the last word (random words, the sign bit included), one long row."""
    monkeypatch.setenv("CBP_KERNELS_NO_AVX512", no_avx512)
    words = torch.randint(-(2**31), 2**31 - 1, (5, 4), dtype=torch.int32)
    for size in [1, 15, 16, 17, 31, 32, 33, 47, 48, 100, 128]:
        w = words[:, : -(-size // 32)].contiguous()
        ref = bitunpack(w, -1, size, torch.float32, backend="reference")
        assert torch.equal(bitunpack(w, -1, size, torch.float32, backend="cpu"), ref), size
    x = _spikes((1, 3 * 4096 + 5))
    assert torch.equal(bitunpack(bitpack(x, -1), -1, x.shape[1], torch.float32, backend="cpu"), x)




@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_bitpack_cpu_one_long_row_on_two_threads(dtype):
    """One row of several blocks of 256 words, ending mid-block and mid-word (the training
    step packs each saved spike tensor as one row; its word blocks are split between the
    threads): float32's vector path and the generic loop (uint8) equal the reference, and a
    bad value in the last block is still counted."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x = _spikes((1, 3 * 8192 + 37)).to(dtype)
        assert torch.equal(bitpack(x, -1, backend="cpu"), bitpack(x, -1, backend="reference"))
        x[0, -3] = 2
        with pytest.raises(ValueError, match="only 0 and 1"):
            bitpack(x, -1, backend="cpu")
    finally:
        torch.set_num_threads(threads)

@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
@pytest.mark.parametrize("no_avx512", ["0", "1"])
def test_bitunpack_cpu_byte_paths(dtype, no_avx512, monkeypatch):
    """The CPU unpack to uint8 / bool (AVX-512BW: 64 values of two words per masked byte move;
    the scalar loop without it) against the reference: rows whose size ends mid-word and
    mid-block of 64 (odd word counts), random bits, one long row (the training step's saved
    spikes: one row, its blocks spread over the threads)."""
    monkeypatch.setenv("CBP_KERNELS_NO_AVX512", no_avx512)
    words = torch.randint(-(2**31), 2**31 - 1, (5, 5), dtype=torch.int32)
    for size in [1, 31, 32, 33, 63, 64, 65, 96, 100, 128, 129, 160]:
        w = words[:, : -(-size // 32)].contiguous()
        ref = bitunpack(w, -1, size, dtype, backend="reference")
        assert torch.equal(bitunpack(w, -1, size, dtype, backend="cpu"), ref), size
    x = _spikes((3 * 4096 + 37,))
    assert torch.equal(bitunpack(bitpack(x, 0), 0, x.numel(), dtype, backend="cpu"), x.to(dtype))

def test_bitpack_threshold_and_non_contiguous():
    h = torch.randn(5, 40, 3)
    spikes = (h >= 0.3).float()
    assert torch.equal(bitpack(h, 1, threshold=0.3), bitpack(spikes, 1))
    x = _spikes((40, 5)).t()  # non-contiguous
    assert torch.equal(bitpack(x, 1), bitpack(x.contiguous(), 1))


@pytest.mark.parametrize("backend", _backends())
def test_pack_bits_is_bitpack_along_the_last_dim_unchecked(backend):
    """The library's unchecked entry point: ``bitpack(x, -1)`` for 2-D to 4-D, strided input,
    and no error (nothing read back) where a value is not 0 / 1: bit = value != 0."""
    for shape in [(3, 70), (2, 5, 33), (2, 3, 4, 65)]:
        x = _spikes(shape)
        assert torch.equal(pack_bits(x, backend), bitpack(x, -1, backend="reference")), shape
        strided = _spikes((shape[-1], *shape[:-1])).movedim(0, -1)
        assert torch.equal(pack_bits(strided, backend), bitpack(strided, -1, backend="reference")), shape
    x = _spikes((4, 40))
    two = x * 2
    assert torch.equal(pack_bits(two, backend), bitpack(x, -1))


def test_bitpack_bad_input():
    with pytest.raises(ValueError, match="only 0 and 1"):
        bitpack(torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        bitpack(torch.tensor([0, 2], dtype=torch.uint8))
    with pytest.raises(TypeError, match="dtype"):
        bitpack(torch.tensor([0, 1], dtype=torch.int64))
    with pytest.raises(ValueError, match="dim"):
        bitpack(torch.zeros(3, 4), dim=2)
    with pytest.raises(ValueError, match="size"):
        bitunpack(torch.zeros(3, 2, dtype=torch.int32), -1, 70)
    with pytest.raises(TypeError, match="int32"):
        bitunpack(torch.zeros(3, 2), -1, 40)
    with pytest.raises(ValueError, match="finite"):
        bitpack(torch.zeros(3), threshold=float("nan"))
