"""Muon for matrices (including each expert's matrix of a stacked [E, D, F] tensor), AdamW for the rest.

Muon (Jordan et al. 2024): momentum, then the update is orthogonalised by a quintic Newton-Schulz iteration
(an approximate U V^T of the momentum's SVD), scaled by sqrt(max(1, rows / cols)). torch.optim.Muon takes
2D parameters only; here a 3D tensor is a batch of matrices, one Muon step each, in one call.
"""
from __future__ import annotations

import torch


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise g [..., m, n] (the coefficients of Keller Jordan's quintic iteration)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = x.transpose(-1, -2)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.transpose(-1, -2)
        x = a * x + (b * s + c * s @ s) @ x
    return (x.transpose(-1, -2) if transpose else x).to(g.dtype)


def orthogonalised(m: torch.Tensor, group: dict) -> torch.Tensor:
    """Newton-Schulz of the momentum, scaled by sqrt(max(1, fan_out / fan_in)). Groups of stacked expert weights
    say in_out=True (stored [E, in, out], not nn.Linear's [out, in]); split_out=k orthogonalises k matrices side by
    side along the output dim separately (the fused SwiGLU gate | up projection)."""
    in_out = group.get("in_out", False)
    parts = m.chunk(group.get("split_out", 1), dim=-1 if in_out else -2) if m.shape[-1 if in_out else -2] % group.get("split_out", 1) == 0 else [m]
    out = []
    for part in parts:
        fan_out, fan_in = (part.shape[-1], part.shape[-2]) if in_out else (part.shape[-2], part.shape[-1])
        out.append(newton_schulz(part) * max(1.0, fan_out / fan_in) ** 0.5)
    return torch.cat(out, dim=-1 if in_out else -2) if len(out) > 1 else out[0]


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry use_muon: True (Muon: lr, momentum, weight_decay) or False (AdamW: lr, betas, eps,
    weight_decay). One optimiser, so the shared loop's state saving and lr schedule see one object."""

    def __init__(self, groups, lr=1e-3, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, use_muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["use_muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = orthogonalised(p.grad.add(buf, alpha=group["momentum"]), group)  # Nesterov
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
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
        return None
