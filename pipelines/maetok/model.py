"""MAETok: a ViT tokenizer with learnable 1D latent tokens trained by masked autoencoding.

Chen et al., "Masked Autoencoders Are Effective Tokenizers for Diffusion Models" (arXiv 2502.03444), with
one deliberate change: as in the original MAE, masked patches are DISCARDED (the encoder sees only the
visible patches), not replaced by a mask token as in the official MAETok code. It is 40-60 % cheaper.

pixels [B,C,T,H,W] --tubelet patchify--> [B,N,P] --keep visible--> [B,Nv,D] + L latent tokens
  --encoder--> latent tokens --bottleneck--> z [B,L,c]
z --project--> [B,L,D] + N mask tokens (one per patch, with position) --decoder--> [B,N,P] --> pixels
auxiliary: shallow decoders of the same form predict, for the masked patches, HOG features and (optionally)
the features of a frozen teacher network (MAETok's DINOv2 / SigLIP targets; here any sigma classifier).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from pipelines.maetok.hog import hog_features
from pipelines.nn.layers import Block, grid_positions, init_transformer, patchify, rope_3d, unpatchify

# Presets: "tiny" trains on a 2-core CPU in minutes; "base" is for a GPU.
PRESETS: dict[str, dict] = {
    "tiny": dict(patch_size=4, width=128, enc_depth=4, dec_depth=4, heads=4, num_latents=32, latent_dim=16),
    "small": dict(patch_size=4, width=256, enc_depth=6, dec_depth=6, heads=4, num_latents=64, latent_dim=16),
    "base": dict(patch_size=8, width=768, enc_depth=12, dec_depth=12, heads=12, num_latents=128, latent_dim=32),
}


@dataclass
class MAETokOutput:
    recon: torch.Tensor  # [B, C, T, H, W]
    z: torch.Tensor  # [B, L, c] latents (the sample, for a VAE)
    keep: torch.Tensor | None  # [B, Nv] indices of visible patches, None without masking
    hog_pred: torch.Tensor | None  # [B, N, D_hog]
    feature_pred: torch.Tensor | None  # [B, N, feature_dim], with a teacher
    kl: torch.Tensor | None  # scalar, VAE only


class Stack(nn.Module):
    def __init__(self, width, depth, heads, mlp_ratio):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x, rope):
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)


class MAETok(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        frames: int = 1,
        channels: int = 3,
        patch_size: int = 4,
        tubelet: int = 1,
        width: int = 128,
        enc_depth: int = 4,
        dec_depth: int = 4,
        hog_depth: int = 1,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        num_latents: int = 32,
        latent_dim: int = 16,
        bottleneck: str = "ae",  # "ae" (the paper's recommendation) or "vae"
        latent_rope: bool = True,  # latent tokens sit at evenly spread grid positions for RoPE (see _rope)
        mask_min: float = 0.4,
        mask_max: float = 0.6,
        mask_mode: float = 0.6,
        mask_std: float = 0.25,
        feature_dim: int = 0,  # width of the teacher features the auxiliary decoder predicts (0 = none)
        feature_depth: int = 1,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch_size}")
        if frames % tubelet:
            raise ValueError(f"{frames} frames are not divisible by the tubelet length {tubelet}")
        if bottleneck not in ("ae", "vae"):
            raise ValueError(f"bottleneck must be 'ae' or 'vae', not {bottleneck!r}")
        self.grid = (frames // tubelet, image_size // patch_size, image_size // patch_size)
        self.num_patches = math.prod(self.grid)
        patch_dim = channels * tubelet * patch_size * patch_size
        self.hog_dim = tubelet * channels * 4 * 9

        # rotary tables for the patch grid, then for the latent tokens
        positions = grid_positions(*self.grid).float()  # [N, 3]
        if latent_rope:  # latent j at the position of patch (j + 1/2) N / L: spread evenly over the grid
            latent_positions = positions[((torch.arange(num_latents) + 0.5) * self.num_patches / num_latents).long()]
        else:  # no position: the identity rotation
            latent_positions = torch.zeros(num_latents, 3)
        cos, sin = rope_3d(torch.cat([positions, latent_positions]), width // heads)
        self.register_buffer("rope_cos", cos, persistent=False)  # [N + L, K/2]
        self.register_buffer("rope_sin", sin, persistent=False)

        # encoder: tubelet embedding (a linear map of each t x p x p patch) + learnable latent tokens
        self.patch_embed = nn.Linear(patch_dim, width)
        # RoPE moves only queries and keys; values carry no position. The latent tokens must learn WHERE
        # things are, so patch tokens also get a learned absolute position (as in ViT/MAE).
        self.enc_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
        self.latent_tokens = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.encoder = Stack(width, enc_depth, heads, mlp_ratio)
        self.to_latent = nn.Linear(width, latent_dim * (2 if bottleneck == "vae" else 1))

        # pixel decoder: a mask token per patch position (+ learned absolute position) and the latents
        self.from_latent = nn.Linear(latent_dim, width)
        self.dec_latent_pos = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.dec_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
        self.decoder = Stack(width, dec_depth, heads, mlp_ratio)
        self.to_pixels = nn.Linear(width, patch_dim)

        # auxiliary shallow HOG decoder (training only): same inputs, its own weights
        self.hog_from_latent = nn.Linear(latent_dim, width)
        self.hog_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
        self.hog_decoder = Stack(width, hog_depth, heads, mlp_ratio)
        self.to_hog = nn.Linear(width, self.hog_dim)

        # auxiliary shallow teacher-feature decoder (training only), built only when a teacher is used
        if feature_dim:
            self.feature_from_latent = nn.Linear(latent_dim, width)
            self.feature_pos = nn.Parameter(torch.randn(self.num_patches, width) * 0.02)
            self.feature_decoder = Stack(width, feature_depth, heads, mlp_ratio)
            self.to_feature = nn.Linear(width, feature_dim)
        init_transformer(self)
        nn.init.zeros_(self.to_pixels.weight)  # start from a flat grey reconstruction, not noise

    # ---- pieces ---------------------------------------------------------------------------------------
    def _rope(self, idx: torch.Tensor | None, batch: int):
        """Rotary tables for [patch tokens (all, or the per-sample visible `idx` [B, Nv]) + latent tokens].

        Latent tokens stay a learnable 1D sequence, but (with `latent_rope`) each also sits at a grid position:
        one shared relative-position pattern then teaches every latent to gather from its neighbourhood and
        every decoder query to read from nearby latents, which a 1D tokenizer otherwise learns slowly, latent
        by latent.
        """
        if idx is None:
            return self.rope_cos, self.rope_sin  # [N + L, K/2]
        latent = torch.arange(self.num_patches, self.num_patches + self.config.num_latents, device=idx.device)
        rows = torch.cat([idx, latent.expand(batch, -1)], dim=1)  # [B, Nv + L]
        return self.rope_cos[rows], self.rope_sin[rows]  # [B, Nv + L, K/2]

    def sample_mask_ratio(self, generator: torch.Generator | None = None) -> float:
        """One ratio per batch from a normal(mode, std) truncated to [mask_min, mask_max] (rejection)."""
        c = self.config
        if c.mask_max <= c.mask_min:  # a fixed ratio (e.g. 0 = no masking)
            return c.mask_min
        while True:
            r = c.mask_mode + c.mask_std * torch.randn((), generator=generator).item()
            if c.mask_min <= r <= c.mask_max:
                return r

    def encode(self, x: torch.Tensor, keep: torch.Tensor | None = None, generator=None, sample: bool = False):
        """x: [B, C, T, H, W] in [-1, 1]; keep: [B, Nv] visible patch indices (None = all).
        Returns z [B, L, c] (VAE: the mean, or a sample if `sample`) and the KL term (VAE) or None."""
        B = x.shape[0]
        tokens = self.patch_embed(patchify(x, self.config.tubelet, self.config.patch_size)) + self.enc_pos  # [B, N, D]
        if keep is not None:  # discard masked patches (MAE), the encoder never sees them
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, Nv, D]
        h = torch.cat([tokens, self.latent_tokens.expand(B, -1, -1)], dim=1)  # [B, Nv + L, D]
        h = self.encoder(h, self._rope(keep, B))[:, -self.config.num_latents :]  # latent tokens only
        z = self.to_latent(h)  # [B, L, c] or [B, L, 2c]
        if self.config.bottleneck == "ae":
            return z, None
        mean, logvar = z.chunk(2, dim=-1)
        logvar = logvar.clamp(-30, 20)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(-1).mean()
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean)
            mean = mean + (0.5 * logvar).exp() * noise
        return mean, kl

    # under torch.compile (`--compile`) a masked encoder pass runs eager: its length changes with every batch's mask
    # ratio, and compiled for symbolic lengths it trained slower than eager (BENCHMARKS.md); the decoders compile
    _masked_encode = torch.compiler.disable(encode)

    def _decode_tokens(self, z, from_latent, pos, stack):
        B = z.shape[0]
        queries = (self.mask_token + pos).expand(B, -1, -1)  # [B, N, D]
        h = torch.cat([queries, from_latent(z) + self.dec_latent_pos], dim=1)  # [B, N + L, D]
        return stack(h, self._rope(None, B))[:, : self.num_patches]  # patch positions only

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L, c] -> pixels [B, C, T, H, W] (not clamped)."""
        c = self.config
        tokens = self.to_pixels(self._decode_tokens(z, self.from_latent, self.dec_pos, self.decoder))
        return unpatchify(tokens, self.grid, c.channels, c.tubelet, c.patch_size)

    def random_keep(self, batch: int, ratio: float, generator=None) -> torch.Tensor:
        """[B, Nv] sorted indices of the patches left visible at mask `ratio` (a random subset per sample)."""
        n_keep = max(1, round(self.num_patches * (1 - ratio)))
        noise = torch.rand(batch, self.num_patches, generator=generator)
        return noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values.to(self.latent_tokens.device)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, generator=None, with_hog: bool = False,
                frozen_encoder: bool = False, with_features: bool = False, latent_noise: float = 0.0) -> MAETokOutput:
        encode = self.encode if keep is None else self._masked_encode
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_encoder):
            z, kl = encode(x, keep, generator, sample=self.training)
        if latent_noise > 0:
            z = add_latent_noise(z, latent_noise, generator)
        recon = self.decode(z)
        hog_pred = None
        if with_hog:
            hog_pred = self.to_hog(self._decode_tokens(z, self.hog_from_latent, self.hog_pos, self.hog_decoder))
        feature_pred = None
        if with_features:
            feature_pred = self.to_feature(self._decode_tokens(z, self.feature_from_latent, self.feature_pos,
                                                               self.feature_decoder))
        return MAETokOutput(recon=recon, z=z, keep=keep, hog_pred=hog_pred, kl=kl, feature_pred=feature_pred)

    def hog_targets(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D_hog] HOG features per patch (same row-major token order as `patchify`)."""
        return hog_features(x, self.config.patch_size, self.config.tubelet)

    def auxiliary_modules(self) -> list:
        """The training-only decoders (HOG, teacher features): (name, modules, position parameter) each."""
        aux = [("hog", (self.hog_from_latent, self.hog_decoder, self.to_hog), self.hog_pos)]
        if self.config.feature_dim:
            aux.append(("feature", (self.feature_from_latent, self.feature_decoder, self.to_feature), self.feature_pos))
        return aux

    def encoder_parameters(self):
        """Parameters frozen during decoder fine-tuning (everything up to and including the bottleneck)."""
        for module in (self.patch_embed, self.encoder, self.to_latent):
            yield from module.parameters()
        yield self.latent_tokens
        yield self.enc_pos


def add_latent_noise(z: torch.Tensor, max_std: float, generator=None) -> torch.Tensor:
    """Decoder-side noise augmentation: z + tau * std(z) * eps, tau ~ U(0, max_std) per sample, std per
    (token, channel) over the batch and detached (so scaling the latent up cannot outrun the noise).

    Why: a diffusion model learns the latent's high-variance directions first, and a plain AE is free to
    keep what decides the class (the outline) in low-variance ones (on shapes, the shipped tokenizer needs
    128 of 512 principal components to keep its class). A decoder that must read the image through noise of
    the generator's kind makes the encoder put that information where noise cannot hide it.
    """
    if z.shape[0] < 2:
        return z
    std = z.detach().float().std(0, keepdim=True).to(z.dtype)  # [1, L, c]
    tau = max_std * torch.rand(z.shape[0], 1, 1, generator=generator, device="cpu").to(z)
    eps = torch.randn(z.shape, generator=generator, device="cpu").to(z)
    return z + tau * std * eps


def masked_mean(err: torch.Tensor, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Mean of per-patch errors err [B, N] over the MASKED patches (those not in keep [B, Nv])."""
    visible = torch.zeros(err.shape[0], num_patches, dtype=torch.bool, device=err.device)
    visible.scatter_(1, keep, True)
    masked = (~visible).float()
    return (err * masked).sum() / masked.sum().clamp_min(1)


def maetok_loss(net, model: MAETok, x: torch.Tensor, keep: torch.Tensor | None, generator=None,
                hog_weight: float = 1.0, kl_weight: float = 1e-6, feature_targets: torch.Tensor | None = None,
                feature_weight: float = 1.0, latent_noise: float = 0.0):
    """The training objective. `net` is the model or its DDP wrapper; `keep` [B, Nv] the visible patches,
    or None for decoder fine-tuning (no masking, encoder frozen). Returns (loss, logs).

    Pre-training: pixel MSE on all pixels + hog_weight x HOG MSE on the masked patches (+ kl_weight x KL
    for the VAE) + feature_weight x (1 - cosine) between the predicted and the teacher's features
    `feature_targets` [B, N, F] on the masked patches (MAETok's DINOv2 / SigLIP loss). Decoder fine-tuning:
    pixel MSE only. `latent_noise` > 0 adds `add_latent_noise` to the latents the decoders see, in
    pre-training only (decoder fine-tuning reads clean latents).
    """
    finetune = keep is None
    with_features = not finetune and feature_targets is not None and feature_weight > 0
    out = net(x, keep, generator, with_hog=not finetune and hog_weight > 0, frozen_encoder=finetune,
              with_features=with_features, latent_noise=0.0 if finetune else latent_noise)
    mse = F.mse_loss(out.recon.float(), x)
    loss, logs = mse, {"mse": mse.item()}
    if keep is not None:
        logs["mask"] = 1 - keep.shape[1] / model.num_patches
    if out.hog_pred is not None:
        err = (out.hog_pred.float() - model.hog_targets(x)).pow(2).mean(-1)  # [B, N]
        hog = masked_mean(err, keep, model.num_patches)
        loss = loss + hog_weight * hog
        logs["hog"] = hog.item()
    if out.feature_pred is not None:
        err = 1 - F.cosine_similarity(out.feature_pred.float(), feature_targets.float(), dim=-1)  # [B, N]
        feature = masked_mean(err, keep, model.num_patches)
        loss = loss + feature_weight * feature
        logs["feature"] = feature.item()
    if out.kl is not None and not finetune:
        loss = loss + kl_weight * out.kl
        logs["kl"] = out.kl.item()
    return loss, logs
