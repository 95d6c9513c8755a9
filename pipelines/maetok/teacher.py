"""A frozen teacher for MAETok's feature decoder: the paper predicts DINOv2 / SigLIP features of the masked
patches; nothing can be downloaded here, so the teacher is any sigma classifier folder (`sigma
train-classifier`). Its last feature map is resized to the tokenizer's patch grid, giving one target vector
per patch token."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


class FeatureTeacher:
    def __init__(self, folder: Path | str, device: str | torch.device = "cpu"):
        from checkpoints.io import load_model

        self.net = load_model(folder, "classifier", device).requires_grad_(False)
        self.dim = self.net.config.feature_dim

    @torch.no_grad()
    def targets(self, x: torch.Tensor, grid: tuple[int, int, int], tubelet: int) -> torch.Tensor:
        """x [B, C, T, H, W] in [-1, 1] -> [B, N, dim] in patchify's (t', h', w') order; the frames of a tubelet
        are averaged. The teacher runs on x's device (the tokenizer task loads it before train() moves the model)."""
        B, T = x.shape[0], x.shape[2]
        maps = self.net.to(x.device).feature_map(x).float()  # [B*T, F, h, w]
        maps = F.interpolate(maps, size=grid[1:], mode="bilinear", align_corners=False)  # [B*T, F, H', W']
        maps = maps.view(B, T // tubelet, tubelet, self.dim, *grid[1:]).mean(2)  # [B, T', F, H', W']
        return maps.permute(0, 1, 3, 4, 2).reshape(B, -1, self.dim)
