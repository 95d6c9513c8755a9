"""DeepSeekMoE expert FFNs, the specification: every expert on every token, weighted by the (sparse) gates.

x: [T, D] tokens; w_in: [E, D, 2F] (the SwiGLU gate and up projections side by side: one matmul for both);
w_out: [E, F, D]; topk_idx, topk_gate: [T, k].
out[t] = sum_j topk_gate[t, j] * expert_{topk_idx[t, j]}(x[t]),
expert_e(x) = (silu(x Wg_e) * (x Wu_e)) Wd_e  with [Wg_e | Wu_e] = w_in[e], Wd_e = w_out[e].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[..., 2F] (gate | up) -> [..., F]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_ffn(x, w_in, w_out):
    return swiglu(x @ w_in) @ w_out


def moe_reference(x, w_in, w_out, topk_idx, topk_gate):
    E = w_in.shape[0]
    gates = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device).scatter_add(1, topk_idx, topk_gate.to(x.dtype))
    out = torch.zeros_like(x)
    for e in range(E):
        out = out + gates[:, e : e + 1] * expert_ffn(x, w_in[e], w_out[e])
    return out
