"""Shared transformer layers: 3D RoPE, attention (dispatching by `attn` kind), MLP, pre-norm block.

Axis legend: B batch, N tokens, D model width, H heads, K head dim, P patch pixels (C * t * p * p).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.common import sdpa  # noqa: F401  (re-exported: the models call layers.sdpa)

ATTN_KINDS = ("dense", "nsa", "mta")  # kernels/ ops; the models only pass the kind, layout and options


def rope_3d(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for tokens at 3D grid positions.

    positions: [..., N, 3] (t, h, w), integer or float. Returns cos, sin: [..., N, head_dim // 2].
    The head_dim // 2 rotation pairs are split over the axes: a quarter to t (images spend few on it),
    the rest evenly to h and w.
    """
    pairs = head_dim // 2
    n_t = pairs // 4
    n_h = (pairs - n_t) // 2
    n_w = pairs - n_t - n_h
    angles = []
    for axis, n in zip(range(3), (n_t, n_h, n_w)):
        if n == 0:
            continue
        freqs = theta ** (-torch.arange(n, dtype=torch.float32) / n)  # [n]
        angles.append(positions[..., axis : axis + 1].float() * freqs)  # [..., N, n]
    angle = torch.cat(angles, dim=-1)  # [..., N, pairs]
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, H, N, K] by tables [N, K/2] or [B, N, K/2] (per-sample positions, e.g. after masking)."""
    if cos.dim() == 3:  # per-sample tables: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # pairs (x[2i], x[2i+1])
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in fp32 whatever x is: under bf16 autocast torch would otherwise warn of mixed dtypes and take a
        # slower unfused path (fp32 is also ~5x faster than that path on the CPU, forward)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE and QK-norm (stable at high learning rates).

    `attn` picks the kernel: "dense" is torch SDPA; "nsa" is 3D Native Sparse Attention (kernels/nsa), which
    needs the token `layout` {"grid": (t, h, w), "cube": (t, h, w)} (tokens stored cube-major) and takes its
    options (top_n, radius, compress, backend) from `attn_config`; "mta" is Multi-Token Attention
    (kernels/mta; options kernel, head_group, kq_every, depth_scale; `layer` decides where the key-query
    convolutions run). Their own parameters live in `op_layer`. Tokens that carry no position (e.g. latent
    tokens) get the identity rotation (cos = 1, sin = 0) in the tables passed as `rope`.
    """

    def __init__(self, dim: int, heads: int, attn: str = "dense", qk_norm: bool = True, layout: dict | None = None,
                 attn_config: dict | None = None, layer: int = 0):
        super().__init__()
        if attn not in ATTN_KINDS:
            raise ValueError(f"attention kind {attn!r} is not available (have: {', '.join(ATTN_KINDS)})")
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.attn = heads, dim // heads, attn
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.op_layer = None
        if attn == "nsa":
            if layout is None:
                raise ValueError("attn='nsa' needs the token layout (grid and cube)")
            from kernels.nsa.module import NSA3D

            self.op_layer = NSA3D(dim, heads, self.head_dim, layout["grid"], layout["cube"], **(attn_config or {}))
        elif attn == "mta":  # bidirectional here (the DiT, the tokenizer); the LM builds its causal layer itself
            from kernels.mta.module import MTA

            self.op_layer = MTA(dim, heads, self.head_dim, causal=False, layer=layer, **(attn_config or {}))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B,H,N,K]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.op_layer is not None:
            o = self.op_layer(x, q.contiguous(), k.contiguous(), v.contiguous())
        else:
            o = sdpa(q, k, v)  # [B, H, N, K]
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block. With `cond_dim`, adaLN-zero modulation by a conditioning vector
    (DiT): shift/scale/gate per branch from `cond`, gates initialised to zero so the block starts as identity.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, attn: str = "dense", cond_dim: int | None = None,
                 layout: dict | None = None, attn_config: dict | None = None, layer: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=cond_dim is None)
        self.attn = Attention(dim, heads, attn, layout=layout, attn_config=attn_config, layer=layer)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=cond_dim is None)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ada = None
        if cond_dim is not None:
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            nn.init.zeros_(self.ada[1].weight)
            nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, rope=None, cond=None):
        if self.ada is None:
            x = x + self.attn(self.norm1(x), rope)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond)[:, None].chunk(6, dim=-1)  # [B,1,D] each
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, rope)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


def init_transformer(module: nn.Module, residual_out_zero: bool = True):
    """Xavier-uniform linears, zero biases; the residual output projections start at zero so each block
    begins as the identity (faster, steadier early training of deep stacks)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():  # kernel modules (e.g. NSA gates, compressors) restore their own initial state
        if m is not module and hasattr(m, "init_weights"):
            m.init_weights()
    if residual_out_zero:
        for m in module.modules():
            if not isinstance(m, Block):
                continue
            if m.ada is not None:
                # adaLN-zero: the gates start at 0, the projections stay random. Zeroing both would leave
                # each with a zero gradient (d gate = proj output = 0, d proj = gate = 0): a dead block.
                nn.init.zeros_(m.ada[1].weight)
            else:
                nn.init.zeros_(m.attn.proj.weight)
                nn.init.zeros_(m.mlp.fc2.weight)


def grid_positions(t: int, h: int, w: int) -> torch.Tensor:
    """[t*h*w, 3] integer (t, h, w) positions in row-major order (t slowest, w fastest)."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack((tt, hh, ww), dim=-1).reshape(-1, 3)


def patchify(x: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, N, C*tubelet*patch*patch], tokens in row-major (t', h', w') order."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // tubelet, tubelet, H // patch, patch, W // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, T', H', W', C, t, p, p]
    return x.reshape(B, (T // tubelet) * (H // patch) * (W // patch), C * tubelet * patch * patch)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], channels: int, tubelet: int, patch: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, N, P] -> [B, C, T, H, W]."""
    B = tokens.shape[0]
    t, h, w = grid
    x = tokens.reshape(B, t, h, w, channels, tubelet, patch, patch)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, T', t, H', p, W', p]
    return x.reshape(B, channels, t * tubelet, h * patch, w * patch)


def cube_major_order(grid: tuple[int, int, int], cube: tuple[int, int, int]) -> torch.Tensor:
    """[N] row-major token indices listed cube by cube: all tokens of cube 0 (in row-major order inside
    the cube), then cube 1, ... Sparse attention then sees each cube as one contiguous block."""
    (t, h, w), (ct, ch, cw) = grid, cube
    if t % ct or h % ch or w % cw:
        raise ValueError(f"token grid {t}x{h}x{w} is not divisible by the cube {ct}x{ch}x{cw}")
    idx = torch.arange(t * h * w).reshape(t // ct, ct, h // ch, ch, w // cw, cw)
    return idx.permute(0, 2, 4, 1, 3, 5).reshape(-1)  # [cubes..., inside-cube...]


def auto_cube(grid: tuple[int, int, int], target: tuple[int, int, int] = (4, 4, 4)) -> tuple[int, int, int]:
    """The largest cube with sides <= target that divides the grid, per axis (powers of two)."""
    out = []
    for n, limit in zip(grid, target):
        side = 1
        while side * 2 <= limit and n % (side * 2) == 0:
            side *= 2
        out.append(side)
    return tuple(out)
