"""Multi-Token Attention, the specification in plain PyTorch (materialises B x H x S x S; tests only).

Golovneva et al., "Multi-Token Attention" (arXiv 2504.00927), steps 1-6 of ../shared/notes/mta.md; the
per-head RMS norm, depth scaling and output gate (step 7) are cheap and live in module.py.

  A  = Q K^T / sqrt(d)                                   (1)
  A  = conv_kq_pre(A)         kernel c_q x c_k per head   (2)  causal: future scores 0 before the conv
  A  = W_pre A                H x H head mixing           (3)
  P  = softmax(A)             fp32; causal: -inf mask     (4)
  P  = conv_kq_post(P)                                    (5)  causal: future set to 0 again, no renormalisation
  P  = W_post P               c_h x c_h per head group    (6)
  O  = P V

Axis legend: B batch, H heads, S tokens, K head dim; c_q x c_k the key-query kernel (query rows x key
columns), c_h heads per group of the post-softmax head convolution.
Padding: causal: c_q - 1 rows above (a query sees itself and the c_q - 1 queries before it), keys centred;
bidirectional: centred on both axes, top = (c_q - 1) // 2 rows above, the rest below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def up(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> fp32 for the arithmetic; fp32 and fp64 stay (fp64 gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kq_padding(cq: int, ck: int, causal: bool) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of the score plane for a c_q x c_k convolution."""
    left = (ck - 1) // 2
    top = cq - 1 if causal else (cq - 1) // 2
    return left, ck - 1 - left, top, cq - 1 - top


def identity_kq(heads: int, cq: int, ck: int, causal: bool) -> torch.Tensor:
    """[H, c_q, c_k] kernel that leaves the scores unchanged: 1 at the tap of the query itself."""
    w = torch.zeros(heads, cq, ck)
    left, _, top, _ = kq_padding(cq, ck, causal)
    w[:, top, left] = 1.0
    return w


def kq_conv(a: torch.Tensor, weight: torch.Tensor, causal: bool) -> torch.Tensor:
    """Depthwise 2D convolution of the score plane a: [B, H, S_q, S_k] with weight [H, c_q, c_k]."""
    H, cq, ck = weight.shape
    a = F.pad(a, kq_padding(cq, ck, causal))
    return F.conv2d(a, weight[:, None].to(a.dtype), groups=H)


def head_conv(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mix heads within groups: p [B, H, ...], weight [H / c_h, c_h, c_h] (one group of all heads = H x H)."""
    G, ch, _ = weight.shape
    B, H = p.shape[:2]
    p = p.reshape(B, G, ch, *p.shape[2:])
    return torch.einsum("gac,bgc...->bga...", weight.to(p.dtype), p).reshape(B, H, *p.shape[3:])


def mta_reference(q, k, v, kq_pre=None, head_pre=None, kq_post=None, head_post=None, causal: bool = False):
    """q, k, v: [B, H, S, K]; kq_pre, kq_post: [H, c_q, c_k] or None (skipped); head_pre: [H, H] or None;
    head_post: [H / c_h, c_h, c_h] or None. Returns O = P V: [B, H, S, K] (before the norm and gate).
    Causal, q may hold only the last T of the S queries (decoding): row t of the result is then exact when the
    2 (c_q - 1) queries before it are among them (the convolutions see zeros above the first row)."""
    T, S = q.shape[2], k.shape[2]
    if T != S and not causal:
        raise ValueError(f"MTA: {T} queries for {S} keys; only causal attention takes the last queries alone")
    a = (up(q) @ up(k).transpose(-1, -2)) * q.shape[-1] ** -0.5  # (1)
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1) if causal else None
    if kq_pre is not None:  # (2)
        if causal:
            a = a.masked_fill(future, 0.0)
        a = kq_conv(a, kq_pre, causal)
    if head_pre is not None:  # (3): a head_conv with one group of all H heads
        a = head_conv(a, head_pre[None])
    if causal:
        a = a.masked_fill(future, float("-inf"))
    p = torch.softmax(a, dim=-1)  # (4)
    if kq_post is not None:  # (5)
        p = kq_conv(p, kq_post, causal)
        if causal:
            p = p.masked_fill(future, 0.0)
    if head_post is not None:  # (6)
        p = head_conv(p, head_post)
    return (p @ up(v)).to(q.dtype)
