"""IMMPipeline: diffusers' DiffusionPipeline of (transformer, scheduler, tokenizer). A `sigma train-imm` run
folder is a pipeline folder: `IMMPipeline.from_pretrained(run_dir)` loads it offline."""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

# the component classes must be imported for `from_pretrained` to find them (diffusers never imports by name)
from pipelines.imm.model import DiT  # noqa: F401
from pipelines.imm.sampling import decode_tokens, sample_tokens
from pipelines.imm.scheduler import IMMScheduler  # noqa: F401
from pipelines.maetok.model import MAETok  # noqa: F401


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
        """The run's guidance at `steps` sampling steps: its 1-step value for single jumps where it has one."""
        one_step = self.config.guidance_scale_one_step if steps == 1 else None
        if one_step is not None:
            return one_step
        return self.config.guidance_scale if self.config.guidance_scale is not None else 1.0

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor | None = None, num_images: int = 1,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, sampler: str | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        """Generate; class_labels None = unconditional (the null class). num_inference_steps and guidance_scale
        default to the run's (`default_guidance`). output_type: "pil" (a list of PIL images; for clips a list of
        frame lists), "np" ([B, H, W, C] or [B, T, H, W, C] in [0, 1]) or "pt" ([B, C, T, H, W] in [-1, 1])."""
        model = self.transformer
        if num_inference_steps is None:
            num_inference_steps = self.config.default_steps or 1
        if guidance_scale is None:
            guidance_scale = self.default_guidance(num_inference_steps)
        if class_labels is None:
            labels = torch.full((num_images,), model.null_class, dtype=torch.long)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        tokens = sample_tokens(model, self.scheduler, labels, num_inference_steps, generator, guidance_scale, sampler)
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
