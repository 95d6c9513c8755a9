"""Inputs a user plausibly passes to the public attention / MoE ops: wrong ones fail with one clear ValueError
(not a traceback from inside Triton or a silently rounded result), odd but valid ones give the reference's answer."""
import math

import pytest
import torch

from kernels.moe import HAS_GROUPED_MM, moe_ffn
from kernels.mta import mta
from kernels.nsa import cube_neighbourhood, nsa_3d, nsa_causal
from kernels.nsa.module import NSA3D


def nsa_inputs(B=1, H=2, hkv=1, cube_grid=(1, 1, 2), block=16, K=16):
    N, nb = math.prod(cube_grid) * block, math.prod(cube_grid)
    q, k, v = torch.randn(B, H, N, K), torch.randn(B, hkv, N, K), torch.randn(B, hkv, N, K)
    return [q, k, v, torch.randn(B, hkv, nb, K), torch.randn(B, hkv, nb, K), torch.rand(B, H, N), torch.rand(B, H, N)]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_nsa_mixed_or_integer_dtypes_are_a_clear_error(backend):
    forced = cube_neighbourhood((1, 1, 2), (0, 0, 0))
    x = nsa_inputs()
    mixed = x[:1] + [t.bfloat16() for t in x[1:3]] + x[3:]  # was: Triton "Both operands must be same dtype"
    ints = [t.long() for t in x[:5]] + x[5:]
    for bad in (mixed, ints):
        with pytest.raises(ValueError, match="one floating dtype"):
            nsa_3d(*bad, block=16, top_n=1, forced=forced, backend=backend)
        with pytest.raises(ValueError, match="one floating dtype"):
            nsa_causal(*bad, block=16, top_n=3, backend=backend)


def test_nsa3d_layer_called_with_another_grid_is_a_clear_error():
    m = NSA3D(32, 2, 16, grid=(1, 4, 8), cube=(1, 4, 4), top_n=1, backend="cpu")  # 2 cubes of 16
    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))  # 3 cubes
    with pytest.raises(ValueError, match="forced cube mask is 2x2"):
        m(torch.randn(1, 48, 32), q, k, v)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_nsa3d_empty_batch(backend):
    x = nsa_inputs(B=0)
    o = nsa_3d(*x, block=16, top_n=1, forced=cube_neighbourhood((1, 1, 2), (0, 0, 0)), backend=backend)
    assert o.shape == x[0].shape


def test_mta_integer_inputs_are_a_clear_error_not_a_rounded_result():
    q, k, v = (torch.randint(-3, 4, (1, 1, 4, 16)) for _ in range(3))
    for backend in ("reference", "cpu", "triton"):  # triton returned int64 outputs 10-15 % off the float result
        with pytest.raises(ValueError, match="floating point"):
            mta(q, k, v, backend=backend)


def test_mta_cpu_empty_batch():
    q, k, v = (torch.randn(0, 2, 5, 8) for _ in range(3))
    assert mta(q, k, v, torch.randn(2, 3, 3), causal=True, backend="cpu").shape == q.shape  # was ZeroDivisionError


def moe_inputs(T=10, D=8, E=4, F=8, k=2):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    return torch.randn(T, D), torch.randn(E, D, 2 * F) * 0.3, torch.randn(E, F, D) * 0.3, idx, torch.rand(T, k)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without _grouped_mm")
def test_moe_grouped_takes_strided_expert_weights():
    x, w_in, w_out, idx, gate = moe_inputs()
    ref = moe_ffn(x, w_in, w_out, idx, gate, backend="reference")
    wide = torch.zeros(*w_in.shape[:-1], 2 * w_in.shape[-1])
    wide[..., ::2] = w_in
    expert_minor = w_out.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for a, b in ((wide[..., ::2], w_out), (w_in, expert_minor)):  # were "Invalid strides/sizes" from grouped_mm
        for backend in ("grouped", "auto"):
            assert torch.allclose(moe_ffn(x, a, b, idx, gate, backend=backend), ref, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 4"):
        moe_ffn(*moe_inputs(D=6, F=6), backend="grouped")  # was "strides should be multiple of 16 bytes"
