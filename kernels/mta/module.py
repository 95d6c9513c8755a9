"""The MTA layer's parameters around the op: key-query kernels, head mixing, per-head RMS norm, depth
scaling and output gate (step 7 of ../shared/notes/mta.md). Used by pipelines.nn.layers.Attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import mta
from .reference import identity_kq, mta_reference


class MTA(nn.Module):
    """kq_every: the key-query convolutions run in layers where (layer + 1) % kq_every == 0 (every 4th layer
    by default, as the authors did); head mixing and the head convolution run in every layer. Everything
    starts at the identity, so the attention weights start as plain softmax attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, causal: bool = False, layer: int = 0, kernel=(6, 11),
                 head_group: int = 2, kq_every: int = 4, depth_scale: bool = False, backend: str = "auto"):
        super().__init__()
        cq, ck = kernel
        if heads % head_group:
            raise ValueError(f"MTA: {heads} heads do not split into head groups of {head_group}")
        self.causal, self.backend, self.heads, self.head_group, self.kernel = causal, backend, heads, head_group, (cq, ck)
        self.use_kq = kq_every > 0 and (layer + 1) % kq_every == 0
        if self.use_kq:
            self.kq_pre = nn.Parameter(torch.zeros(heads, cq, ck))
            self.kq_post = nn.Parameter(torch.zeros(heads, cq, ck))
        self.head_pre = nn.Parameter(torch.zeros(heads, heads))
        self.head_post = nn.Parameter(torch.zeros(heads // head_group, head_group, head_group))
        self.norm = nn.Parameter(torch.ones(heads, head_dim))
        lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer)  # (Differential Transformer's schedule, as the authors)
        self.out_scale = (1 - lambda_init) if depth_scale else 1.0
        self.gate = nn.Linear(dim, heads)
        self.init_weights()

    def init_weights(self):
        if self.use_kq:
            self.kq_pre.data.copy_(identity_kq(self.heads, *self.kernel, self.causal))
            self.kq_post.data.copy_(identity_kq(self.heads, *self.kernel, self.causal))
        self.head_pre.data.copy_(torch.eye(self.heads))
        self.head_post.data.copy_(torch.eye(self.head_group).expand_as(self.head_post))
        self.norm.data.fill_(1.0)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: dict | None = None) -> torch.Tensor:
        """x: [B, T, D] (for the gate); q: [B, H, T, K]; k, v: [B, H, S, K], S = T, or when decoding with a cache
        (causal) the S tokens so far, of which x and q are the last T. Returns [B, H, T, K]."""
        kq_pre = self.kq_pre if self.use_kq else None
        kq_post = self.kq_post if self.use_kq else None
        T, S = q.shape[2], k.shape[2]
        if cache is not None:  # row t of the two query convolutions reads the 2 (c_q - 1) queries before it
            history = 2 * (self.kernel[0] - 1) if self.use_kq else 0
            q_all = torch.cat([cache["q"], q], 2) if "q" in cache else q
            cache["q"] = q_all[:, :, max(0, q_all.shape[2] - history):]
            q = q_all
        if T < S:  # decoding: the reference on the new queries and the ones the convolutions read
            o = mta_reference(q, k, v, kq_pre, self.head_pre, kq_post, self.head_post, self.causal)[:, :, -T:]
        else:
            o = mta(q, k, v, kq_pre, self.head_pre, kq_post, self.head_post, self.causal, self.backend)
        o = F.rms_norm(o, (o.shape[-1],)) * self.norm[:, None].to(o.dtype)  # per-head RMS group norm
        gate = torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]  # [B, H, S, 1]
        return o * (self.out_scale * gate).to(o.dtype)
