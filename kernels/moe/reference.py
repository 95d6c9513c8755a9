"""DeepSeekMoE expert FFNs, the specification: every expert on every token, weighted by the (sparse) gates.

x: [T, D] tokens; w_gate, w_up: [E, D, F]; w_down: [E, F, D] (SwiGLU experts); topk_idx, topk_gate: [T, k].
out[t] = sum_j topk_gate[t, j] * expert_{topk_idx[t, j]}(x[t]),  expert_e(x) = (silu(x Wg_e) * (x Wu_e)) Wd_e.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_ffn(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def moe_reference(x, w_gate, w_up, w_down, topk_idx, topk_gate):
    E = w_gate.shape[0]
    gates = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device).scatter_add(1, topk_idx, topk_gate.to(x.dtype))
    out = torch.zeros_like(x)
    for e in range(E):
        out = out + gates[:, e : e + 1] * expert_ffn(x, w_gate[e], w_up[e], w_down[e])
    return out
