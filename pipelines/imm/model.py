"""The diffusion transformer (DiT with adaLN-zero) that IMM and the flow-matching baseline train.

It maps a token sequence to a token sequence, conditioned on two times and a class label:
    G(x [B, N, c], t [B], s [B], y [B]) -> [B, N, c]
The tokens live in a *space*:
  latent  the MAETok tokenizer's latents z [B, L, c], normalised per channel (or per token and channel) to std `data_std`
          (statistics in the config); positions: the grid spots the tokenizer gives its latents. Or (`latent_pca`
          = K > 0) the top K principal components of the flattened z: K / c tokens of width c
  pixels  tubelet patches of the clip [B, C, T, H, W], in cube-major order (layers.cube_major_order) so that sparse
          attention sees every cube as one contiguous block; positions: each patch's (t, h, w)
Axis legend: B batch, N tokens, c token width, D model width.
"""
from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from pipelines.nn.layers import Block, cube_major_order, grid_positions, init_transformer, patchify, rope_3d, unpatchify

PRESETS: dict[str, dict] = {
    "tiny": dict(width=128, depth=6, heads=2),  # a 2-core CPU, minutes (width 128 beat 192 at equal CPU time: BENCHMARKS.md)
    "small": dict(width=384, depth=12, heads=6),
    "base": dict(width=768, depth=12, heads=12),  # a GPU
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (already scaled, e.g. 1000 t) times: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = t.float()[:, None] * freqs
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):  # the fp32 sinusoids in the weights' dtype (a half-precision model: fp16 / bf16)
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class DiT(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        space: str = "latent",  # "latent" | "pixels"
        num_tokens: int = 32,
        token_dim: int = 16,
        grid: tuple = (1, 8, 8),  # the (t, h, w) grid the tokens' positions live on
        cube: tuple = (1, 4, 4),  # pixels: token order is cube-major for this cube (grid units)
        image_size: int = 32,
        frames: int = 1,
        channels: int = 3,
        patch_size: int = 4,  # pixels: patch side and tubelet length
        tubelet: int = 1,
        latent_mean: list | None = None,  # latent: statistics of the tokenizer's latents, [c] or per token [L][c]
        latent_std: list | None = None,
        latent_pca: int = 0,  # > 0: tokens are the top latent_pca principal components of z (mean [L c], scales [K])
        latent_shape: tuple | None = None,  # (L, c) of the tokenizer's z when latent_pca > 0
        data_std: float = 0.5,  # latents are scaled to this std (IMM's sigma_d)
        width: int = 256,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 6,  # label `num_classes` is the null class (classifier-free guidance)
        class_names: list | None = None,
        second_time: str = "stride",  # the second time embedding: "stride" (t - s) or "s"
        attn: str = "dense",
        class_init_std: float = 0.02,  # initial scale of the class embedding (beside the O(1) time embeddings)
        attn_config: dict | None = None,  # options of the attention kind, e.g. nsa: {"top_n": 2, "radius": [0, 1, 1]}, mta: {"kq_every": 4}
        align_dim: int = 0,  # > 0: a head that predicts a frozen teacher's image features (REPA), training only
        align_depth: int = 2,  # ... from the tokens after this many blocks
    ):
        super().__init__()
        if space not in ("latent", "pixels"):
            raise ValueError(f"space must be 'latent' or 'pixels', not {space!r}")
        if second_time not in ("stride", "s"):
            raise ValueError(f"second_time must be 'stride' or 's', not {second_time!r}")
        grid = tuple(grid)
        if space == "pixels":
            order = cube_major_order(grid, tuple(cube))  # [N] row-major index of each token
            positions = grid_positions(*grid)[order].float()
        else:  # latent j sits where the tokenizer put it: the patch at (j + 1/2) N / L
            n = math.prod(grid)
            order = torch.arange(num_tokens)
            positions = grid_positions(*grid)[((torch.arange(num_tokens) + 0.5) * n / num_tokens).long()].float()
        self.register_buffer("token_order", order, persistent=False)
        cos, sin = rope_3d(positions, width // heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if latent_mean is not None:
            self.register_buffer("z_mean", torch.tensor(latent_mean, dtype=torch.float32), persistent=False)
            self.register_buffer("z_std", torch.tensor(latent_std, dtype=torch.float32), persistent=False)
        if latent_pca:
            if latent_pca != num_tokens * token_dim or latent_shape is None:
                raise ValueError(f"latent_pca {latent_pca} needs num_tokens x token_dim = {latent_pca} and a latent_shape")
            # the principal directions [K, L c] (rows orthonormal): weights, set by `set_latent_basis`
            self.register_buffer("z_basis", torch.zeros(latent_pca, math.prod(latent_shape)))

        self.embed = nn.Linear(token_dim, width)
        self.pos = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.t_embed = TimeEmbedding(width)
        self.s_embed = TimeEmbedding(width)
        self.class_embed = nn.Embedding(num_classes + 1, width)
        if space == "pixels":  # sparse attention sees contiguous cubes of the token grid
            layout = {"grid": grid, "cube": tuple(cube)}
        else:  # latent tokens form a 1D sequence: blocks of up to 16 consecutive latents
            layout = {"grid": (1, 1, num_tokens), "cube": (1, 1, math.gcd(num_tokens, 16))}
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, attn=attn, cond_dim=width, layout=layout, attn_config=attn_config, layer=i)
            for i in range(depth)
        )
        if align_dim > 0:
            if not 1 <= align_depth <= depth:
                raise ValueError(f"align_depth must be in [1, {depth}], not {align_depth}")
            self.align_head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, align_dim))
        self.alignment = None  # the align head's last output in a training forward with gradients (the trainer reads it)
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        init_transformer(self)
        nn.init.normal_(self.class_embed.weight, std=class_init_std)
        for m in (self.final_ada[1], self.out):  # DiT's adaLN-zero: the network starts by predicting 0
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """x: [B, N, c] (already scaled by c_in); t, s: [B] times in [0, 1]; class_labels: [B] (null = num_classes)."""
        second = t - s if self.config.second_time == "stride" else s
        cond = self.t_embed(1000 * t) + self.s_embed(1000 * second) + self.class_embed(class_labels)  # [B, D]
        h = self.embed(x) + self.pos  # [B, N, D]
        rope = (self.rope_cos, self.rope_sin)
        for i, block in enumerate(self.blocks):
            h = block(h, rope, cond)
            if i + 1 == self.config.align_depth and self.config.align_dim and self.training and torch.is_grad_enabled():
                # REPA (Yu et al., 2024): early tokens of the noisy input predict the clean image's teacher features,
                # which makes the network learn semantics (here: the class's shape) sooner
                self.alignment = self.align_head(h.mean(1))  # [B, align_dim]
        shift, scale = self.final_ada(cond)[:, None].chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)  # [B, N, c]

    # ---- the space: data <-> tokens ----------------------------------------------------------------------
    @property
    def token_shape(self) -> tuple[int, int]:
        return self.config.num_tokens, self.config.token_dim

    def tokens_from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """pixels: [B, C, T, H, W] -> [B, N, C t p p] in cube-major order."""
        c = self.config
        return patchify(x, c.tubelet, c.patch_size)[:, self.token_order]

    def pixels_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        row_major = torch.empty_like(tokens)
        row_major[:, self.token_order] = tokens
        return unpatchify(row_major, tuple(c.grid), c.channels, c.tubelet, c.patch_size)

    def tokens_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """latent: the tokenizer's z [B, L, c] -> tokens normalised (per channel, or per token and channel) to std data_std.

        With `latent_pca`: the coordinates of z in its top K principal directions, each divided by its scale
        (`latent_statistics`: std^P, whitened at P = 1), K / c tokens of c: a shorter sequence, and a way to
        weigh the quiet directions that decide the class on shapes. Measured there (BENCHMARKS.md): whitened it
        learns nothing, at P = 0 it trades FD for class accuracy; per-token scaling stays the default.
        """
        if self.config.latent_pca:
            coeffs = (z.flatten(1) - self.z_mean) @ self.z_basis.T / self.z_std  # [B, K], mean variance 1
            return coeffs.view(z.shape[0], *self.token_shape) * self.config.data_std
        return (z - self.z_mean) / self.z_std * self.config.data_std

    def latents_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.latent_pca:
            flat = (tokens.flatten(1).float() / self.config.data_std * self.z_std) @ self.z_basis.float() + self.z_mean
            return flat.view(tokens.shape[0], *self.config.latent_shape)  # the discarded directions at their mean
        return tokens / self.config.data_std * self.z_std + self.z_mean

    @torch.no_grad()
    def set_latent_basis(self, basis: torch.Tensor):
        """Store the principal directions [K, L c] (from `pipelines.imm.trainer.latent_statistics(pca=K)`)."""
        self.z_basis.copy_(basis)
