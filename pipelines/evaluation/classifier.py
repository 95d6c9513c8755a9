"""A small CNN classifier of shapes: its logits give the class accuracy of conditional samples, its pooled
features the feature space of `sigma eval`'s Fréchet distance (an Inception network is neither available
offline nor meaningful for 32x32 synthetic shapes).

Inputs are images [B, 3, H, W] or clips [B, 3, T, H, W] in [-1, 1]; clips are scored frame by frame
(frames are flattened into the batch: outputs are [B*T, ...]). Other sizes are resized to `image_size`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class ShapesClassifier(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, image_size: int = 32, num_classes: int = 6, class_names: list | None = None, width: int = 32,
                 feature_dim: int = 128):
        super().__init__()
        w = width

        def stage(cin, cout):  # two 3x3 convs, then halve the resolution
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.AvgPool2d(2))

        self.body = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 4 * w))
        self.to_features = nn.Linear(4 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def frames(x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B*T, C, H, W]; images pass through."""
        if x.dim() == 5:
            x = x.transpose(1, 2).flatten(0, 1)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frames(x).to(self.to_features.weight.dtype)
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        h = self.body(x).mean((2, 3))  # global average pool: [B, 4w]
        return F.silu(self.to_features(h))  # [B, feature_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B(*T), num_classes]


@torch.no_grad()
def extract_features(model: ShapesClassifier, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """x [B, 3, (T,) H, W] in [-1, 1] -> float64 [B*T, feature_dim] on the CPU."""
    model.eval()
    x = model.frames(x)
    device = model.to_features.weight.device
    return torch.cat([model.features(c.to(device)).double().cpu() for c in x.split(batch_size)])


@torch.no_grad()
def predict(model: ShapesClassifier, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class per frame: int64 [B*T]."""
    model.eval()
    x = model.frames(x)
    device = model.to_features.weight.device
    return torch.cat([model(c.to(device)).argmax(-1).cpu() for c in x.split(batch_size)])


class ClassifierTask:
    """Cross-entropy on a labelled data set, for the shared training loop. Random horizontal flips are
    label-preserving for every shape class (all are mirror-symmetric up to rotation)."""

    kind = "classifier"

    def __init__(self, model: ShapesClassifier, data, heldout, batch_size: int, seed: int, data_spec: str):
        self.model, self.data, self.heldout, self.batch_size, self.seed = model, data, heldout, batch_size, seed
        self.data_spec, self.samples_per_step = data_spec, batch_size

    def trainable(self, model):
        model.requires_grad_(True)

    def loss(self, net, model, step, generator, rank, world):
        indices = self.data.indices_for_step(step, self.batch_size, self.seed)[rank::world]
        x, y = self.data.get_batch(indices)
        flip = torch.rand(self.batch_size, generator=generator)[rank::world] < 0.5
        x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
        x, y = model.frames(x.to(model.device)), y.to(model.device).repeat_interleave(x.shape[2])
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"accuracy": (logits.argmax(-1) == y).float().mean().item()}

    def pictures(self, model, step: int, run_dir: Path):
        return None

    def metadata(self) -> dict:
        return {"data": self.data.name, "data_spec": self.data_spec, "image_size": self.data.image_size,
                "frames": self.data.frames}


def evaluate_classifier(model: ShapesClassifier, heldout, num: int, device) -> dict:
    num = min(num, len(heldout))
    x, y = heldout.get_batch(torch.arange(num))
    pred = predict(model.to(device), x)
    return {"accuracy": (pred == y.repeat_interleave(x.shape[2])).float().mean().item(), "num": num}
