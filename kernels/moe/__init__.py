"""Routed expert FFNs (DeepSeekMoE): dispatch by sorting tokens by expert, then grouped matmuls.

    moe_ffn(x, w_gate, w_up, w_down, topk_idx, topk_gate, backend="auto") -> [T, D]

x: [T, D]; w_gate, w_up: [E, D, F]; w_down: [E, F, D]; topk_idx: [T, k] int64; topk_gate: [T, k].
backend: "grouped" (argsort by expert -> gather -> torch._grouped_mm for the three SwiGLU matmuls -> scale
by the gate -> index_add back; dropless), "loop" (the same dispatch with one matmul per expert: the
fallback where grouped_mm is missing), "reference" (every expert on every token), "auto" = grouped when
this torch has it. index_add_ on the CPU is sequential, so the result is deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import expert_ffn, moe_reference

BACKENDS = ("auto", "grouped", "loop", "reference")
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _grouped_mm(x, w, offs):
    y = torch._grouped_mm(x, w, offs=offs)
    if y.requires_grad:  # grouped_mm's backward rejects expanded (stride-0) gradients: make them dense
        y.register_hook(lambda g: g.contiguous())
    return y


def dispatch(topk_idx: torch.Tensor, num_experts: int):
    """Sort the T*k (token, slot) pairs by expert. Returns (order, token of each sorted pair, counts [E])."""
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, order // topk_idx.shape[1], counts


def moe_ffn(x, w_gate, w_up, w_down, topk_idx, topk_gate, backend: str = "auto"):
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r} (have: {', '.join(BACKENDS)})")
    if backend == "reference":
        return moe_reference(x, w_gate, w_up, w_down, topk_idx, topk_gate)
    if backend == "auto":
        backend = "grouped" if HAS_GROUPED_MM else "loop"
    E = w_gate.shape[0]
    order, token, counts = dispatch(topk_idx, E)
    xs = x.index_select(0, token)  # [T*k, D], grouped by expert
    gate = topk_gate.reshape(-1)[order].to(x.dtype)[:, None]
    if backend == "grouped":
        offs = counts.cumsum(0).to(torch.int32)
        h = F.silu(_grouped_mm(xs, w_gate, offs)) * _grouped_mm(xs, w_up, offs)
        ys = _grouped_mm(h, w_down, offs)
    else:
        ys = torch.cat([expert_ffn(part, w_gate[e], w_up[e], w_down[e])
                        for e, part in enumerate(xs.split(counts.tolist()))])
    return torch.zeros_like(x).index_add_(0, token, ys * gate)


__all__ = ["moe_ffn", "moe_reference", "dispatch", "BACKENDS", "HAS_GROUPED_MM"]
