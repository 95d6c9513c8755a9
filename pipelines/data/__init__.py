"""Data sets for sigma: `make_dataset(spec)` -> a `Dataset` yielding x: float32 [B, 3, T, H, W] in [-1, 1].

Specs:
  shapes                 procedural coloured shapes, 6 classes (SHAPE_CLASSES), endless
  moving-shapes          the same shapes moving and spinning, T-frame clips
  PATH                   a folder: pictures when frames == 1, clips (frame folders / GIFs, animated WebP/PNG) when frames > 1
  cifar10:PATH, cifar100:PATH, mnist:PATH, fashion-mnist:PATH
                         a torchvision data set already on disk under PATH (never downloaded)
Splits: "train" and "heldout" (disjoint from train; see folders.py for how folders are split).
"""
from __future__ import annotations

import numbers
import os
import re
from pathlib import Path

from pipelines.data.base import SPLITS, Dataset
from pipelines.data.folders import TORCHVISION_SETS, image_folder, torchvision_set, video_folder
from pipelines.data.shapes import SHAPE_CLASSES, ShapesDataset
from pipelines.errors import DataError

__all__ = ["make_dataset", "Dataset", "SHAPE_CLASSES"]

VALID_SPECS = "shapes, moving-shapes, a folder path, " + ", ".join(f"{k}:PATH" for k in TORCHVISION_SETS)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~"))


def absolute_spec(spec: str | None) -> str | None:
    """`spec` with its folder or file made absolute, for a run's sigma.json: `--resume`, `sigma eval` and
    `sigma eval-lm` then find the data from any working directory. Names (shapes, cifar10:...) stay as they are."""
    if spec is None or spec in ("shapes", "moving-shapes"):
        return spec
    kind, colon, rest = spec.partition(":")
    if colon and kind.lower() in TORCHVISION_SETS and rest and Path(rest).expanduser().exists():
        return f"{kind}:{Path(rest).expanduser().resolve()}"
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def make_dataset(spec: str, *, image_size: int = 32, frames: int = 1, split: str = "train", seed: int = 0) -> Dataset:
    """Build the data set named by `spec` (see the module docstring). Raises DataError on bad input.

    `seed` picks the stream of the procedural sets; finite sets ignore it here (their order comes from
    the seed passed to `indices_for_step`).
    """
    if not _is_int(image_size) or image_size < 8:
        raise DataError(f"image size must be an integer >= 8, got {image_size!r}")
    if not _is_int(frames) or frames < 1:
        raise DataError(f"frames must be an integer >= 1, got {frames!r}")
    image_size, frames = int(image_size), int(frames)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    spec = str(spec)

    if spec == "shapes":
        if frames > 1:
            raise DataError("shapes is an image data set; use moving-shapes for clips")
        return ShapesDataset(moving=False, image_size=image_size, frames=1, split=split, seed=seed)
    if spec == "moving-shapes":
        return ShapesDataset(moving=True, image_size=image_size, frames=frames, split=split, seed=seed)

    kind, colon, rest = spec.partition(":")
    if kind.lower() in TORCHVISION_SETS and (colon or not Path(spec).exists()):
        kind = kind.lower()
        if not rest:
            raise DataError(f"{kind} needs the folder it is stored in: {kind}:PATH")
        if frames > 1:
            raise DataError(f"{kind} is an image data set; frames must be 1")
        return torchvision_set(kind, rest, image_size=image_size, split=split)

    path = Path(spec).expanduser()
    # A bare word or an unknown "name:..." that is not on disk is a mistyped spec, not a missing folder.
    unknown_name = colon and re.fullmatch(r"[A-Za-z][\w-]+", kind)
    if not path.exists() and (not spec or unknown_name or not _looks_like_path(spec)):
        raise DataError(f"unknown data set {spec!r}; valid: {VALID_SPECS}")
    if frames == 1:
        return image_folder(path, image_size=image_size, split=split)
    return video_folder(path, image_size=image_size, frames=frames, split=split)
