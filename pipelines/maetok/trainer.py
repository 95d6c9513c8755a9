"""Training and evaluating the MAETok tokenizer: the Task the shared loop runs, and reconstruction metrics."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.data import absolute_spec
from pipelines.maetok.model import PRESETS, MAETok, maetok_loss
from pipelines.train import with_progress

# schedule per preset (the model sizes are in model.PRESETS); tuned for 32x32 shapes on a 2-core CPU
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(steps=2000, batch_size=32, lr=2e-3, warmup=100, ema=0.0, finetune_tail=0.4),
    "small": dict(steps=10000, batch_size=64, lr=1e-3, warmup=500, ema=0.0, finetune_tail=0.2),
    "base": dict(steps=100000, batch_size=256, lr=3e-4, warmup=2000, ema=0.9999, finetune_tail=0.1),
}


def build_config(preset: str, image_size: int, frames: int, patch_size: int | None, tubelet: int | None,
                 bottleneck: str) -> dict:
    """MAETok config from a preset and the CLI's overrides; impossible sizes raise SigmaError."""
    from pipelines.errors import SigmaError

    config = dict(PRESETS[preset], image_size=image_size, frames=frames, bottleneck=bottleneck)
    if patch_size is not None:
        config["patch_size"] = patch_size
    config["tubelet"] = tubelet if tubelet is not None else (2 if frames > 1 and frames % 2 == 0 else 1)
    if image_size < 1 or frames < 1 or config["patch_size"] < 1 or config["tubelet"] < 1:
        raise SigmaError("--image-size, --frames, --patch-size and --tubelet must be positive")
    if image_size % config["patch_size"]:
        raise SigmaError(f"--image-size {image_size} is not divisible by the patch size {config['patch_size']}")
    if config["patch_size"] % 2:
        raise SigmaError(f"the patch size must be even (HOG uses 2x2 cells per patch), not {config['patch_size']}")
    if frames % config["tubelet"]:
        raise SigmaError(f"--frames {frames} is not divisible by the tubelet length {config['tubelet']}")
    if bottleneck not in ("ae", "vae"):
        raise SigmaError(f"--bottleneck must be ae or vae, not {bottleneck!r}")
    return config


@dataclass
class TokenizerStage:
    """What is trained, with which loss weights (saved in sigma.json beside the weights)."""

    finetune_decoder: bool = False  # the whole run is MAETok's last stage: encoder frozen, no masking
    finetune_tail: float = 0.0  # or only this last fraction of the steps (the default schedule's built-in stage)
    hog_weight: float = 1.0
    kl_weight: float = 1e-6
    init_from: str | None = None  # the tokenizer folder this run started from (decoder fine-tuning, or a warm start)
    feature_teacher: str | None = None  # a classifier folder whose features the feature decoder predicts
    feature_weight: float = 1.0
    latent_noise: float = 0.0  # decoder-side noise on the latents in pre-training (model.add_latent_noise)


class TokenizerTask:
    kind = "tokenizer"

    def __init__(self, model: MAETok, data, heldout, stage: TokenizerStage, batch_size: int, seed: int,
                 data_spec: str, num_pictures: int = 16, steps: int | None = None):
        self.model, self.data, self.heldout, self.stage, self.data_spec = model, data, heldout, stage, data_spec
        self.batch_size, self.seed = batch_size, seed
        # first step of the decoder fine-tuning phase
        if stage.finetune_decoder:
            self.finetune_from = 0
        elif stage.finetune_tail > 0:
            self.finetune_from = round(steps * (1 - stage.finetune_tail))
        else:
            self.finetune_from = math.inf
        # a built-in fine-tuning tail leaves the encoder and auxiliary decoders without gradients mid-run, which DDP
        # must be told of; otherwise `trainable` freezes whatever gets none, and the search costs a graph walk a step
        self.ddp_find_unused_parameters = not stage.finetune_decoder and self.finetune_from < math.inf
        self.samples_per_step = batch_size
        self.picture_batch = heldout.get_batch(torch.arange(min(num_pictures, len(heldout))))[0]
        self.teacher = None
        if stage.feature_teacher and stage.feature_weight > 0 and not stage.finetune_decoder:
            from pipelines.maetok.teacher import FeatureTeacher

            self.teacher = FeatureTeacher(stage.feature_teacher, model.device)

    def trainable(self, model: MAETok):
        model.requires_grad_(True)
        if self.stage.finetune_decoder:
            for p in model.encoder_parameters():
                p.requires_grad_(False)
        weights = {"hog": self.stage.hog_weight, "feature": self.stage.feature_weight if self.teacher else 0.0}
        for name, modules, pos in model.auxiliary_modules():
            if self.stage.finetune_decoder or weights[name] == 0:  # an auxiliary decoder that gets no gradient
                for module in modules:
                    module.requires_grad_(False)
                pos.requires_grad_(False)

    def loss(self, net, model: MAETok, step: int, generator: torch.Generator, rank: int, world: int):
        # masks are drawn for the GLOBAL batch and sliced, so N ranks compute exactly what one process would
        indices = self.data.indices_for_step(step, self.batch_size, self.seed)
        x, _ = self.data.get_batch(indices[rank::world])
        x = x.to(model.device)
        keep = targets = None
        if step < self.finetune_from:
            ratio = model.sample_mask_ratio(generator)
            keep = model.random_keep(self.batch_size, ratio, generator)[rank::world]
            if self.teacher is not None:
                targets = self.teacher.targets(x, model.grid, model.config.tubelet)
        return maetok_loss(net, model, x, keep, generator, self.stage.hog_weight, self.stage.kl_weight,
                           targets, self.stage.feature_weight, self.stage.latent_noise)

    @torch.no_grad()
    def pictures(self, model: MAETok, step: int, run_dir: Path) -> Path:
        from pipelines.visual import save_media, side_by_side

        was_training = model.training
        model.eval()
        x = self.picture_batch.to(model.device)
        recon = reconstruct(model, x)
        model.train(was_training)
        grid = side_by_side(x.cpu(), recon.cpu())
        save_media(grid, run_dir / "samples" / f"recon_{step:06d}.png", nrow=8)
        return save_media(grid, run_dir / "recon.png", nrow=8)

    def metadata(self) -> dict:
        from dataclasses import asdict

        return {"data": self.data.name, "data_spec": absolute_spec(self.data_spec), "image_size": self.data.image_size, "frames": self.data.frames,
                "stage": asdict(self.stage)}


@torch.no_grad()
def reconstruct(model: MAETok, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Encode every patch (no masking) and decode; [B, C, T, H, W] -> same, clamped to [-1, 1]."""
    out = [model.decode(model.encode(chunk)[0]).clamp(-1, 1) for chunk in x.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def evaluate_reconstruction(model: MAETok, heldout, num: int, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """PSNR / SSIM over the first `num` held-out samples. Returns (metrics, originals, reconstructions)."""
    from pipelines.metrics import psnr, ssim

    num = min(num, len(heldout))
    x, _ = heldout.get_batch(torch.arange(num))
    recon = reconstruct(model, x.to(device)).cpu()
    p, s = psnr(recon, x), ssim(recon, x)
    metrics = {"psnr": p.mean().item(), "ssim": s.mean().item(), "psnr_min": p.min().item(), "num": num}
    return metrics, x, recon


def encode_first(model: MAETok, ds, num: int, device, batch_size: int = 256, progress: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents z [B, L, c] (float32, CPU) and labels (None if the data set has none) of the first `num` items
    of a data set (fewer if it is smaller), no masking; read and encoded `batch_size` at a time (behind a
    progress bar named `progress`, if given: 4,096 clips of 8 frames take about a minute on a 2-core CPU)."""
    zs, ys = [], []
    num = min(num, len(ds))
    with torch.no_grad():
        for start in with_progress(range(0, num, batch_size), progress):
            x, y = ds.get_batch(torch.arange(start, min(num, start + batch_size)))
            zs.append(model.encode(x.to(device))[0].float().cpu())
            ys.append(y)
    return torch.cat(zs), (None if ys[0] is None else torch.cat(ys))


def principal_components(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of samples z [B, ...] flattened: mean [D], std of each component [min(B, D)] (falling) and the
    components' orthonormal directions [min(B, D), D], all float64."""
    flat = z.flatten(1).double()
    mean = flat.mean(0)
    _, singular, directions = torch.linalg.svd(flat - mean, full_matrices=False)
    return mean, singular / max(1, len(flat) - 1) ** 0.5, directions


def linear_probe(model: MAETok, train, heldout, num_train: int, num_heldout: int, device, steps: int = 200,
                 show_progress: bool = False) -> dict:
    """How linearly the latents carry the class (MAETok's argument: a discriminative latent space is easier for a
    diffusion model to learn). A multinomial logistic regression on the flattened, standardised latents of
    `num_train` training samples (L-BFGS, a small L2 penalty), scored on `num_heldout` held-out samples."""
    z_train, y_train = encode_first(model, train, num_train, device, progress="encoding for the probe" if show_progress else None)
    z_test, y_test = encode_first(model, heldout, num_heldout, device)
    z_train, z_test = z_train.flatten(1), z_test.flatten(1)
    mean, std = z_train.mean(0), z_train.std(0) + 1e-6
    z_train, z_test = (z_train - mean) / std, (z_test - mean) / std
    probe = torch.nn.Linear(z_train.shape[1], train.num_classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(z_train), y_train) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        accuracy = (probe(z_test).argmax(-1) == y_test).float().mean().item()
        train_accuracy = (probe(z_train).argmax(-1) == y_train).float().mean().item()
    return {"probe_accuracy": accuracy, "probe_train_accuracy": train_accuracy, "probe_num_train": len(y_train),
            "probe_num_heldout": len(y_test), "num_classes": train.num_classes}


@torch.no_grad()
def spectrum_probe(model: MAETok, classifier, train, heldout, num_train: int, num_heldout: int, device,
                   dims: tuple[int, ...] = (32, 64, 128, 192, 256), show_progress: bool = False,
                   to_data: torch.Tensor | None = None) -> dict:
    """Where the latent keeps what decides the class, measured with a classifier (`sigma train-classifier`).

    The principal components of the flattened latents of `num_train` training samples are fitted; held-out
    latents are cut to their top K components (the rest set to the mean), decoded and classified. A diffusion
    model learns a latent's high-variance directions first and weighs them most in its loss, so a tokenizer
    that needs many components to keep the class is slow to generate recognisable classes from (on shapes, the
    shipped tokenizer: 37 % at 32 of 512 components, 91 % at 128). The accuracy at K is also the ceiling of an
    IMM model trained with `--latent-norm pca --pca-dims K`."""
    from pipelines.evaluation.classifier import predict

    z_train, _ = encode_first(model, train, num_train, device, progress="encoding for the spectrum" if show_progress else None)
    z, y = encode_first(model, heldout, num_heldout, device)
    mean, _, directions = principal_components(z_train)  # directions: rows by falling variance

    def accuracy(latent):
        recon = torch.cat([model.decode(c.to(device)).clamp(-1, 1).cpu() for c in latent.split(256)])
        pred = predict(classifier, recon)
        pred = pred if to_data is None else to_data[pred]  # (class_order: the classifier's numbering -> the data's)
        return (pred == y.repeat_interleave(recon.shape[2])).float().mean().item()

    result = {"spectrum_all": accuracy(z)}
    centred = z.flatten(1).double() - mean
    for k in dims:
        if k < directions.shape[0]:
            kept = (centred @ directions[:k].T) @ directions[:k] + mean
            result[f"spectrum_{k}"] = accuracy(kept.float().view_as(z))
    result["spectrum_num_train"], result["spectrum_num_heldout"] = len(z_train), len(y)
    return result
