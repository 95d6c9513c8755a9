"""Multi-Token Attention: the chunked CPU path and the fused Triton kernel (interpreted) against the materialised
reference, forward and every gradient; identity and causality."""
import pytest
import torch
import torch.nn.functional as F

from kernels.mta import identity_kq, mta, mta_reference, resolve_backend
from kernels.mta.module import MTA


def rel(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weights(H=4, kernel=(3, 5), group=2, dtype=torch.float64, parts="all", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    pre = parts in ("all", "pre")
    post = parts in ("all", "post")
    return (r(H, *kernel) if pre else None, r(H, H) if pre else None,
            r(H, *kernel) if post else None, r(H // group, group, group) if post else None)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("parts", ["all", "pre", "post"])
def test_cpu_path_matches_reference_forward_and_gradients(causal, parts):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    w = weights(parts=parts)
    leaves = [t for t in (q, k, v, *w) if t is not None]
    ref = mta_reference(q, k, v, *w, causal=causal)
    from kernels.mta.cpu import mta_cpu

    out = mta_cpu(q, k, v, *w, causal=causal, chunk=8)  # 5 chunks: every halo case (top, middle, bottom)
    assert rel(out, ref) < 1e-12
    do = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do)):
        assert rel(a, b) < 1e-12



def test_compiled_cpu_convolutions_match(monkeypatch):
    """Large slabs run the convolutions through torch.compile: forced on here at a small size, in fp64."""
    import shutil

    from kernels.mta import cpu

    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    monkeypatch.setattr(cpu, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpu, "_compiled", {})

    def no_eager(*a):
        raise AssertionError("the eager loops ran")

    monkeypatch.setattr(cpu, "_shifted_sum_eager", no_eager)
    monkeypatch.setattr(cpu, "_tap_sums_eager", no_eager)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 21, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    w = weights(H=2, kernel=(3, 4))
    leaves = [q, k, v, *w]
    ref = mta_reference(q, k, v, *w, causal=True)
    out = cpu.mta_cpu(q, k, v, *w, causal=True, chunk=8)  # causal chunks differ in width: dynamic shapes
    assert rel(out, ref) < 1e-12 and not cpu._compiled.get("failed")
    do = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do)):
        assert rel(a, b) < 1e-12

def test_fp32_and_bf16_tolerances():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 50, 16, generator=g) for _ in range(3))
    w32 = [t.detach().float() for t in weights(dtype=torch.float32)]
    ref = mta_reference(q.double(), k.double(), v.double(), *[t.double() for t in w32])
    assert rel(mta(q, k, v, *w32), ref) < 1e-5
    out16 = mta(q.bfloat16(), k.bfloat16(), v.bfloat16(), *[t.bfloat16() for t in w32])
    assert rel(out16.float(), ref) < 3e-2


def test_reference_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    w = weights(H=2, kernel=(2, 3))
    assert torch.autograd.gradcheck(lambda *x: mta_reference(*x, causal=True), (q, k, v, *w))


@pytest.mark.parametrize("causal", [True, False])
def test_identity_initialised_mta_is_plain_attention(causal):
    q, k, v = (torch.randn(2, 4, 40, 16) for _ in range(3))
    ident = (identity_kq(4, 6, 11, causal), torch.eye(4), identity_kq(4, 6, 11, causal), torch.eye(2).expand(2, 2, 2))
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for backend in ("reference", "cpu"):
        assert rel(mta(q, k, v, *ident, causal=causal, backend=backend), plain) < 1e-5
    layer = MTA(64, 4, 16, causal=causal, layer=3)  # the layer starts at the identity too
    assert layer.use_kq and torch.equal(layer.kq_pre, ident[0]) and torch.equal(layer.head_pre, ident[1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_causal_future_tokens_change_no_earlier_output(backend):
    torch.manual_seed(0)
    layer = MTA(32, 4, 8, causal=True, layer=3, backend=backend)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x, q, k, v = torch.randn(1, 30, 32), torch.randn(1, 4, 30, 8), torch.randn(1, 4, 30, 8), torch.randn(1, 4, 30, 8)
    o = layer(x, q, k, v)
    t = 17
    x2, q2, k2, v2 = (a.clone() for a in (x, q, k, v))
    x2[:, t:] += 1
    for a in (q2, k2, v2):
        a[:, :, t:] += 1
    o2 = layer(x2, q2, k2, v2)
    assert torch.allclose(o[:, :, :t], o2[:, :, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(o[:, :, t:], o2[:, :, t:])


def test_kq_convolutions_every_fourth_layer_and_bad_options():
    assert [MTA(32, 4, 8, layer=i).use_kq for i in range(8)] == [False, False, False, True] * 2
    with pytest.raises(ValueError, match="head groups"):
        MTA(32, 3, 8, head_group=2)
    with pytest.raises(ValueError, match="unknown MTA backend"):
        mta(*(torch.randn(1, 2, 4, 4) for _ in range(3)), backend="fused")
    with pytest.raises(ValueError, match="power-of-two"):
        mta(*(torch.randn(1, 2, 4, 4) for _ in range(3)), backend="triton")  # head dim 4 < 16
    assert resolve_backend("auto", torch.zeros(1, 2, 4, 16)) == "cpu"  # CPU tensors: the chunked path


# ---- the fused Triton kernel (interpreted on the CPU: tiny shapes) ----------------------------------------------
def _triton_case(S, causal, parts, dtype, kernel=(2, 3), H=2, B=1, seed=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    w = [t.detach().mul(0.5).to(dtype) if t is not None else None for t in weights(H, kernel, 2, torch.float32, parts, seed)]
    ident = (identity_kq(H, *kernel, causal), torch.eye(H), identity_kq(H, *kernel, causal), torch.eye(2).expand(H // 2, 2, 2))
    w = [(t + i.to(dtype)).requires_grad_() if t is not None else None for t, i in zip(w, ident)]  # identity + noise
    leaves = [t for t in (q, k, v, *w) if t is not None]
    return q, k, v, w, leaves


@pytest.mark.parametrize("causal,parts,S", [(False, "all", 37), (True, "all", 37), (False, "pre", 20), (True, "post", 20)])
def test_triton_matches_reference_forward_and_every_gradient(causal, parts, S):
    """37 tokens: three row tiles of 16 (the last one partial), tiles on, below and above the causal diagonal,
    so the factored and the per-tap forms both run; an even kernel height exercises the asymmetric padding."""
    q, k, v, w, leaves = _triton_case(S, causal, parts, torch.float32)
    ref = mta_reference(*(t.double() if t is not None else None for t in (q, k, v, *w)), causal=causal)
    out = mta(q, k, v, *w, causal=causal, backend="triton")
    assert rel(out, ref) < 1e-5
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    for a, b in zip(grads, torch.autograd.grad(ref, [t for t in leaves], do.double())):
        assert rel(a, b) < 1e-5
    if parts == "post":  # deterministic: no atomics, weight gradients are per-program partials summed on the host
        again = torch.autograd.grad(mta(q, k, v, *w, causal=causal, backend="triton"), leaves, do)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))


@pytest.mark.parametrize("B,H,S,kernel,causal", [(2, 4, 5, (2, 3), True), (1, 4, 16, (3, 1), True), (1, 4, 16, (1, 3), False)])
def test_triton_edge_shapes(B, H, S, kernel, causal):
    """Several head groups (H = 4, groups of 2), B = 2, fewer tokens than a tile, one-row and one-column kernels."""
    q, k, v, w, leaves = _triton_case(S, causal, "all", torch.float32, kernel=kernel, H=H, B=B)
    ref = mta_reference(*(t.double() for t in (q, k, v, *w)), causal=causal)
    out = mta(q, k, v, *w, causal=causal, backend="triton")
    assert rel(out, ref) < 1e-5
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do.double())):
        assert rel(a, b) < 1e-5


def test_triton_fp16_and_identity_and_causality():
    q, k, v, w, leaves = _triton_case(20, True, "all", torch.float16)
    ref = mta_reference(*(t.double() for t in (q, k, v, *w)), causal=True)
    out = mta(q, k, v, *w, causal=True, backend="triton")
    assert out.dtype == torch.float16 and rel(out, ref) < 5e-3
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do.double())):
        assert a.dtype == torch.float16 and rel(a, b) < 1e-2
    # a future token changes no earlier output
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for a in (q2, k2, v2):
        a[:, :, 13:] += 1
    with torch.no_grad():
        o1 = mta(q, k, v, *w, causal=True, backend="triton")
        o2 = mta(q2, k2, v2, *w, causal=True, backend="triton")
    assert torch.equal(o1[:, :, :13], o2[:, :, :13]) and not torch.equal(o1[:, :, 13:], o2[:, :, 13:])
    # identity-initialised MTA is plain attention
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    for causal in (True, False):
        ident = (identity_kq(2, 3, 4, causal), torch.eye(2), identity_kq(2, 3, 4, causal), torch.eye(2)[None])
        plain = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert rel(mta(q, k, v, *ident, causal=causal, backend="triton"), plain) < 1e-5


def test_dit_with_mta_trains_a_step():
    from pipelines.imm.model import DiT

    torch.manual_seed(0)
    m = DiT(space="latent", num_tokens=16, token_dim=8, width=32, depth=4, heads=2, attn="mta")
    assert [b.attn.op_layer.use_kq for b in m.blocks] == [False, False, False, True]
    y = m(torch.randn(2, 16, 8), torch.rand(2), torch.rand(2) * 0.1, torch.tensor([0, 1]))
    y.square().mean().backward()
    assert all(p.grad is not None for p in m.blocks[3].ada.parameters())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kernel", [(3, 3), (2, 4)])
def test_key_query_convolution_written_out(causal, kernel):
    """out[i, j] = sum_{a, c} w[a, c] A[i + a - top, j + c - left] (zero outside), with the notes' placement:
    causal top = c_q - 1 (a query and the c_q - 1 before it), else (c_q - 1) // 2; keys centred, left = (c_k - 1) // 2."""
    from kernels.mta.reference import kq_conv

    cq, ck = kernel
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(1, 1, 5, 6, generator=g, dtype=torch.float64), torch.randn(1, cq, ck, generator=g, dtype=torch.float64)
    top, left = (cq - 1 if causal else (cq - 1) // 2), (ck - 1) // 2
    want = torch.zeros_like(a)
    for i in range(5):
        for j in range(6):
            for da in range(cq):
                for dc in range(ck):
                    ii, jj = i + da - top, j + dc - left
                    if 0 <= ii < 5 and 0 <= jj < 6:
                        want[0, 0, i, j] += w[0, da, dc] * a[0, 0, ii, jj]
    torch.testing.assert_close(kq_conv(a, w, causal), want)


def test_mta_layer_is_the_op_then_a_per_head_norm_and_gate():
    """o = RMSnorm(P V) * g_h * sigmoid(W x)_h (x the depth scale when on), per head h."""
    torch.manual_seed(0)
    layer = MTA(16, 4, 8, causal=True, layer=3, kernel=(3, 5))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, (q, k, v) = torch.randn(1, 9, 16), (torch.randn(1, 4, 9, 8) for _ in range(3))
    o = mta_reference(q, k, v, layer.kq_pre, layer.head_pre, layer.kq_post, layer.head_post, causal=True)
    want = o / o.pow(2).mean(-1, keepdim=True).add(torch.finfo(o.dtype).eps).sqrt() * layer.norm[None, :, None]
    want = want * torch.sigmoid(layer.gate(x)).transpose(1, 2)[..., None]
    torch.testing.assert_close(layer(x, q, k, v), want, rtol=1e-4, atol=1e-5)
