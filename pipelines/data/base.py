"""The `Dataset` every data source implements: labelled clips as a batch-at-a-time, index-addressed stream.

Axis legend: B batch, C channels (always 3), T frames (1 for images), H = W = image_size.

Two rules make training reproducible and resumable:
- `get_batch(indices)` is a pure function of each index (for a fixed data set, seed and split): sample i
  is the same whatever else is in the batch, so ranks may split a global batch any way they like.
- `indices_for_step(step, B, seed)` is a pure function of its arguments, so resuming at step k replays
  exactly the data order of an uninterrupted run.
"""
from __future__ import annotations

import numpy as np
import torch

SPLITS = ("train", "heldout")


class Dataset:
    """Base class. Subclasses set the attributes and implement `__len__` and `get_batch`.

    Finite data sets inherit `indices_for_step` (shuffled epochs); procedural ones override it.
    """

    name: str  # e.g. "shapes", "folder:/abs/path", "cifar10"
    class_names: list[str]
    channels: int = 3  # grayscale sources are expanded to RGB
    frames: int = 1
    image_size: int = 32
    split: str = "train"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: int64 [B] -> (x: float32 [B, C, T, H, W] in [-1, 1], y: int64 [B] class labels)."""
        raise NotImplementedError

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 [B] class labels of these samples (subclasses answer without decoding pixels where they can)."""
        return self.get_batch(indices)[1]

    def indices_for_step(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The global batch of sample indices for training step `step`: int64 [batch_size].

        Position p = step * B + j of the endless stream is item p % N of the permutation of epoch p // N,
        seeded by (seed, epoch); a batch that straddles an epoch end takes the tail of one permutation
        and the head of the next.
        """
        n = len(self)
        pos = torch.arange(step * batch_size, (step + 1) * batch_size, dtype=torch.int64)
        epoch, offset = pos // n, pos % n
        out = torch.empty_like(pos)
        for e in epoch.unique().tolist():
            m = epoch == e
            out[m] = self._epoch_permutation(seed, e)[offset[m]]
        return out

    def _epoch_permutation(self, seed: int, epoch: int) -> torch.Tensor:
        """A permutation of range(len(self)), int64 [N], a pure function of (seed, epoch); a few are cached."""
        cache = self.__dict__.setdefault("_perm_cache", {})
        key = (seed, epoch)
        if key not in cache:
            if len(cache) >= 4:  # consecutive steps touch at most two epochs (unless B > N)
                cache.pop(next(iter(cache)))
            # numpy's SeedSequence mixes (seed, epoch) into a well-spread stream and is stable across versions
            rng = np.random.default_rng([seed % 2**64, epoch])
            cache[key] = torch.from_numpy(rng.permutation(len(self)).astype(np.int64))
        return cache[key]

    def __repr__(self) -> str:
        n = len(self)
        size = "endless" if n >= 2**31 - 1 else f"{n} items"
        return (
            f"{type(self).__name__}({self.name!r}, split={self.split}, {size}, {self.num_classes} classes, "
            f"x=[B, {self.channels}, {self.frames}, {self.image_size}, {self.image_size}])"
        )


def as_index_tensor(indices) -> torch.Tensor:
    """Accept a LongTensor, a list or a range of sample indices; return int64 [B] on the CPU."""
    return torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
