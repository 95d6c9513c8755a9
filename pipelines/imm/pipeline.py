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

    def __init__(self, transformer, scheduler, tokenizer):  # tokenizer None in pixel space (no default: diffusers
        # would treat a defaulted argument as optional and leave it out of save_pretrained)
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor | None = None, num_images: int = 1, num_inference_steps: int = 1,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None, sampler: str | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate; class_labels None = unconditional (the null class). output_type: "pil" (a list of PIL
        images; for clips a list of frame lists), "np" ([B, H, W, C] or [B, T, H, W, C] in [0, 1]) or "pt"
        ([B, C, T, H, W] in [-1, 1])."""
        model = self.transformer
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
