"""A small CNN that classifies `shapes` frames: its logits give the class accuracy of conditional samples,
its pooled features the feature space of `sigma eval`'s Fréchet distance. (An Inception network is neither
available offline nor meaningful for 32x32 synthetic shapes; this one trains in about two minutes on a CPU.)

Axis legend: B batch, T frames, C channels (3), H = W = image_size, F feature_dim.

Inputs are images [B, 3, H, W] or clips [B, 3, T, H, W] in [-1, 1]. Clips are scored frame by frame: the
frames are flattened into the batch, so every output has B*T rows (clip-major: clip 0's frames first).
Frames of another size are resized to `image_size` (bilinear, antialiased), so a 32x32 classifier can score
a 64x64 generator; the scores then measure what survives the resize.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from pipelines.data import absolute_spec


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> GroupNorm -> SiLU. GroupNorm, not BatchNorm: no running statistics, so a frame's features do
    not depend on the batch it came in nor on train/eval mode."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class ShapesClassifier(ModelMixin, ConfigMixin):
    """Four resolutions (image_size, /2, /4, /8), widths w, 2w, 4w, then feature_dim; a stride-2 conv moves
    down a level, so most of the work runs on small maps (about 11 M multiply-adds per 32x32 frame at the
    defaults, ~290 k parameters). features = global average pool of the last block: [B*T, F]."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, image_size: int = 32, num_classes: int = 6, class_names: list[str] | None = None,
                 width: int = 16, feature_dim: int = 128):
        super().__init__()
        if width % 8 or feature_dim % 8:
            raise ValueError(f"width and feature_dim must be multiples of 8 (GroupNorm uses 8 groups), "
                             f"got {width} and {feature_dim}")
        w = width
        self.body = nn.Sequential(
            conv_block(3, w),  # [B, w, S, S]
            conv_block(w, 2 * w, stride=2), conv_block(2 * w, 2 * w),  # [B, 2w, S/2, S/2]
            conv_block(2 * w, 4 * w, stride=2), conv_block(4 * w, 4 * w),  # [B, 4w, S/4, S/4]
            conv_block(4 * w, 8 * w, stride=2), conv_block(8 * w, feature_dim),  # [B, F, S/8, S/8]
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def frames(x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B*T, C, H, W] (clip-major); images [B, C, H, W] pass through."""
        if x.dim() == 5:
            x = x.transpose(1, 2).flatten(0, 1)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"the classifier takes [B, 3, H, W] or [B, 3, T, H, W], got {tuple(x.shape)}")
        return x

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, (T,) H, W] in [-1, 1] -> the last block's map [B*T, feature_dim, image_size/8, image_size/8]."""
        x = self.frames(x).to(self.head.weight.dtype)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, (T,) H, W] in [-1, 1] -> [B*T, feature_dim]."""
        return self.feature_map(x).mean((2, 3))  # global average pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, (T,) H, W] in [-1, 1] -> logits [B*T, num_classes]."""
        return self.head(self.features(x))


@torch.no_grad()
def extract_features(model: ShapesClassifier, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """x [B, 3, (T,) H, W] in [-1, 1] -> float64 [B*T, feature_dim] on the CPU (what frechet_distance wants)."""
    model.eval()
    frames = model.frames(x)
    return torch.cat([model.features(c.to(model.device)).double().cpu() for c in frames.split(batch_size)])


def class_order(model: ShapesClassifier, class_names: list[str] | None) -> torch.Tensor | None:
    """The classifier's class index -> the index of the same class in `class_names`, int64 [C]: the same classes
    in any order (a folder's classes are sorted, the shapes classifier's are not). None if the class sets differ."""
    known, names = list(model.config.class_names or []), list(class_names or [])
    if sorted(known) != sorted(names) or len(set(names)) != len(names):
        return None
    return torch.tensor([names.index(n) for n in known], dtype=torch.int64)


@torch.no_grad()
def predict(model: ShapesClassifier, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """x [B, 3, (T,) H, W] in [-1, 1] -> predicted class per frame, int64 [B*T] on the CPU."""
    model.eval()
    frames = model.frames(x)
    return torch.cat([model(c.to(model.device)).argmax(-1).cpu() for c in frames.split(batch_size)])


class ClassifierTask:
    """Cross-entropy on a labelled data set, for the shared loop in pipelines/train.py.

    Augmentation: a random horizontal and vertical flip per sample. Every shape class is mirror-symmetric up
    to a rotation, and rotations are uniform in the data, so flips keep both the label and the distribution.
    Flip decisions are drawn for the global batch and sliced per rank, like the batch itself.
    """

    kind = "classifier"

    def __init__(self, model: ShapesClassifier, data, batch_size: int, seed: int, data_spec: str):
        self.model, self.data, self.batch_size, self.seed, self.data_spec = model, data, batch_size, seed, data_spec
        self.samples_per_step = batch_size

    def trainable(self, model: ShapesClassifier):
        model.requires_grad_(True)

    def loss(self, net, model: ShapesClassifier, step: int, generator: torch.Generator, rank: int, world: int):
        indices = self.data.indices_for_step(step, self.batch_size, self.seed)[rank::world]
        x, y = self.data.get_batch(indices)  # [b, 3, T, H, W], [b]
        flips = torch.rand(self.batch_size, 2, generator=generator)[rank::world] < 0.5
        x = torch.where(flips[:, 0, None, None, None, None], x.flip(-1), x)
        x = torch.where(flips[:, 1, None, None, None, None], x.flip(-2), x)
        y = y.repeat_interleave(x.shape[2])  # one label per frame, matching net's [b*T] rows
        logits = net(x.to(model.device))
        y = y.to(model.device)
        return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean().item()}

    def pictures(self, model: ShapesClassifier, step: int, run_dir: Path) -> Path | None:
        return None  # the held-out accuracy printed at the end says more than a grid would

    def metadata(self) -> dict:
        return {"data": self.data.name, "data_spec": absolute_spec(self.data_spec), "image_size": self.data.image_size,
                "frames": self.data.frames}


def evaluate_classifier(model: ShapesClassifier, heldout, num: int, device) -> dict:
    """Per-frame accuracy on the first `num` held-out samples: {"accuracy", "num"} (num counts samples)."""
    num = min(num, len(heldout))
    x, y = heldout.get_batch(torch.arange(num))
    pred = predict(model.to(device), x)
    return {"accuracy": (pred == y.repeat_interleave(x.shape[2])).float().mean().item(), "num": num}
