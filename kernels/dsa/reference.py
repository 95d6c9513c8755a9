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


def causal_mask(queries: int, keys: int, device=None) -> torch.Tensor:
    """[T, S] bool, True where key s is not in query t's future; the T queries are the last T of the S tokens
    (T = S when training; fewer when decoding with a cache)."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def indexer_scores(q_idx, k_idx, w):
    """q_idx: [B, T, J, E]; k_idx: [B, S, E]; w: [B, T, J] -> I: [B, T(query), S(key)], future keys -inf (the
    queries are the last T of the S tokens)."""
    dots = F.relu(torch.einsum("btje,bse->btjs", q_idx, k_idx))  # [B, T, J, S]
    scores = torch.einsum("btj,btjs->bts", w, dots)
    return scores.masked_fill(~causal_mask(q_idx.shape[1], k_idx.shape[1], q_idx.device), float("-inf"))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, S] causal-masked scores -> bool [B, T, S]: each query's top-k past tokens (all of them if fewer).
    Scores equal to bf16's precision rank as ties, and ties go to the latest tokens. Ties are common: a key whose
    ReLU terms are all 0 scores exactly 0, and at the first layer equal bytes have equal keys. topk's order among
    them is unspecified, and decoding with a cache must choose as the full forward does, although its matmuls
    round the same dot product differently in the last bit (bf16 makes those equal again, except for a score within
    that last bit of a bf16 rounding midpoint: rare, not ruled out)."""
    k = min(k, scores.shape[-1])
    ranked = scores.to(torch.bfloat16).flip(-1)
    latest_first = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.shape[-1] - 1 - latest_first, True)
    return mask & torch.isfinite(scores)  # early queries have fewer than k past tokens: never pick a -inf


def attention_probs(q, k, mask):
    """q: [B, H, T, K], k: [B, H, S, K] (k already expanded to H heads); mask: [B, T, S] or [T, S] bool -> P [B, H, T, S]."""
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
