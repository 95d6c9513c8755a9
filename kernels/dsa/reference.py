"""DeepSeek Sparse Attention (DeepSeek-V3.2), mask-based: the specification and the CPU path.

Lightning indexer: I[t, s] = sum_j w[t, j] * ReLU(q_idx[t, j] . k_idx[s])  (a few indexer heads j, one key per
token shared by them, weights w from a projection of x). Each query attends only to its top-k tokens by I.
The causal mask is applied BEFORE the top-k (a future token can never be chosen) and again in attention.
On the CPU this masks a dense score matrix: DSA is a quality option here, not a speed one (notes/moe_lm.md).

Axis legend: B batch, H heads, T tokens, K head dim, J indexer heads, E indexer dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def indexer_scores(q_idx, k_idx, w):
    """q_idx: [B, T, J, E]; k_idx: [B, T, E]; w: [B, T, J] -> I: [B, T(query), T(key)], future keys -inf."""
    T = q_idx.shape[1]
    dots = F.relu(torch.einsum("btje,bse->btjs", q_idx, k_idx))  # [B, T, J, T]
    scores = torch.einsum("btj,btjs->bts", w, dots)
    future = torch.ones(T, T, dtype=torch.bool, device=q_idx.device).triu(1)
    return scores.masked_fill(future, float("-inf"))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, T] causal-masked scores -> bool [B, T, T]: each query's top-k past tokens (all of them if fewer)."""
    k = min(k, scores.shape[-1])
    top = scores.topk(k, dim=-1)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, True)
    return mask & torch.isfinite(scores)  # early queries have fewer than k past tokens: never pick a -inf


def attention_probs(q, k, mask):
    """q, k: [B, H, T, K] (k already expanded to H heads); mask: [B, T, T] or [T, T] bool -> P [B, H, T, T]."""
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    m = mask[:, None] if mask.dim() == 3 else mask
    return torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1)


def indexer_kl(p_main: torch.Tensor, scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) per query over `support` (bool [B, T, T]), averaged over queries.
    p_main: [B, H, T, T] main-attention probabilities (summed over heads, L1-normalised here, no gradient)."""
    target = p_main.detach().sum(1).masked_fill(~support, 0.0)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    log_q = torch.log_softmax(scores.masked_fill(~support, float("-inf")), dim=-1)
    kl = torch.where(support & (target > 0), target * (target.clamp_min(1e-12).log() - log_q), torch.zeros_like(target))
    return kl.sum(-1).mean()
