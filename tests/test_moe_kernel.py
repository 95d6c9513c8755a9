"""The Triton MoE kernels (kernels/moe/triton.py), interpreted on the CPU, against the plain reference."""
import pytest
import torch

import kernels.common
from kernels.moe import moe_ffn, moe_reference
from kernels.moe import triton as moe_triton
from pipelines.lm.model import MoE


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    monkeypatch.setattr(moe_triton, "FILL_NAN", True)


def rel(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def routed_inputs(T=120, D=80, F=72, E=5, k=3, dtype=torch.float32):
    """Sizes that cross every tile edge of the kernels: D and 2F over one column tile and the reduction tiles (with a
    remainder), an expert with more sorted pairs than one row tile (BM = 64), an expert nobody picks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    w_in, w_out = torch.randn(E, D, 2 * F, generator=g) * D**-0.5, torch.randn(E, F, D, generator=g) * F**-0.5
    scores = torch.rand(T, E, generator=g)
    scores[:, 0] += 0.5  # expert 0 is in almost every token's top-k: two row tiles
    scores[:, 3] = -1  # expert 3 gets nothing
    gate, idx = scores.topk(k, -1)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w_in, w_out, gate)]
    return leaves, idx


@pytest.mark.parametrize("dtype,tol,split_rows", [(torch.float32, 1e-5, 256), (torch.float16, 5e-3, 256),
                                                  (torch.float32, 1e-5, 16)])
def test_triton_matches_reference_forward_and_gradients(dtype, tol, split_rows, monkeypatch):
    """split_rows 16: the weight gradients summed over several row chunks an expert, one of them past the rows."""
    monkeypatch.setattr(moe_triton, "SPLIT_ROWS", split_rows)
    (x, w_in, w_out, gate), idx = routed_inputs(dtype=dtype)
    assert (idx == 0).sum() > moe_triton.BM and not (idx == 3).any()
    out = moe_ffn(x, w_in, w_out, idx, gate, "triton")
    assert out.dtype == dtype
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w_in, w_out, gate)]
    ref = moe_reference(*leaves64[:3], idx, leaves64[3])
    assert rel(out, ref) < tol
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [x, w_in, w_out, gate], dy.to(dtype))
    for name, a, b in zip(["x", "w_in", "w_out", "gate"], grads, torch.autograd.grad(ref, leaves64, dy.double())):
        assert a.dtype == dtype and rel(a, b) < tol, name


def test_triton_gradients_only_where_asked(monkeypatch):
    """Frozen weights (DSA's warm-up, a frozen LM): the weight-gradient kernels are skipped, the rest is unchanged."""
    (x, w_in, w_out, gate), idx = routed_inputs(T=40, D=16, F=16, E=4, k=2)
    w_in.requires_grad_(False)
    w_out.requires_grad_(False)
    dx, dgate = torch.autograd.grad(moe_ffn(x, w_in, w_out, idx, gate, "triton").sum(), [x, gate])
    rx, rgate = torch.autograd.grad(moe_reference(x, w_in, w_out, idx, gate).sum(), [x, gate])
    assert rel(dx, rx) < 1e-5 and rel(dgate, rgate) < 1e-5
    x.requires_grad_(False)  # only w_out: its gradient needs no dh, so the SwiGLU backward is skipped
    gate = gate.detach()
    w_out.requires_grad_(True)
    launches = []
    real = moe_triton._rows_launch
    monkeypatch.setattr(moe_triton, "_rows_launch", lambda *a, **k: launches.append(k) or real(*a, **k))
    (dw,) = torch.autograd.grad(moe_ffn(x, w_in, w_out, idx, gate, "triton").sum(), [w_out])
    (rw,) = torch.autograd.grad(moe_reference(x, w_in, w_out, idx, gate).sum(), [w_out])
    assert rel(dw, rw) < 1e-5 and not any(k.get("swiglu_bwd") for k in launches) and len(launches) == 2


def test_triton_inference_keeps_no_pre_activations(monkeypatch):
    """Under no_grad (generation) the forward writes no au [S, 2F]: nothing will read it."""
    (x, w_in, w_out, gate), idx = routed_inputs(T=40, D=16, F=16, E=4, k=2)
    shapes = []
    real = moe_triton._empty
    monkeypatch.setattr(moe_triton, "_empty", lambda *s, **k: shapes.append(s) or real(*s, **k))
    with torch.no_grad():
        out = moe_ffn(x, w_in, w_out, idx, gate, "triton")
    assert rel(out, moe_reference(x, w_in, w_out, idx, gate)) < 1e-5
    assert shapes == [(80, 16)]  # h only
    moe_ffn(x, w_in, w_out, idx, gate, "triton")
    assert shapes[1:] == [(80, 16), (80, 32)]  # h and au when a backward may come


def test_fp32_dots_follow_torch_matmul_precision():
    """Triton's fp32 tl.dot defaults to TF32 on a GPU; the kernels use IEEE unless torch's fp32 matmuls may use TF32."""
    before = torch.get_float32_matmul_precision()
    try:
        assert moe_triton._precision(torch.float32) == "ieee" and moe_triton._precision(torch.bfloat16) is None
        torch.set_float32_matmul_precision("high")
        assert moe_triton._precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_moe_layer_runs_the_triton_backend():
    torch.manual_seed(0)
    layer = MoE(32, experts=4, hidden=16, top_k=2, shared=1)
    with torch.no_grad():
        layer.w_out.normal_(0, 0.1)  # (zero at init: every routed expert would be silent)
    x = torch.randn(2, 10, 32)
    ref = layer(x)
    layer.backend = "triton"
    assert rel(layer(x), ref) < 1e-5


def test_triton_backend_refuses_what_it_cannot_run(monkeypatch):
    (x, w_in, w_out, gate), idx = routed_inputs(T=8, D=16, F=16, E=4, k=2)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        moe_ffn(x.double(), w_in.double(), w_out.double(), idx, gate.double(), "triton")
    monkeypatch.setattr(kernels.common, "triton_interpreted", lambda: False)  # a CPU tensor, compiled Triton
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        moe_ffn(x, w_in, w_out, idx, gate, "triton")


def test_bench_moe_times_and_checks_the_triton_path():
    from kernels.moe.bench import run_bench

    r = run_bench(64, 16, 4, 16, 2, "fp32", "cpu", 1, triton=True)
    assert "triton" in r["methods"] and r["triton_check_max_abs"] < 1e-5
    assert r["triton_vs_loop"] == pytest.approx(r["methods"]["triton"]["forward_backward_tokens_per_s"]
                                                 / r["methods"]["loop"]["forward_backward_tokens_per_s"])
    assert "triton" not in run_bench(64, 16, 4, 16, 2, "fp32", "cpu", 1)["methods"]  # on the CPU only when asked


def test_triton_computes_in_the_autocast_dtype_and_sums_in_x_dtype():
    """As the grouped path: under autocast the matmuls run in its dtype (fp16 here: the interpreter's bf16 tl.dot
    is unreliable), the sum over the k experts stays in x's fp32, and gradients come back in fp32."""
    (x, w_in, w_out, gate), idx = routed_inputs(T=40, D=16, F=16, E=4, k=2)
    with torch.autocast("cpu", dtype=torch.float16):
        out = moe_ffn(x, w_in, w_out, idx, gate, "triton")
    assert out.dtype == torch.float32
    half = moe_ffn(*(t.half() for t in (x, w_in, w_out)), idx, gate.half(), "triton")
    ref = moe_reference(x, w_in, w_out, idx, gate)
    assert rel(out, ref) < 5e-3 and rel(out, ref) > 1e-6  # computed in fp16
    assert rel(out, ref) < rel(half.float(), ref)  # summed in fp32, not rounded to fp16 at the end
    grads = torch.autograd.grad(out.square().sum(), [x, w_in, w_out, gate])
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
