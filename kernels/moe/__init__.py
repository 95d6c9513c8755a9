"""Routed expert FFNs (DeepSeekMoE): dispatch by sorting tokens by expert, then grouped matmuls.

    moe_ffn(x, w_in, w_out, topk_idx, topk_gate, backend="auto") -> [T, D]

x: [T, D]; w_in: [E, D, 2F] (SwiGLU gate | up, one matmul for both); w_out: [E, F, D];
topk_idx: [T, k] int64; topk_gate: [T, k].
backend: "grouped" (argsort by expert -> gather -> torch._grouped_mm for the two SwiGLU matmuls, the gate
folded into the hidden activations (F wide, not D) -> index_add back; dropless), "sorted-loop" (the same dispatch with one matmul per expert: the
fallback where grouped_mm is missing), "loop" (the usual per-expert loop of reference MoE code: find each
expert's tokens with a mask, gather, compute, scatter-add; the baseline), "reference" (every expert on
every token), "auto" = grouped when this torch has it and its rows are whole 16-byte units (grouped_mm_fits),
else sorted-loop; "triton" (kernels/moe/triton.py: the gather, SwiGLU, gate and scatter-add done inside the
grouped matmuls' loads and epilogues; CUDA tensors, or any under TRITON_INTERPRET=1 for the tests; opt-in, since
no GPU has measured it against grouped_mm yet). Under autocast the grouped matmuls run in autocast's dtype (autocast_dtype: grouped_mm is on
none of its lists), the sum over the k experts in x's. index_add_ is sequential on the CPU, so every path is
deterministic there (on CUDA it uses atomics: not bitwise reproducible).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import expert_ffn, moe_reference, swiglu

BACKENDS = ("auto", "grouped", "sorted-loop", "loop", "reference", "triton")
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # (not fp64: gradcheck runs the sorted loop)


def grouped_mm_fits(dim: int, hidden: int, element_size: int) -> bool:
    """torch._grouped_mm reads rows of whole 16-byte units only: the width and the experts' hidden size, in bytes,
    must be multiples of 16 (e.g. of 4 in fp32, of 8 in bf16)."""
    return dim * element_size % 16 == 0 and hidden * element_size % 16 == 0


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of x in. torch._grouped_mm is not on autocast's lists, so under
    autocast it stayed fp32, and on CUDA only bf16 takes its fused kernel (SM90+): fp32 ran a loop of mm."""
    device = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)  # (autocast leaves fp64 alone)
    return x.dtype


def _grouped_mm(x, w, offs):
    if not (w.is_contiguous() or w.transpose(-1, -2).is_contiguous()):  # grouped_mm takes row- or column-major
        w = w.contiguous()  # experts only: a strided view (w[..., ::2], experts innermost) is copied
    y = torch._grouped_mm(x, w, offs=offs)
    if y.requires_grad:  # grouped_mm's backward rejects expanded (stride-0) gradients: make them dense
        y.register_hook(lambda g: g.contiguous())
    return y


def dispatch(topk_idx: torch.Tensor, num_experts: int):
    """Sort the T*k (token, slot) pairs by expert. Returns (order, token of each sorted pair, counts [E])."""
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    # (not bincount: on CUDA it reads the largest id back to size its output, a host sync every layer)
    return order, order // topk_idx.shape[1], counts


# Eager under torch.compile (`--compile`): how many tokens each expert gets changes every step, and traced, those
# sizes became guards that recompiled the graph at every step (train-lm --compile ran 12x slower than eager, measured
# in BENCHMARKS.md); grouped_mm's tracing kernel also takes bf16 only in torch 2.14. The rest of the layer compiles.
@torch.compiler.disable
def moe_ffn(x, w_in, w_out, topk_idx, topk_gate, backend: str = "auto"):
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r} (have: {', '.join(BACKENDS)})")
    if backend == "reference":
        return moe_reference(x, w_in, w_out, topk_idx, topk_gate)
    compute = autocast_dtype(x)
    fits = grouped_mm_fits(x.shape[-1], w_out.shape[1], compute.itemsize)
    if backend == "auto":
        backend = "grouped" if HAS_GROUPED_MM and fits and compute in GROUPED_MM_DTYPES else "sorted-loop"
    if backend == "grouped" and not fits:
        raise ValueError(f"MoE backend 'grouped': width {x.shape[-1]} and expert hidden size {w_out.shape[1]} must be "
                         f"multiples of {16 // compute.itemsize} in {compute} (torch._grouped_mm reads 16-byte "
                         "units); use 'auto' or 'sorted-loop'")
    E = w_in.shape[0]
    if backend == "loop":
        out = torch.zeros_like(x)
        for e in range(E):
            token, slot = (topk_idx == e).nonzero(as_tuple=True)
            if len(token):
                y = expert_ffn(x[token], w_in[e], w_out[e]) * topk_gate[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y.to(x.dtype))  # in place, as the usual loop does (a copy of out per expert would slow the baseline)
        return out
    order, token, counts = dispatch(topk_idx, E)
    if backend == "triton":
        return _triton_ffn(x, w_in, w_out, topk_gate, order, token, counts, compute)
    xs = x.index_select(0, token)  # [T*k, D], grouped by expert
    gate = topk_gate.reshape(-1)[order].to(x.dtype)[:, None]
    if backend == "grouped":
        offs = counts.cumsum(0).to(torch.int32)
        xs, w_in, w_out, gate = (t.to(compute) for t in (xs, w_in, w_out, gate))  # what autocast does for `@`
        ys = _grouped_mm(swiglu(_grouped_mm(xs, w_in, offs)) * gate, w_out, offs)
    else:
        ys = torch.cat([swiglu(part @ w_in[e]) * g @ w_out[e]
                        for e, (part, g) in enumerate(zip(xs.split(counts.tolist()), gate.split(counts.tolist())))])
    return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))  # autocast may have made ys bf16


def _triton_ffn(x, w_in, w_out, topk_gate, order, token, counts, compute):
    from kernels.common import triton_interpreted

    if x.device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"MoE backend 'triton' runs on CUDA tensors (these are on {x.device}); use 'auto'")
    if compute not in GROUPED_MM_DTYPES:
        raise ValueError(f"MoE backend 'triton' takes fp32, bf16 or fp16, not {compute}; use 'auto'")
    from .triton import expert_ffn_triton  # (imports triton: only when asked for)

    gate = topk_gate.reshape(-1)[order]
    return expert_ffn_triton(*(t.to(compute) for t in (x, w_in, w_out, gate)), token, counts, out_dtype=x.dtype)


__all__ = ["moe_ffn", "moe_reference", "dispatch", "grouped_mm_fits", "BACKENDS", "HAS_GROUPED_MM"]
