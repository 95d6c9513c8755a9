"""IMMPipeline: diffusers' DiffusionPipeline of (transformer, scheduler, tokenizer). A `sigma train-imm` run
folder is a pipeline folder: `IMMPipeline.from_pretrained(run_dir)` loads it offline."""
from __future__ import annotations

import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

# the component classes must be imported for `from_pretrained` to find them (diffusers never imports by name)
from pipelines.imm.model import DiT  # noqa: F401
from pipelines.imm.sampling import decode_tokens, sample_tokens
from pipelines.imm.scheduler import IMMScheduler  # noqa: F401
from pipelines.imm.trainer import default_guidance, stage_from_pipeline
from pipelines.maetok.model import MAETok  # noqa: F401


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class IMMPipeline(DiffusionPipeline):
    """transformer: DiT; scheduler: IMMScheduler; tokenizer: MAETok (latent space) or None (pixel space)."""

    model_cpu_offload_seq = "transformer->tokenizer"
    _optional_components = ["tokenizer"]  # pixel space has none

    def __init__(self, transformer, scheduler, tokenizer, default_steps: int | None = None,
                 guidance_scale: float | None = None, guidance_scale_one_step: float | None = None):
        # tokenizer: None in pixel space (no default: diffusers would treat a defaulted argument as optional and
        # leave it out of save_pretrained). The three numbers are the run's sampling defaults (`sigma train-imm`
        # saves its --sample-steps, --cfg and --cfg-one-step), kept in model_index.json, as diffusers keeps
        # its own pipelines' settings; None: 1 step, no guidance.
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer)
        self.register_to_config(default_steps=default_steps, guidance_scale=guidance_scale,
                                guidance_scale_one_step=guidance_scale_one_step)

    def default_guidance(self, steps: int) -> float:
        """The run's guidance at `steps` sampling steps, by the rule `sigma sample` follows (its 1-step value for
        single jumps where it has one; 1, no guidance, where the config has none)."""
        return default_guidance(stage_from_pipeline(self.config), steps)

    def class_label_tensor(self, class_labels, num_images: int | None) -> torch.Tensor:
        """[B] long labels from class indices (ints, 0-D/1-D tensors or arrays) in [0, num_classes], where
        num_classes is the null class, or class names (transformer.config.class_names); None: num_images (default
        1) unconditional samples."""
        null = self.transformer.null_class
        if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0):
            raise ValueError(f"num_images must be a non-negative int, not {num_images!r}")
        if class_labels is None:
            return torch.full((1 if num_images is None else num_images,), null, dtype=torch.long)
        if isinstance(class_labels, str):
            class_labels = [class_labels]
        if isinstance(class_labels, (list, tuple)) and any(isinstance(v, str) for v in class_labels):
            names = list(self.transformer.config.class_names or [])  # names -> indices, as `sigma sample` takes them
            unknown = [v for v in class_labels if isinstance(v, str) and v not in names]
            if unknown:
                raise ValueError(f"unknown class label {unknown[0]!r}; this model knows: {', '.join(names) or 'no names'}")
            class_labels = [names.index(v) if isinstance(v, str) else v for v in class_labels]
        labels = torch.as_tensor(class_labels)
        if labels.numel() and (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):
            raise TypeError(f"class_labels must be integers, not {labels.dtype}")
        if labels.dim() > 1:
            raise ValueError(f"class_labels must be one label or a 1-D sequence of them, not shape {tuple(labels.shape)}")
        labels = labels.reshape(-1).long().cpu()
        if ((labels < 0) | (labels > null)).any():
            raise ValueError(f"class_labels must lie in [0, {null}] ({null}: unconditional), not {labels.tolist()}")
        if num_images is not None and num_images != len(labels):
            raise ValueError(f"num_images {num_images} does not match the {len(labels)} class_labels given (one per image)")
        return labels

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor | None = None, num_images: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, sampler: str | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate; class_labels None = num_images (default 1) unconditional samples (the null class); given,
        one image per label (num_images, if given, must match). num_inference_steps and guidance_scale default to
        the run's (`default_guidance`). generator: one, a list (one per image), or None (torch's global RNG, as in
        diffusers). sampler: this call's (default: the scheduler config's). output_type: "pil" (a list of PIL
        images; for clips a list of frame lists), "np" ([B, H, W, C] or [B, T, H, W, C] in [0, 1]), "pt"
        ([B, C, T, H, W] in [-1, 1]) or "latent" (the sampled tokens [B, N, c], not decoded)."""
        model = self.transformer
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, not {output_type!r}")
        labels = self.class_label_tensor(class_labels, num_images)
        if num_inference_steps is None:
            num_inference_steps = self.config.default_steps or 1
        if guidance_scale is None:
            guidance_scale = self.default_guidance(num_inference_steps)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (1: no guidance), not {guidance_scale}")
        tokens = sample_tokens(model, self.scheduler, labels, num_inference_steps, generator, guidance_scale, sampler)
        if output_type == "latent":
            return ImagePipelineOutput(images=tokens) if return_dict else (tokens,)
        x = decode_tokens(model, tokens, self.tokenizer).cpu().float()  # [B, C, T, H, W] in [-1, 1]
        if output_type == "pt":
            images = x
        else:
            arr = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()  # [B, T, H, W, C]
            if output_type == "np":
                images = arr[:, 0] if arr.shape[1] == 1 else arr
            else:
                pil = [self.numpy_to_pil(clip) for clip in arr]  # per sample: a list of frames
                images = [frames[0] for frames in pil] if arr.shape[1] == 1 else pil
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
