"""The few-step sampling loop (one for every sampler; the maths of a step is in IMMScheduler) and decoding.
Deterministic per generator: all noise is drawn on the generator's device, then moved, so a CPU generator's seed
gives the same pictures on any device."""
from __future__ import annotations

import torch

from pipelines.imm.scheduler import IMMScheduler, randn


def guided_output(model, x_in: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, cfg_scale: float):
    """G(x_in, t, s, label), with classifier-free guidance G(null) + w (G(label) - G(null)) when w != 1."""
    if cfg_scale == 1.0:
        return model(x_in, t, s, labels)
    null = torch.full_like(labels, model.null_class)
    G_c, G_n = model(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([labels, null])).chunk(2)
    return G_n + cfg_scale * (G_c - G_n)


@torch.no_grad()
def sample_tokens(model, scheduler: IMMScheduler, labels: torch.Tensor, steps: int, generator: torch.Generator,
                  cfg_scale: float = 1.0, sampler: str | None = None) -> torch.Tensor:
    """Tokens [B, N, c] for class `labels` [B] (the null class gives unconditional samples).

    pushforward  x <- f(x; t_i -> t_{i+1}) from noise at t_0 (T, or the scheduler's start_time) down to eps
                 (1 step: f(x; t_0 -> eps))
    restart      x0 = f(x; t_i -> eps), re-noised to t_{i+1} with fresh noise (the last step keeps x0)
    euler        flow matching: x <- x - (t_i - t_{i+1}) sigma_d G(x, t_i, t_i)
    """
    param = next(model.parameters())
    B = labels.shape[0]
    labels = labels.to(param.device)
    scheduler.set_timesteps(steps, param.device, sampler)
    x = (scheduler.init_noise_sigma * randn((B, *model.token_shape), generator)).to(param.device, param.dtype)
    for t in scheduler.timesteps:
        t_b = t.expand(B).float()
        s_b = torch.full((B,), scheduler.network_s(t), device=param.device)
        G = guided_output(model, scheduler.scale_model_input(x, t_b[:, None, None]), t_b, s_b, labels, cfg_scale)
        x = scheduler.step(G, t, x, generator=generator).prev_sample
    return x


@torch.no_grad()
def decode_tokens(model, tokens: torch.Tensor, tokenizer=None) -> torch.Tensor:
    """Tokens -> pixels [B, C, T, H, W] in [-1, 1]: the tokenizer's decoder (latent space) or unpatchify (pixels)."""
    if model.config.space == "latent":  # latents in the tokenizer's dtype (the statistics may be fp32 in a half model)
        dtype = next(tokenizer.parameters()).dtype
        return torch.cat([tokenizer.decode(model.latents_from_tokens(chunk).to(dtype))
                          for chunk in tokens.split(256)]).clamp(-1, 1)
    return model.pixels_from_tokens(tokens).clamp(-1, 1)


@torch.no_grad()
def generate(model, scheduler: IMMScheduler, labels: torch.Tensor, steps: int, generator: torch.Generator,
             tokenizer=None, cfg_scale: float = 1.0, sampler: str | None = None, batch_size: int = 256) -> torch.Tensor:
    """Pixels [B, C, T, H, W] in [-1, 1] on the CPU for `labels` [B], `batch_size` at a time."""
    out = []
    for chunk in labels.split(batch_size):
        tokens = sample_tokens(model, scheduler, chunk, steps, generator, cfg_scale, sampler)
        out.append(decode_tokens(model, tokens, tokenizer).cpu())
    return torch.cat(out)
