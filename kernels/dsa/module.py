"""The DSA layer: lightning indexer parameters, stage logic and the indexer's KL loss (read by the trainer)."""
from __future__ import annotations

import torch
from torch import nn

from .reference import attention_probs, causal_mask, indexer_kl, indexer_scores, topk_mask

STAGES = ("warmup", "sparse")


class DSA(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, top_k: int = 32, index_heads: int = 4, index_dim: int = 32,
                 stage: str = "sparse"):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"DSA stage must be one of {', '.join(STAGES)}, not {stage!r}")
        if top_k < 1:
            raise ValueError(f"DSA top_k must be at least 1, not {top_k}")
        self.top_k, self.stage, self.index_heads, self.index_dim = top_k, stage, index_heads, index_dim
        self.index_q = nn.Linear(dim, index_heads * index_dim, bias=False)
        self.index_k = nn.Linear(dim, index_dim, bias=False)
        self.index_w = nn.Linear(dim, index_heads, bias=False)
        self.indexer_loss = None

    def indexer_parameters(self):
        return [*self.index_q.parameters(), *self.index_k.parameters(), *self.index_w.parameters()]

    def forward(self, x, q, k, v, cache: dict | None = None):
        """x: [B, T, D]; q: [B, H, T, K]; k, v: [B, H, S, K] (expanded to H heads), S = T, or with a cache the
        S tokens so far, of which x and q are the last T. Returns [B, H, T, K]."""
        B, T, _ = x.shape
        xi = x.detach() if self.stage == "sparse" else x  # sparse stage: the indexer learns only from its KL
        index_k = self.index_k(xi)
        if cache is not None:  # decoding: the indexer's keys of the earlier tokens, beside the layer's K and V
            if "index_k" in cache:
                index_k = torch.cat([cache["index_k"], index_k], 1)
            cache["index_k"] = index_k
        scores = indexer_scores(self.index_q(xi).view(B, T, self.index_heads, self.index_dim), index_k,
                                self.index_w(xi) * self.index_heads**-0.5)
        if self.stage == "warmup":
            support = causal_mask(T, k.shape[2], x.device).expand(B, -1, -1)
        else:
            support = topk_mask(scores, self.top_k)
        p = attention_probs(q, k, support)  # the selection again includes the causal mask
        self.indexer_loss = indexer_kl(p, scores, support) if self.training else None
        return (p.to(v.dtype) @ v)
