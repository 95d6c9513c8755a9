"""The GPU suite: compiled Triton kernels against the references, bf16 training smoke runs.

    SIGMA_TEST_GPU=1 TRITON_F32_DEFAULT=ieee python -m pytest -m gpu tests/gpu

(TRITON_F32_DEFAULT=ieee keeps fp32 tl.dot exact instead of TF32, for the tight fp32 comparisons.)
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


def rel(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def nsa_inputs(B, H, hkv, D, block, cube_grid, dtype):
    """nsa_3d's seven inputs on the GPU (q, k, v, compressed k and v, both gates), an output gradient, and the
    inputs again in fp64 for the reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    nb = math.prod(cube_grid)
    N = block * nb
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype).requires_grad_()  # noqa: E731
    inputs = [r(B, H, N, D), r(B, hkv, N, D), r(B, hkv, N, D), r(B, hkv, nb, D), r(B, hkv, nb, D),
              torch.rand(B, H, N, device="cuda").to(dtype).requires_grad_(), torch.rand(B, H, N, device="cuda").to(dtype).requires_grad_()]
    do = torch.randn(B, H, N, D, device="cuda").to(dtype)
    return inputs, do, [x.detach().double().requires_grad_() for x in inputs]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("hkv", [8, 2])
def test_triton_nsa_matches_reference(dtype, tol, hkv):
    from kernels.nsa import cube_neighbourhood, nsa_3d

    block, cube_grid = 64, (2, 4, 4)
    inputs, do, ref_in = nsa_inputs(2, 8, hkv, 64, block, cube_grid, dtype)
    forced = cube_neighbourhood(cube_grid, (0, 1, 1))
    o_ref, idx_ref = nsa_3d(*ref_in, block=block, top_n=4, forced=forced, backend="reference", return_index=True)
    o, idx = nsa_3d(*inputs, block=block, top_n=4, forced=forced, backend="triton", return_index=True)
    assert (idx == idx_ref).float().mean() > 0.98  # half precision may swap near-ties
    if dtype == torch.float32:
        assert torch.equal(idx, idx_ref)
        assert rel(o, o_ref) < tol
        for a, b in zip(torch.autograd.grad(o, inputs, do), torch.autograd.grad(o_ref, ref_in, do.double())):
            assert rel(a, b) < tol


@pytest.mark.parametrize("dtype,D,cube,tol", [(torch.bfloat16, 64, (4, 8, 8), 2e-2), (torch.float32, 128, (4, 4, 8), 1e-5)])
def test_triton_nsa_cubes_over_one_tile_match_reference(dtype, D, cube, tol):
    """Cubes of 256 tokens (bf16) and 128 tokens at fp32 head dim 128 run as tiles of 64 and 32 rows
    (kernels/nsa/triton.py tile_index): in one tile they would need more shared memory than the chip has."""
    from kernels.nsa import cube_neighbourhood, nsa_3d

    block, cube_grid = math.prod(cube), (2, 2, 2)
    inputs, do, ref_in = nsa_inputs(1, 4, 2, D, block, cube_grid, dtype)
    forced = cube_neighbourhood(cube_grid, (0, 0, 0))
    o_ref, idx_ref = nsa_3d(*ref_in, block=block, top_n=2, forced=forced, backend="reference", return_index=True)
    o, idx = nsa_3d(*inputs, block=block, top_n=2, forced=forced, backend="triton", return_index=True)
    grads = torch.autograd.grad(o, inputs, do)
    assert all(torch.isfinite(x).all() for x in (o, *grads))
    if dtype == torch.float32:
        assert torch.equal(idx, idx_ref)
        assert rel(o, o_ref) < tol
        for a, b in zip(grads, torch.autograd.grad(o_ref, ref_in, do.double())):
            assert rel(a, b) < tol
    else:  # bf16 scores may swap near-tied cubes, which moves the output a little
        assert (idx == idx_ref).float().mean() > 0.9 and rel(o.float(), o_ref) < 0.1


def test_triton_backward_is_deterministic():
    from kernels.nsa import cube_neighbourhood, nsa_3d

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    kc, vc = (torch.randn(1, 4, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    gc, gs = torch.rand(1, 4, 1024, device="cuda"), torch.rand(1, 4, 1024, device="cuda")
    forced = cube_neighbourhood((1, 4, 4), (0, 0, 0))
    grads = [torch.autograd.grad(nsa_3d(q, k, v, kc, vc, gc, gs, block=64, top_n=3, forced=forced, backend="triton").sum(),
                                 [q, k, v, kc, vc]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,hkv", [(16, 1), (8, 2)])
def test_triton_causal_selected_matches_fp32_path(dtype, tol, H, hkv):
    """The causal selected branch against the PyTorch path in fp32 on the same selection (a bf16 PyTorch
    reference would itself sum dK/dV in bf16 with atomics)."""
    from kernels.nsa import causal_selected_attention
    from kernels.nsa.reference import select_causal

    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, K, block = 2, 1000, 64, 32  # a partial last block
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype).requires_grad_()  # noqa: E731
    q, k, v = r(B, H, N, K), r(B, hkv, N, K), r(B, hkv, N, K)
    index = select_causal(torch.rand(B, hkv, N, -(-N // block), generator=g, device="cuda"), 8, block)
    do = torch.randn(B, H, N, K, generator=g, device="cuda").to(dtype)
    o = causal_selected_attention(q, k, v, index, block, backend="triton")
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    o_ref = causal_selected_attention(*ref_in, index, block, backend="cpu")
    assert rel(o.float(), o_ref) < tol
    for a, b in zip(torch.autograd.grad(o, [q, k, v], do), torch.autograd.grad(o_ref, ref_in, do.float())):
        assert rel(a.float(), b) < tol


def test_triton_causal_nsa_matches_reference():
    from kernels.nsa import nsa_causal
    from kernels.nsa.reference import nsa_causal_reference

    g = torch.Generator(device="cuda").manual_seed(1)
    B, H, hkv, N, K, block = 1, 8, 2, 600, 64, 32
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").requires_grad_()  # noqa: E731
    inputs = [r(B, H, N, K), r(B, hkv, N, K), r(B, hkv, N, K), r(B, hkv, N // block, K), r(B, hkv, N // block, K)]
    g1, g2, g3 = (torch.rand(B, H, N, generator=g, device="cuda") for _ in range(3))
    o = nsa_causal(*inputs, g1, g2, block=block, top_n=8, window=64, g_win=g3, backend="triton")
    o_ref, _ = nsa_causal_reference(*inputs, g1, g2, block, 8, 64, g3)
    assert rel(o, o_ref) < 1e-5
    do = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, inputs, do), torch.autograd.grad(o_ref, inputs, do)):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_mta_matches_reference(causal, dtype, tol):
    from kernels.mta import identity_kq, mta, mta_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, S, K, kernel = 2, 8, 300, 64, (6, 11)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device="cuda") * scale)  # noqa: E731
    w = [identity_kq(H, *kernel, causal).cuda() + r(H, *kernel, scale=0.1), torch.eye(H, device="cuda") + r(H, H, scale=0.1),
         identity_kq(H, *kernel, causal).cuda() + r(H, *kernel, scale=0.1), torch.eye(2, device="cuda") + r(H // 2, 2, 2, scale=0.1)]
    q, k, v = (r(B, H, S, K).to(dtype).requires_grad_() for _ in range(3))
    w = [t.requires_grad_() for t in w]
    do = r(B, H, S, K).to(dtype)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, *w)]
    o_ref = mta_reference(*ref_in, causal=causal)
    o = mta(q, k, v, *w, causal=causal, backend="triton")
    assert rel(o, o_ref) < tol
    for a, b in zip(torch.autograd.grad(o, [q, k, v, *w], do), torch.autograd.grad(o_ref, ref_in, do.double())):
        assert rel(a, b) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_triton_moe_matches_reference(dtype, tol):
    """bench-moe's sizes with an uneven routing: an expert of several row tiles, one with none."""
    from kernels.moe import moe_ffn, moe_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    T, D, F, E, k = 4096, 256, 128, 16, 4
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    scores = torch.rand(T, E, generator=g, device="cuda")
    scores[:, 0] += 0.3
    scores[:, 5] = -1
    gate, idx = scores.topk(k, -1)
    leaves = [t.to(dtype).requires_grad_() for t in (r(T, D), r(E, D, 2 * F, scale=D**-0.5), r(E, F, D, scale=F**-0.5), gate)]
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    o_ref = moe_reference(*ref_in[:3], idx, ref_in[3])
    o = moe_ffn(*leaves[:3], idx, leaves[3], "triton")
    assert rel(o, o_ref) < tol
    do = r(T, D)
    for a, b in zip(torch.autograd.grad(o, leaves, do.to(dtype)), torch.autograd.grad(o_ref, ref_in, do.double())):
        assert rel(a, b) < tol


def test_full_selection_equals_flash_sdpa():
    from kernels.nsa import cube_neighbourhood, nsa_3d

    q, k, v = (torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kc = vc = torch.zeros(1, 8, 64, 64, device="cuda", dtype=torch.bfloat16)
    zeros, ones = torch.zeros(1, 8, 4096, device="cuda"), torch.ones(1, 8, 4096, device="cuda")
    o = nsa_3d(q, k, v, kc, vc, zeros, ones, block=64, top_n=64, forced=cube_neighbourhood((1, 8, 8), (0, 0, 0)), backend="triton")
    assert rel(o.float(), F.scaled_dot_product_attention(q, k, v).float()) < 1e-2


def test_bf16_training_smoke(cli, tmp_path):
    r = cli("train-imm", "--space", "pixels", "--patch-size", "2", "--attn", "nsa", "--steps", "20", "--device", "cuda",
            "--sample-every", "0", "--out", tmp_path / "imm", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["final_loss"] < 1.0
    r = cli("train-lm", "--steps", "20", "--device", "cuda", "--sample-every", "0", "--out", tmp_path / "lm", "--json")
    assert r.exit_code == 0, r.stderr
    r = cli("sample", "--model", tmp_path / "imm", "--device", "cuda", "--out", tmp_path / "s.png", "--json")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("attn", ["dense", "nsa", "mta", "dsa"])
def test_lm_kv_cache_decodes_as_the_full_forward(attn, device="cuda"):
    """The full forward runs the Triton kernels (NSA, MTA) and grouped_mm; the cached steps the references."""
    from pipelines.lm.model import MoELM

    torch.manual_seed(0)
    cfg = {"nsa": {"block": 16, "top_n": 4, "window": 32}, "mta": {"kq_every": 1}, "dsa": {"top_k": 16}}.get(attn)
    m = MoELM(width=128, depth=2, heads=4, context=128, attn=attn, attn_config=cfg).to(device).eval()
    with torch.no_grad():  # waken the zero-initialised parts so every path carries signal
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        idx = torch.stack([torch.randperm(256, device=device)[:100] for _ in range(2)])
        full = m(idx)
        caches = [{} for _ in m.blocks]
        steps = [m(idx[:, :10], caches, 0)] + [m(idx[:, t:t + 1], caches, t) for t in range(10, 100)]
    assert rel(torch.cat(steps, 1), full) < 1e-4
    assert m.generate(idx[:, :10], 20, temperature=0).shape == (2, 30)
