"""The harness behind `sigma bench-moe`: grouped dispatch vs the per-expert loop (mask, gather, compute,
scatter per expert, as in the usual reference MoE code) vs the sorted dispatch with a matmul loop (our
fallback) vs a dense SwiGLU FFN with the same active hidden size (top_k x hidden), forward and forward +
backward, in tokens per second.

With grouped_mm it also times the grouped path's matmuls alone (the two forward and four backward grouped
matmuls on the same routing, nothing else): no dispatch can beat that floor on this machine, so
loop / floor is the most any grouped dispatch could gain over the per-expert loop here. On CUDA it also times the
Triton path (kernels/moe/triton.py: the dispatch inside the matmuls), checked against the reference first.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import HAS_GROUPED_MM, dispatch, moe_ffn


def _time_round_robin(fns: dict, device: str, repeats: int) -> dict:
    """Minimum wall time of each fn over `repeats` rounds, the fns taking turns within a round, so that a slow
    spell of a shared machine hits every method alike instead of whichever happened to be running."""
    def once(fn):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns.values():  # warm-up
        once(fn)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], once(fn))
    return best


def run_bench(tokens: int, dim: int, experts: int, hidden: int, top_k: int, dtype: str, device: str, repeats: int,
              triton: bool | None = None) -> dict:
    """triton: time the Triton path too (default: on CUDA; the tests also run it interpreted on the CPU)."""
    triton = device == "cuda" if triton is None else triton
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dt).requires_grad_()  # noqa: E731
    x = make(tokens, dim)
    w_in, w_out = make(experts, dim, 2 * hidden, scale=dim**-0.5), make(experts, hidden, dim, scale=hidden**-0.5)
    router = torch.randn(dim, experts, generator=g).to(device, dt)
    with torch.no_grad():  # a realistic, uneven routing: sigmoid scores of a random router
        scores = torch.sigmoid((x @ router).float())
        gate, idx = scores.topk(top_k, -1)
        gate = (gate / gate.sum(-1, keepdim=True)).to(dt)
    dense_g, dense_u = make(dim, top_k * hidden, scale=dim**-0.5), make(dim, top_k * hidden, scale=dim**-0.5)
    dense_d = make(top_k * hidden, dim, scale=(top_k * hidden) ** -0.5)
    dy = torch.randn(tokens, dim, generator=g).to(device, dt)

    def matmuls_only(backward: bool):
        """The grouped path's matmuls on ready operands: h = xs W_in and ys = a W_out; backward also
        da = dys W_out^T, dW_out = a^T dys, dW_in = xs^T dh, dxs = dh W_in^T (all grouped by expert)."""
        with torch.no_grad():
            order, token, counts = dispatch(idx, experts)
            offs = counts.cumsum(0).to(torch.int32)
            xs = x.detach().index_select(0, token)
            a, dys = torch.randn(len(token), hidden).to(device, dt), dy.index_select(0, token)
            dh = torch.randn(len(token), 2 * hidden).to(device, dt)
            wi, wo = w_in.detach(), w_out.detach()
        gmm = lambda p, q: torch._grouped_mm(p, q, offs=offs)  # noqa: E731

        def run():
            gmm(xs, wi), gmm(a, wo)
            if backward:
                gmm(dys, wo.transpose(1, 2)), gmm(a.t(), dys), gmm(xs.t(), dh), gmm(dh, wi.transpose(1, 2))
        return run

    fns = {
        "grouped": (lambda: moe_ffn(x, w_in, w_out, idx, gate, "grouped"), [x, w_in, w_out]),
        "sorted-loop": (lambda: moe_ffn(x, w_in, w_out, idx, gate, "sorted-loop"), [x, w_in, w_out]),
        "loop": (lambda: moe_ffn(x, w_in, w_out, idx, gate, "loop"), [x, w_in, w_out]),
        "dense": (lambda: (F.silu(x @ dense_g) * (x @ dense_u)) @ dense_d, [x, dense_g, dense_u, dense_d]),
    }
    triton_check = {}
    with torch.no_grad():
        ref = moe_ffn(x, w_in, w_out, idx, gate, "reference")
        check = (moe_ffn(x, w_in, w_out, idx, gate, "grouped") - ref).abs().max().item()
        if triton:
            fns["triton"] = (lambda: moe_ffn(x, w_in, w_out, idx, gate, "triton"), [x, w_in, w_out])
            triton_check = {"triton_check_max_abs": (moe_ffn(x, w_in, w_out, idx, gate, "triton") - ref).abs().max().item()}
    fwd = {name: fn for name, (fn, _) in fns.items()}
    fwd_bwd = {name: (lambda fn=fn, leaves=leaves: torch.autograd.grad(fn(), leaves, dy)) for name, (fn, leaves) in fns.items()}
    if HAS_GROUPED_MM:
        fwd["grouped-matmuls-only"], fwd_bwd["grouped-matmuls-only"] = matmuls_only(False), matmuls_only(True)
    with torch.no_grad():
        t_f = _time_round_robin(fwd, device, repeats)
    t_fb = _time_round_robin(fwd_bwd, device, repeats)
    methods = {name: {"forward_s": t_f[name], "forward_backward_s": t_fb[name], "forward_tokens_per_s": tokens / t_f[name],
                      "forward_backward_tokens_per_s": tokens / t_fb[name]} for name in t_f}
    m = methods
    extra = {"grouped_vs_loop_ceiling": t_fb["loop"] / t_fb["grouped-matmuls-only"]} if HAS_GROUPED_MM else {}
    if "triton" in t_fb:
        extra.update(triton_check, triton_vs_grouped=t_fb["grouped"] / t_fb["triton"], triton_vs_loop=t_fb["loop"] / t_fb["triton"])
    return {**extra, "tokens": tokens, "dim": dim, "experts": experts, "hidden": hidden, "top_k": top_k, "dtype": dtype,
            "device": device, "check_max_abs": check, "methods": methods,
            "grouped_vs_dense": m["grouped"]["forward_backward_tokens_per_s"] / m["dense"]["forward_backward_tokens_per_s"],
            "grouped_vs_loop": m["grouped"]["forward_backward_tokens_per_s"] / m["loop"]["forward_backward_tokens_per_s"]}
