"""The learnable parts of NSA around the kernels: block compression (phi) and the per-head branch gates.

Used by pipelines.nn.layers.Attention for attn="nsa"; the model code never sees them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import cube_neighbourhood, nsa_3d, nsa_causal, nsa_causal_reference, selection_size


class Compressor(nn.Module):
    """phi: one key (or value) per block of V tokens (NSA eq. 7): a learned intra-block position encoding per
    head, then mean pooling plus an MLP over the flattened block whose output layer starts at zero, so phi
    starts as mean pooling and learns from there. kind="mean" keeps the pooling only."""

    def __init__(self, heads: int, head_dim: int, block: int, kind: str = "mlp"):
        super().__init__()
        if kind not in ("mlp", "mean"):
            raise ValueError(f"NSA compression must be 'mlp' or 'mean', not {kind!r}")
        self.block, self.kind = block, kind
        self.pos = nn.Parameter(torch.zeros(heads, block, head_dim))  # [Hkv, V, K]
        if kind == "mlp":
            self.fc1 = nn.Linear(block * head_dim, head_dim)
            self.fc2 = nn.Linear(head_dim, head_dim)
        self.init_weights()

    def init_weights(self):
        nn.init.zeros_(self.pos)
        if self.kind == "mlp":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, Hkv, N, K] (N = NB * V, full blocks) -> [B, Hkv, NB, K]."""
        B, H, N, K = x.shape
        blocks = x.view(B, H, N // self.block, self.block, K) + self.pos[:, None].to(x.dtype)  # [B, Hkv, NB, V, K]
        out = blocks.mean(3)
        if self.kind == "mlp":
            out = out + self.fc2(F.gelu(self.fc1(blocks.flatten(-2)), approximate="tanh"))
        return out


class NSA3D(nn.Module):
    """Non-causal NSA over a token grid stored cube-major (layers.cube_major_order). grid, cube: (t, h, w) in tokens.

    top_n KV cubes are chosen per query cube on top of the forced ones: the cube itself and its neighbours
    within `radius` cubes per axis (the window branch of the paper, made 3D). Gates: sigmoid(Linear(x))
    per head and branch, zero-initialised (both branches start at weight 1/2).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, grid, cube, top_n: int = 8, radius=(0, 0, 0),
                 compress: str = "mlp", backend: str = "auto"):
        super().__init__()
        grid, cube = tuple(grid), tuple(cube)
        if any(g % c for g, c in zip(grid, cube)):
            raise ValueError(f"NSA: the token grid {'x'.join(map(str, grid))} is not divisible by the cube "
                             f"{'x'.join(map(str, cube))}; pick a cube whose sides divide the grid")
        self.block, self.top_n, self.backend = math.prod(cube), top_n, backend
        cube_grid = tuple(g // c for g, c in zip(grid, cube))
        # the mask is made on the CPU so that S can be read from it even when the layer is built on the meta device
        # (`sigma info` counts parameters that way); the buffer then goes where the layer is built, as before
        with torch.device("cpu"):
            forced = cube_neighbourhood(cube_grid, tuple(radius))
        self.n_select = selection_size(top_n, forced)
        self.register_buffer("forced", forced.to(torch.empty(0).device), persistent=False)
        self.compress_k = Compressor(heads, head_dim, self.block, compress)
        self.compress_v = Compressor(heads, head_dim, self.block, compress)
        self.gate = nn.Linear(dim, 2 * heads)
        self.init_weights()

    def init_weights(self):
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.compress_k.init_weights()
        self.compress_v.init_weights()

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] (for the gates); q, k, v: [B, H, N, K] after RoPE. Returns [B, H, N, K]."""
        g_cmp, g_slc = torch.sigmoid(self.gate(x).float()).transpose(1, 2).chunk(2, dim=1)  # [B, H, N] each
        return nsa_3d(q, k, v, self.compress_k(k), self.compress_v(v), g_cmp, g_slc, block=self.block,
                      top_n=self.top_n, forced=self.forced, backend=self.backend, n_select=self.n_select)


class NSACausal(nn.Module):
    """Causal 1D NSA for the LM: blocks of `block` tokens, per-token top_n (including 1 initial and 2 local
    blocks), optional sliding window branch."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, block: int = 16, top_n: int = 4,
                 window: int = 0, compress: str = "mlp", backend: str = "auto"):
        super().__init__()
        if top_n < 3:
            raise ValueError(f"causal NSA: top_n {top_n} must cover the 1 initial + 2 local blocks it always selects")
        self.block, self.top_n, self.window, self.backend = block, top_n, window, backend
        self.heads = heads
        self.compress_k = Compressor(kv_heads, head_dim, block, compress)
        self.compress_v = Compressor(kv_heads, head_dim, block, compress)
        self.gate = nn.Linear(dim, (3 if window else 2) * heads)
        self.init_weights()

    init_weights = NSA3D.init_weights

    def forward(self, x, q, k, v, cache: dict | None = None):
        """x: [B, T, D]; q: [B, H, T, K]; k, v: [B, Hkv, N, K]: N = T, or when decoding with a cache the N tokens
        so far, of which x and q are the last T (then the reference runs: T x N scores are small)."""
        N = k.shape[2]
        full = N // self.block * self.block  # only complete blocks are compressed
        gates = torch.sigmoid(self.gate(x).float()).transpose(1, 2).chunk(3 if self.window else 2, dim=1)
        done = cache["k_cmp"].shape[2] * self.block if cache is not None and "k_cmp" in cache else 0
        k_cmp, v_cmp = self.compress_k(k[:, :, done:full]), self.compress_v(v[:, :, done:full])
        if cache is not None:  # decoding: each block is compressed once, when its last token arrives
            if done:
                k_cmp, v_cmp = torch.cat([cache["k_cmp"], k_cmp], 2), torch.cat([cache["v_cmp"], v_cmp], 2)
            cache["k_cmp"], cache["v_cmp"] = k_cmp, v_cmp
        g_win = gates[2] if self.window else None
        if q.shape[2] < N:
            o = nsa_causal_reference(q, k, v, k_cmp, v_cmp, gates[0], gates[1], self.block, self.top_n, self.window,
                                     g_win)[0]
            return o.to(q.dtype)
        return nsa_causal(q, k, v, k_cmp, v_cmp, gates[0], gates[1], block=self.block, top_n=self.top_n,
                          window=self.window, g_win=g_win, backend=self.backend)
