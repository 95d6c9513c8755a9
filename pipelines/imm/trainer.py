"""Training the IMM diffusion transformer (or its flow-matching baseline): the Task the shared loop runs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.data import absolute_spec
from pipelines.imm.model import DiT
from pipelines.imm.objective import (class_groups, complete_class_groups, draw_global, flow_matching_loss, group_window, imm_loss,
                                     unconditional_groups)
from pipelines.imm.schedule import IMMSchedule

# schedules per preset (model sizes in model.PRESETS); tiny is tuned for latents of 32x32 shapes on a 2-core CPU
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(steps=1800, batch_size=64, lr=2e-3, warmup=100, ema=0.995),
    "small": dict(steps=20000, batch_size=256, lr=5e-4, warmup=500, ema=0.9995),
    "base": dict(steps=200000, batch_size=1024, lr=2e-4, warmup=2000, ema=0.9999),
}
OBJECTIVES = ("imm", "flow-matching")
GROUPINGS = ("sorted", "complete")  # IMMStage.groups


@dataclass
class IMMStage:
    """How the generator is trained (saved in sigma.json beside the weights)."""

    objective: str = "imm"  # "imm" | "flow-matching" (the baseline: same network, velocity loss, Euler sampler)
    group_size: int = 4  # M particles per (s, r, t) group
    groups: str = "sorted"  # IMM: how a step's batch becomes one-class groups. "sorted": the step's B samples by
    # class, leftovers null; "complete": the first B / M groups to fill up in a longer window (objective.group_window)
    label_dropout: float = 0.1  # null-class groups (guidance); IMM with groups sorted: at least this fraction, leftovers included
    sample_steps: int = 2  # pictures during training and `sigma sample`'s default
    cfg_scale: float | None = None  # sampling default; None: 3 for IMM, 1.5 for flow matching (each one's best FD
    # on shapes, BENCHMARKS.md tenth session)
    cfg_one_step: float | None = None  # 1-step sampling's default guidance (None: cfg_scale). A long shapes run
    # drew better single jumps at 1.5 than at 3 (14,000 steps: 49 against 41 % class accuracy); 3,500 did not
    start_time: float | None = None  # sampling default: the first step's time (None: T, the paper's). The CLI's
    # default is 0.95 for IMM: the loss barely trains t near T, where one long run's jumps came apart (BENCHMARKS.md)
    midpoint: float | None = None  # sampling default: 2 steps' middle time (None: uniform). The CLI's default is
    # 0.6 for IMM (a lower FD than the uniform midpoint on 7 of 8 shapes runs, BENCHMARKS.md)
    tokenizer: str | None = None  # the tokenizer folder the latents came from (latent space)
    latent_stats_samples: int = 4096
    latent_norm: str = "channel"  # "channel": mean and std per channel; "token": per (latent token, channel);
    # "pca": the top latent_pca principal components, each scaled by std^pca_whiten
    latent_pca: int = 0
    pca_whiten: float = 0.0  # 0: the latent's own proportions; 1: whitened (on shapes: learns nothing, BENCHMARKS.md)
    align_teacher: str | None = None  # a classifier folder whose pooled features the DiT's align head predicts (REPA)
    align_weight: float = 0.1  # weight of that loss, 1 - cosine (the paper: 0.5, beside a far larger denoising loss)
    cache_latents: bool | None = None  # encode a finite data set once (None: decided at the start, then saved)
    optimizer: str = "adamw"  # "adamw" | "muon" (the hidden matrices; AdamW for the rest). The CLI's default is
    # muon; this one stays adamw so that runs saved before the field existed resume as they were trained
    muon_lr_scale: float = 5.0  # Muon's lr relative to --lr (its steps are orthogonalised; 5 beat 10 and 20 on shapes)
    fm_fraction: float = 0.0  # IMM: the fraction of groups that train the velocity G(x, t, t) by flow matching
    fm_weight: float = 0.05  # that loss's weight (its gradients are ~25x IMM's at weight 1)
    init: str | None = None  # the run whose (sampling) weights this one started from (`--init`), if any

    def __post_init__(self):
        if self.cfg_scale is None:
            self.cfg_scale = 3.0 if self.objective == "imm" else 1.5


def default_guidance(stage: dict, steps: int) -> float:
    """A run's default guidance scale at `steps` sampling steps, from its saved stage (`sigma.json`): cfg_one_step
    for single jumps where the run has one, else cfg_scale (1, no guidance, for stages saved before either)."""
    one_step = stage.get("cfg_one_step") if steps == 1 else None
    return one_step if one_step is not None else stage.get("cfg_scale", 1.0)


OPTIMIZERS = ("adamw", "muon")
# weights that hold several matrices side by side (rows): Muon orthogonalises each one separately
_MUON_SPLIT = ((".attn.qkv.weight", 3), (".ada.1.weight", 6), ("final_ada.1.weight", 2))


def make_imm_optimizer(model: DiT, cfg, stage: IMMStage) -> torch.optim.Optimizer:
    """AdamW (the shared loop's), or with stage.optimizer == "muon": Muon for the hidden matrices (attention, MLP,
    adaLN and time-embedding Linear weights; q, k, v and the adaLN chunks each orthogonalised on their own) and
    AdamW for the rest, as Muon is meant to be used: the input and output projections, class and position
    embeddings, the REPA head, biases and norms."""
    from pipelines.train import adamw_groups, make_optimizer, uses_bf16

    if stage.optimizer == "adamw":
        return make_optimizer(model, cfg)
    from pipelines.nn.muon import MuonAdamW

    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    hidden = ("blocks.", "t_embed.", "s_embed.", "final_ada.")
    muon: dict[int, list] = {}  # split_out -> matrices
    rest = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) in linear and name.startswith(hidden):
            split = next((k for suffix, k in _MUON_SPLIT if name.endswith(suffix)), 1)
            muon.setdefault(split, []).append(p)
        else:
            rest.append((name, p))
    kw = {"use_muon": True, "weight_decay": cfg.weight_decay, "lr_scale": stage.muon_lr_scale}
    return MuonAdamW([*({"params": ps, **kw, "split_out": k} for k, ps in sorted(muon.items())),
                      *adamw_groups(rest, cfg.weight_decay)],
                     lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                     bf16_newton_schulz=uses_bf16(cfg.precision, next(model.parameters()).device))


CACHE_LIMIT_BYTES = 2 * 2**30  # automatic latent caches stay below this (fp32 on the host)


def latent_statistics(tokenizer, data, num: int, device, batch_size: int = 256, per_token: bool = False,
                      pca: int = 0, whiten: float = 0.0, show_progress: bool = False) -> tuple:
    """Mean and std of the tokenizer's latents z [B, L, c] over `num` training samples: per channel, [c]
    (default), or per (token, channel), [L][c]. A 1D tokenizer's latent tokens are not exchangeable: on the
    shapes tokenizer each token's mean sits a median 0.7 channel-stds off the channel's mean and its std is a
    median 0.56 of the channel's, so per-channel scaling hands the generator data off the zero-mean, sigma_d
    std that its parameterisation assumes; per-token statistics fix that (BENCHMARKS.md: a small gain).

    `pca` = K > 0: the principal components of the flattened z instead: (mean [L c], the scale of each of the
    top K components [K], their directions [K, L c] as a tensor), for DiT's `latent_pca` space. `whiten` = 1
    scales each component by its std (every direction unit variance); 0 keeps their natural proportions
    (one common scale, a rotation of z cut to K directions); between, std^whiten. The scales always give
    the K components a mean variance of 1."""
    from pipelines.maetok.trainer import encode_first, principal_components

    z, _ = encode_first(tokenizer, data, num, device, batch_size,  # [B, L, c]; a folder may hold fewer than num
                        progress="measuring the latent statistics" if show_progress else None)
    if pca:
        mean, std, directions = principal_components(z)
        std = std[:pca].clamp_min(1e-6)
        scale = std**whiten * (std ** (2 * (1 - whiten))).mean().sqrt()  # mean of (std / scale)^2 is 1
        return mean.tolist(), scale.tolist(), directions[:pca].float()
    if not per_token:
        z = z.flatten(0, 1)  # [B*L, c]
    return z.mean(0).tolist(), z.std(0).clamp_min(1e-6).tolist()


def should_cache_latents(choice: bool | None, data, tokenizer, steps: int, batch_size: int) -> bool:
    """Whether to encode the training set once (`encode_dataset`) instead of every step. None = automatic: a
    finite data set that the run passes over at least twice and whose latents fit in CACHE_LIMIT_BYTES.
    Forcing it on for an endless (procedural) set or an oversized one is a SigmaError."""
    from pipelines.errors import SigmaError

    if choice is False or (choice is None and tokenizer is None):
        return False
    if tokenizer is None:
        raise SigmaError("--cache-latents is for latent space (pixels need no encoding)")
    n = len(data)
    size = n * tokenizer.config.num_latents * tokenizer.config.latent_dim * 4
    endless = n >= 2**31 - 1
    if choice is None:
        return not endless and size <= CACHE_LIMIT_BYTES and steps * batch_size >= 2 * n
    if endless:
        raise SigmaError(f"--cache-latents needs a finite data set (an image or video folder, a torchvision set), not {data.name}")
    if size > CACHE_LIMIT_BYTES:
        raise SigmaError(f"--cache-latents: {n} items would take {size / 2**30:.1f} GiB of latents (at most "
                         f"{CACHE_LIMIT_BYTES / 2**30:.0f}); pass --no-cache-latents")
    return True


def encode_dataset(tokenizer, data, device, batch_size: int = 256, show_progress: bool = True, bf16: bool = False
                   ) -> torch.Tensor:
    """The frozen tokenizer's latents of every training item, z: fp32 [N, L, c] on the host, encoded once in a
    fixed order and fixed batches, so a resumed run rebuilds the very same numbers. The tokenizer encodes
    deterministically (the VAE mean, no masking) and here under the training's autocast (`bf16`), so a
    cached latent is what a step would compute (up to rounding), without the encoder's ~25 % of a CPU
    training step (BENCHMARKS.md)."""
    from pipelines.train import with_progress

    n = len(data)
    out = torch.empty(n, tokenizer.config.num_latents, tokenizer.config.latent_dim)
    starts = with_progress(range(0, n, batch_size), "encoding the data set once" if show_progress else None)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for start in starts:
            x, _ = data.get_batch(torch.arange(start, min(n, start + batch_size)))
            out[start : start + x.shape[0]] = tokenizer.encode(x.to(device))[0].float().cpu()
    return out


def run_scheduler(schedule: IMMSchedule, stage: IMMStage):
    """The sampler a run draws with by default (saved in its pipeline folder): Euler for flow matching, else
    pushforward, from the stage's start time, through its 2-step midpoint."""
    from pipelines.imm.scheduler import IMMScheduler

    return IMMScheduler.from_schedule(schedule, "euler" if stage.objective == "flow-matching" else "pushforward", stage.start_time,
                                      stage.midpoint)


# a run's sampling defaults: IMMStage field -> IMMPipeline's config key (kept in model_index.json, so a pipeline
# folder without sigma.json, and diffusers users, sample as the run would)
PIPELINE_DEFAULTS = {"sample_steps": "default_steps", "cfg_scale": "guidance_scale", "cfg_one_step": "guidance_scale_one_step"}


def pipeline_defaults(stage: IMMStage) -> dict:
    return {key: getattr(stage, field) for field, key in PIPELINE_DEFAULTS.items()}


def stage_from_pipeline(config) -> dict:
    """The other way: the sampling defaults a pipeline config (model_index.json) holds, as a run's stage fields."""
    return {field: config[key] for field, key in PIPELINE_DEFAULTS.items() if config.get(key) is not None}


def alignment_loss(pred: torch.Tensor, teacher, x: torch.Tensor) -> torch.Tensor:
    """REPA's loss, 1 - cosine, between the align head's output pred [B, F] and the frozen teacher's pooled
    features of the clean pixels x [B, C, T, H, W] (averaged over frames for clips). The teacher runs on x's device
    (IMMTask loads it where the model is before train() moves the model there)."""
    with torch.no_grad():
        target = teacher.to(x.device).features(x).float().view(x.shape[0], x.shape[2], -1).mean(1)  # [B, F]
    return 1 - F.cosine_similarity(pred.float(), target, dim=-1).mean()


class IMMTask:
    kind = "imm"
    model_subfolder = "transformer"  # the run folder is a diffusers pipeline folder

    def __init__(self, model: DiT, schedule: IMMSchedule, stage: IMMStage, data, heldout, tokenizer, batch_size: int,
                 seed: int, data_spec: str, latents: torch.Tensor | None = None, compile_encoder: bool = False):
        if stage.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {stage.objective!r}")
        if stage.groups not in GROUPINGS:
            raise ValueError(f"groups must be one of {GROUPINGS}, not {stage.groups!r}")
        self.model, self.schedule, self.stage, self.data, self.heldout = model, schedule, stage, data, heldout
        self.tokenizer, self.batch_size, self.seed, self.data_spec = tokenizer, batch_size, seed, data_spec
        self.label = stage.objective  # the progress bar's name: imm, or flow-matching for the baseline
        self.latents = latents  # [N, L, c] from `encode_dataset`, or None: encode each batch
        if latents is not None and model.config.space != "latent":
            raise ValueError("cached latents are for a latent-space model")
        self.samples_per_step = batch_size
        self.group = stage.group_size if stage.objective == "imm" else 1
        if tokenizer is not None:
            tokenizer.requires_grad_(False).eval()
        # `--compile` compiles the frozen encoder too: on the endless shapes stream it encodes every batch, ~30 % of
        # a step on the CPU, and inductor's fused graph runs it 1.6x faster in bf16 (BENCHMARKS.md)
        self.encode = None if tokenizer is None else tokenizer.encode
        if compile_encoder and tokenizer is not None and latents is None:
            from pipelines.train import compile_backend

            self.encode = torch.compile(tokenizer.encode, backend=compile_backend())
        self.teacher = None
        if stage.align_teacher and stage.align_weight > 0:
            from checkpoints.io import load_model

            self.teacher = load_model(stage.align_teacher, "classifier", model.device).requires_grad_(False).eval()

    def trainable(self, model):
        model.requires_grad_(True)

    def make_optimizer(self, model, cfg):
        return make_imm_optimizer(model, cfg, self.stage)

    def to_tokens(self, model: DiT, x: torch.Tensor) -> torch.Tensor:
        if model.config.space == "pixels":
            return model.tokens_from_pixels(x)
        self.tokenizer.to(x.device)
        with torch.no_grad():
            return model.tokens_from_latents(self.encode(x)[0].float())

    def loss(self, net, model: DiT, step: int, generator: torch.Generator, rank: int, world: int):
        B, M = self.batch_size, self.group
        b = B // world
        if b % M:
            raise ValueError(f"the per-process batch {b} is not divisible by the group size {M}")
        complete = self.stage.objective == "imm" and self.stage.groups == "complete"
        window = group_window(B, M, model.config.num_classes) if complete else B
        indices = self.data.indices_for_step(step, window, self.seed)
        g = b // M
        if self.stage.objective == "imm":  # groups of one class, formed on the GLOBAL batch (ranks = one process)
            stream_labels = self.data.labels_of(indices)
            order, group_labels = (complete_class_groups(stream_labels, B // M, M, model.null_class) if complete
                                   else class_groups(stream_labels, M, model.null_class))
            indices = indices[order]
            labels = group_labels[rank * g : (rank + 1) * g].repeat_interleave(M)
        indices = indices[rank * b : (rank + 1) * b]  # a contiguous share of the groups
        cached = self.latents is not None
        if cached and self.teacher is None:  # no pixels needed at all
            x, data_labels = None, self.data.labels_of(indices)
        else:
            x, data_labels = self.data.get_batch(indices)
            x = x.to(model.device)
        if self.stage.objective != "imm":
            labels = data_labels
        labels = labels.to(model.device)
        if cached:
            tokens = model.tokens_from_latents(self.latents[indices].to(model.device))
        else:
            tokens = self.to_tokens(model, x)
        draws = draw_global(self.schedule, B, M, model.token_shape, self.stage.label_dropout, generator, self.stage.objective,
                            self.stage.fm_fraction)
        if self.stage.objective == "imm":
            draws["drop"] = unconditional_groups(draws["u"], group_labels, model.null_class, self.stage.label_dropout)
        mine = {k: v[rank * g : (rank + 1) * g] for k, v in draws.items() if k not in ("noise", "u")}
        mine["noise"] = draws["noise"][rank * b : (rank + 1) * b]
        model.alignment = None
        if self.stage.objective == "imm":
            loss, logs = imm_loss(net, model, self.schedule, tokens, labels, mine, M, self.stage.fm_weight)
            # 'mmd' is a mean over this share's IMM groups, 'fm' over its velocity groups: weighted by their number,
            # train()'s mean over ranks is the mean over the batch's groups, as in one process
            velocity = int(mine["fm"].sum())
            if "mmd" in logs:
                logs["mmd"] = (logs["mmd"], g - velocity)
            if self.stage.fm_fraction > 0 and self.stage.fm_weight > 0:  # every rank logs the same names (train())
                logs["fm"] = (logs.get("fm", math.nan), velocity)  # (NaN, 0: this share drew no velocity group)
        else:
            loss, logs = flow_matching_loss(net, model, self.schedule, tokens, labels, mine)
        if self.teacher is not None:
            align = alignment_loss(model.alignment, self.teacher, x)
            model.alignment = None  # do not keep the step's graph alive on the module
            loss, logs = loss + self.stage.align_weight * align, {**logs, "align": align.item()}
        return loss, logs

    @torch.no_grad()
    def pictures(self, model: DiT, step: int, run_dir: Path) -> Path:
        from pipelines.imm.sampling import generate
        from pipelines.visual import save_media

        was_training = model.training
        model.eval()
        per_class = 8
        labels = torch.arange(model.config.num_classes).repeat_interleave(per_class)
        x = generate(model, self.scheduler(), labels, self.stage.sample_steps, torch.Generator().manual_seed(0),
                     self.tokenizer, default_guidance(asdict(self.stage), self.stage.sample_steps))
        model.train(was_training)
        ext = "gif" if x.shape[2] > 1 else "png"
        save_media(x, run_dir / "samples" / f"samples_{step:06d}.{ext}", nrow=per_class)
        return save_media(x, run_dir / f"samples.{ext}", nrow=per_class)

    def scheduler(self):
        return run_scheduler(self.schedule, self.stage)

    def metadata(self) -> dict:
        return {"data": self.data.name, "data_spec": absolute_spec(self.data_spec), "image_size": self.data.image_size,
                "frames": self.data.frames, "stage": asdict(self.stage), "schedule": self.schedule.to_dict()}
