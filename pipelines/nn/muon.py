"""Muon for matrices (including each expert's matrix of a stacked [E, D, F] tensor), AdamW for the rest.

Muon (Jordan et al. 2024): momentum, then the update is orthogonalised by a quintic Newton-Schulz iteration
(an approximate U V^T of the momentum's SVD), scaled by sqrt(max(1, rows / cols)). torch.optim.Muon takes
2D parameters only; here a 3D tensor is a batch of matrices, and every matrix of one shape in the whole model
is orthogonalised in one batched call per step (a small model has many small matrices, and one call each
cost more than their arithmetic on a CPU). Used by the LM (pipelines/lm) and the IMM transformer.
"""
from __future__ import annotations

import torch


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalise g [..., m, n] (the coefficients of Keller Jordan's quintic iteration), computing
    in `dtype` (bf16 is enough, as in the reference implementation: the iteration only pushes singular values
    towards 1, but rounding differences then reach the update at bf16's precision)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:  # iterate on the wide orientation: the Gram matrix x x^T is the smaller one
        x = x.transpose(-1, -2)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.transpose(-1, -2)
        x = a * x + (b * s + c * s @ s) @ x
    return (x.transpose(-1, -2) if transpose else x).to(g.dtype)


def orthogonalise_all(updates: list[tuple[torch.Tensor, dict]], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Newton-Schulz of each momentum m (with its param group's options), scaled by sqrt(max(1, fan_out / fan_in)).
    Groups of stacked expert weights say in_out=True (stored [E, in, out], not nn.Linear's [out, in]); split_out=k
    orthogonalises k matrices side by side along the output dim separately (a fused gate | up or q | k | v
    projection). All matrices of one shape go through one batched iteration."""
    pieces = []  # per update: (dim it was split along, [(bucket key, index in the bucket, scale)])
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for m, group in updates:
        in_out, k = group.get("in_out", False), group.get("split_out", 1)
        dim = m.dim() - 1 if in_out else m.dim() - 2
        parts = m.chunk(k, dim) if m.shape[dim] % k == 0 else [m]
        placed = []
        for part in parts:
            fan_out, fan_in = (part.shape[-1], part.shape[-2]) if in_out else (part.shape[-2], part.shape[-1])
            key = (tuple(part.shape), part.dtype, part.device)
            buckets.setdefault(key, []).append(part)
            placed.append((key, len(buckets[key]) - 1, max(1.0, fan_out / fan_in) ** 0.5))
        pieces.append((dim, placed))
    done = {key: newton_schulz(torch.stack(parts), dtype=dtype) for key, parts in buckets.items()}
    out = []
    for dim, placed in pieces:
        parts = [done[key][i] * scale for key, i, scale in placed]
        out.append(torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0])
    return out


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry use_muon: True (Muon: lr, momentum, weight_decay) or False (AdamW: lr, betas, eps,
    weight_decay). One optimiser, so the shared loop's state saving and lr schedule see one object.
    bf16_newton_schulz: orthogonalise in bf16 (runs that train in bf16; 2.3x faster than fp32 on this project's
    AVX512-BF16 CPU for the IMM model's matrices),
    else in fp32 (then DDP and FSDP runs match one process to fp32 rounding)."""

    def __init__(self, groups, lr=1e-3, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 bf16_newton_schulz: bool = False):
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, use_muon=False))
        self.ns_dtype = torch.bfloat16 if bf16_newton_schulz else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        muon = []  # (param, group, Nesterov momentum): orthogonalised together below
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    muon.append((p, group, p.grad.add(buf, alpha=group["momentum"])))  # Nesterov
                else:
                    if not state:
                        state["step"] = torch.zeros(())
                        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    state["step"] += 1
                    b1, b2 = group["betas"]
                    t = state["step"].item()
                    state["exp_avg"].lerp_(p.grad, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))
        updates = orthogonalise_all([(m, group) for _, group, m in muon], self.ns_dtype)
        for (p, group, _), update in zip(muon, updates):
            p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
        return None
