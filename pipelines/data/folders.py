"""Data on disk: an image folder, a video folder, or a torchvision data set (never downloaded).

All three decode everything once at construction into an in-memory uint8 cache [N, C, T, H, W]
(C = 3, or 1 for grayscale torchvision sets, expanded to RGB per batch), so `get_batch` is a gather.

Folder layout and splits:
- Hidden files and folders (names starting with ".", e.g. macOS "._x.png") are ignored, and so are sigma's own run
  and model folders below the root (a `sigma.json`, `model_index.json` or `metrics.jsonl` in them): `--data . --out runs/x` run from
  inside the data folder must not read its sample grids back as pictures of a class "runs".
- Class of an item = the first-level sub-folder it lies under; items directly in the root are class "all".
  So a folder with no sub-folders has the one class ["all"]; class names are sorted.
- Held-out split: the items, sorted by relative path; with N >= 10 items every 10th (i % 10 == 9) is
  held out and left out of training. With N < 10 there is nothing to spare: both splits use all items.
  The held-out split comes in a fixed shuffled order (a fair sample of every class in any prefix of it).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from checkpoints.meta import PIPELINE_INDEX, RUN_LOG, RUN_META
from pipelines.data.base import Dataset, as_index_tensor
from pipelines.errors import DataError, say

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


class CachedDataset(Dataset):
    """A finite data set held in memory: data uint8 [N, C, T, H, W] (C = 1 or 3), labels int64 [N]."""

    def __init__(self, name: str, data: torch.Tensor, labels: torch.Tensor, class_names: list[str], split: str):
        self.name, self.data, self.labels, self.class_names, self.split = name, data, labels, class_names, split
        self.channels, self.frames, self.image_size = 3, data.shape[2], data.shape[-1]

    def __len__(self) -> int:
        return len(self.data)

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return self.labels[as_index_tensor(indices)]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: int64 [B] -> (x: float32 [B, 3, T, H, W] in [-1, 1], y: int64 [B])."""
        idx = as_index_tensor(indices)
        x = self.data[idx].float() / 127.5 - 1  # 0 -> -1, 255 -> 1 exactly
        return x.expand(-1, 3, -1, -1, -1).contiguous(), self.labels[idx]


# ---- decoding one picture ---------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency (alpha, a palette's, a colour key) is composited on white;
    16-bit gray is scaled, not clipped ("I"/"F" modes are read as 16-bit when any value exceeds 255, "F" in
    [0, 1] as floats of that range, else as 8-bit; the range from the finite values: NaN and -inf are 0, +inf
    the largest value)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        key = img.info.get("transparency")  # a 16-bit gray PNG's colour key (tRNS), in the picture's own values
        clear = a == key if isinstance(key, int) else None
        top = a[np.isfinite(a)].max(initial=0)
        a = np.nan_to_num(a, nan=0.0, posinf=top, neginf=0.0)
        if img.mode.startswith("I;16") or top > 255:
            a = a / 257.0
        elif img.mode == "F" and top <= 1.0:  # float pictures in [0, 1] (e.g. 32-bit TIFFs)
            a = a * 255.0
        if clear is not None:
            a[clear] = 255.0
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:  # (P, and L/RGB colour keys)
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def _square(img: Image.Image, size: int) -> np.ndarray:
    """RGB picture -> uint8 [size, size, 3]: short side resized to `size` (bicubic, antialiased when
    shrinking), then the centre cropped."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _open(path: Path) -> Image.Image:
    """Image.open of a regular file only: reading a FIFO or device named like a picture would wait forever."""
    if not os.path.isfile(path):  # (follows links: a dangling one fails here too)
        raise OSError(f"'{path}' is not a regular file")
    return Image.open(path)


def load_image(path: Path, size: int) -> np.ndarray:
    """One still picture (a GIF's first frame) -> uint8 [size, size, 3]. Raises on unreadable files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open(path) as img:
            img.draft(None, (size, size))  # JPEG: decode at a reduced scale when the picture is much larger
            img.load()
            try:
                img = ImageOps.exif_transpose(img)  # photos taken sideways
            except Exception:  # a broken EXIF block should not cost us the picture
                pass
            return _square(_to_rgb(img), size)


def load_gif_frames(path: Path, size: int, frames: int) -> np.ndarray | None:
    """The first `frames` frames of an animated GIF, WebP or PNG -> uint8 [frames, size, size, 3]; None if it has fewer."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open(path) as img:
            if getattr(img, "n_frames", 1) < frames:
                return None
            out = []
            for t in range(frames):
                img.seek(t)
                out.append(_square(_to_rgb(img), size))
            return np.stack(out)


# ---- scanning folders ---------------------------------------------------------------------------------


def _natural_key(name: str) -> list:
    """Sort "f2.png" before "f10.png" (numbers compare as numbers)."""
    return [int(p) if p.isdecimal() else p for p in re.split(r"(\d+)", name)]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_run_folder(path: str) -> bool:
    """A folder sigma wrote (a training run, a snapshot, a saved pipeline): its pictures are outputs, not data. The
    log counts too: sigma.json comes with the first checkpoint, and a run that draws samples before it (--sample-every
    below --save-every) and stops, or is still running, holds pictures and the log only."""
    return any(os.path.isfile(os.path.join(path, name)) for name in (RUN_META, PIPELINE_INDEX, RUN_LOG))


def _listed(root: Path) -> set[str]:
    """Real paths of what a walk that follows no link lists under its own name: non-hidden folders and pictures."""
    listed = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not _is_run_folder(os.path.join(dirpath, d))]
        listed.add(os.path.realpath(dirpath))
        listed.update(os.path.realpath(p) for f in filenames if _is_image(f)
                      for p in [os.path.join(dirpath, f)] if not os.path.islink(p))
    return listed


def _walk(root: Path, files_once: bool = True):
    """os.walk over non-hidden folders in sorted order, following links. A link to a folder or picture that the
    walk lists under its own name anyway is an alias and is skipped: a class keeps its own folder's name and no
    picture lands in two classes or both splits. Links elsewhere (outside the data folder, into hidden folders
    such as git-annex's, to files without a picture's extension such as a download cache's blobs) are followed,
    and every folder is walked once (link loops end). sigma's run folders below the root are not walked (one note).
    `files_once`: also list every real file once (image folders; a video's frame folder may repeat a frame through
    a link, and keeps it)."""
    listed = _listed(root)
    alias = lambda p: os.path.islink(p) and os.path.exists(p) and os.path.realpath(p) in listed  # noqa: E731
    seen_dirs, seen_files, runs = set(), set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        run_dirs = {d for d in dirnames if not d.startswith(".") and _is_run_folder(os.path.join(dirpath, d))}
        runs += [os.path.relpath(os.path.join(dirpath, d), root) for d in run_dirs]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in run_dirs
                             and not alias(os.path.join(dirpath, d)))
        names = []
        for f in sorted(filenames, key=_natural_key):
            path = os.path.join(dirpath, f)
            if files_once and _is_image(f):  # (a blob without a picture's name is not listed, so not seen either)
                real_file = os.path.realpath(path)
                if alias(path) or real_file in seen_files:
                    continue
                seen_files.add(real_file)
            names.append(f)
        yield Path(dirpath), names
    if runs:  # (once: the training and held-out splits walk the folder separately)
        runs.sort()
        shown = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
        say(f"note: skipped {len(runs)} sigma run folder{'s' if len(runs) > 1 else ''} inside {root} ({shown}): "
            "their pictures are outputs, not data", once=True)


def _animated(path: Path) -> bool:
    """An animated WebP or PNG (APNG): in a video folder a clip of its own, as a GIF is, not a frame of its folder's
    clip. (Opens the file's header; an unreadable one is not animated.)"""
    if os.path.splitext(path)[1].lower() not in (".webp", ".png"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (the loader refuses it later, counted)
            with _open(path) as img:
                return bool(getattr(img, "is_animated", False))
    except Exception:
        return False


def _check_folder(root: Path) -> Path:
    if not root.exists():
        raise DataError(f"data folder '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"data path '{root}' is a file, not a folder")
    return root.resolve()


def _class_of(rel: Path) -> str:
    """First-level sub-folder of an item's path relative to the root; "all" for items in the root."""
    return rel.parts[0] if len(rel.parts) > 1 else "all"


def _class_names(rels: list[Path], root: Path, what: str) -> list[str]:
    """Sorted class names of items at these relative paths. Items directly in the root are class "all": a sub-folder
    of that name too would merge with them silently (an error), and beside sub-folder classes they get a note."""
    loose = sum(len(rel.parts) <= 1 for rel in rels)
    names = sorted({_class_of(rel) for rel in rels})
    if loose and any(len(rel.parts) > 1 and rel.parts[0] == "all" for rel in rels):
        raise DataError(f"'{root}' holds {what} directly, which form class 'all', and a sub-folder 'all' whose {what} "
                        "would merge with them: rename that sub-folder, or move the loose ones into a sub-folder")
    if loose and len(names) > 1:
        items = f"{what.rstrip('s')} directly in {root} forms" if loose == 1 else f"{what} directly in {root} form"
        say(f"note: {loose} {items} a class 'all' beside its sub-folders' classes", once=True)
    return names


def _split(items: list, split: str) -> list:
    """Every 10th item is held out when there are at least 10; otherwise both splits use all of them (`_note_small`).
    The held-out items come in a fixed shuffled order: sorted by path they run class by class, and the first n of
    them (eval's two FD reference sets, the classifier's held-out accuracy, reconstruct) must be a fair sample of
    every class, not the first classes alone."""
    if len(items) >= 10:
        keep = (lambda i: i % 10 == 9) if split == "heldout" else (lambda i: i % 10 != 9)
        items = [item for i, item in enumerate(items) if keep(i)]
    if split == "heldout":
        items = [items[i] for i in torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()]
    return items


def _note_small(count: int, what: str, root: Path) -> None:
    if count < 10:
        # once: the training and held-out splits load the folder separately
        what = what.rstrip("s") if count == 1 else what  # "1 clip", "1 image"
        say(f"note: only {count} {what} in {root}: fewer than 10, so the held-out split is the training data", once=True)


def _warn_skipped(skipped: int, what: str, root: Path, split: str, count: int) -> None:
    """One line per split; a folder of fewer than 10 items has one split in effect, so one line in all. `what` holds
    {s} where a plural takes an s."""
    if skipped:
        what = what.format(s="" if skipped == 1 else "s")
        say(f"warning: skipped {skipped} {what} in {root}" + (f" ({split} split)" if count >= 10 else ""), once=True)


def _warn_empty_classes(labels: list[int], class_names: list[str], what: str, root: Path, split: str,
                        lost: str = "unreadable") -> None:
    """A class (a sub-folder with pictures) of which the training split holds nothing readable: its files are all
    unreadable, or its only ones are held out. The class keeps its label (both splits must agree), but a model
    learns nothing for it, which is worth a line rather than silence."""
    if split != "train":
        return
    present = set(labels)
    empty = [name for i, name in enumerate(class_names) if i not in present]
    if empty:
        names = ", ".join(f"'{n}'" for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        many = len(empty) > 1
        say(f"warning: class{'es' if many else ''} {names} of {root} {'have' if many else 'has'} no readable {what} in "
            f"the training split ({lost}, or all held out: every 10th, sorted); a class-conditional model or "
            f"classifier learns nothing for {'them' if many else 'it'}", once=True)


def _build(name, root, arrays, labels, class_names, split) -> CachedDataset:
    """arrays: list of uint8 [T, H, W, 3] -> the cache [N, 3, T, H, W]."""
    data = torch.from_numpy(np.stack(arrays)).permute(0, 4, 1, 2, 3).contiguous()
    ds = CachedDataset(name, data, torch.tensor(labels, dtype=torch.int64), class_names, split)
    ds.root = root
    return ds


def image_folder(path: str | Path, *, image_size: int, split: str) -> CachedDataset:
    """A folder of pictures (searched recursively): each file is one sample, T = 1.

    Also sets `.paths` (relative paths of the loaded files, in index order) for inspection.
    """
    root = _check_folder(Path(path).expanduser())
    files = [(d / f).relative_to(root) for d, names in _walk(root) for f in names if _is_image(f)]
    files.sort(key=lambda p: p.as_posix())
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in '{root}'")
    class_names = _class_names(files, root, "images")  # from all files, so both splits agree

    arrays, labels, paths, skipped = [], [], [], 0
    for rel in _split(files, split):
        try:
            arrays.append(load_image(root / rel, image_size)[None])
        except Exception:  # PIL raises many types for corrupt, truncated, bomb or exotic files
            skipped += 1
            continue
        labels.append(class_names.index(_class_of(rel)))
        paths.append(rel.as_posix())
    if not arrays:  # the error says it all: no separate warning
        raise DataError(f"no readable images in the {split} split of '{root}' (all {skipped} of its files are unreadable;"
                        " every 10th file, sorted, is held out)")
    _note_small(len(files), "images", root)
    _warn_skipped(skipped, "unreadable file{s} (corrupt, or over Pillow's decompression-bomb size limit)", root, split, len(files))
    _warn_empty_classes(labels, class_names, "images", root, split)
    ds = _build(f"folder:{root}", root, arrays, labels, class_names, split)
    ds.paths = paths
    return ds


def video_folder(path: str | Path, *, image_size: int, frames: int, split: str) -> CachedDataset:
    """A folder of clips, searched recursively. A clip is either
    - a folder that directly holds still pictures (not GIFs): its frames, in natural name order
      ("f2" before "f10"); the root itself counts if it holds pictures; or
    - a GIF file, or an animated WebP or PNG (APNG), anywhere: its frames.
    The first `frames` frames are kept; shorter or unreadable clips are skipped (one warning line).
    Class = the first-level sub-folder holding the clip (e.g. "walk/clip1/", "walk/a.gif" -> "walk");
    clips at the first level ("clip1/", "a.gif") are class "all".

    Also sets `.paths` (relative paths of the loaded clips, in index order).
    """
    root = _check_folder(Path(path).expanduser())
    clips = []  # (relative path, list of frame files or None for an animation file)
    for d, names in _walk(root, files_once=False):
        pictures = [f for f in names if _is_image(f)]
        moving = {f for f in pictures if f.lower().endswith(".gif") or _animated(d / f)}
        stills = [d / f for f in pictures if f not in moving]
        if stills:
            clips.append((d.relative_to(root), stills))
        clips += [((d / f).relative_to(root), None) for f in pictures if f in moving]
    clips.sort(key=lambda c: c[0].as_posix())
    if not clips:
        raise DataError(f"no clips in '{root}' (a clip is a sub-folder of frame pictures, or a GIF or animated WebP/PNG)")
    class_names = _class_names([rel for rel, _ in clips], root, "clips")

    arrays, labels, paths, skipped = [], [], [], 0
    for rel, stills in _split(clips, split):
        try:
            if stills is None:
                clip = load_gif_frames(root / rel, image_size, frames)
            else:
                clip = np.stack([load_image(f, image_size) for f in stills[:frames]]) if len(stills) >= frames else None
        except Exception:  # any unreadable frame spoils the clip
            clip = None
        if clip is None:
            skipped += 1
            continue
        arrays.append(clip)
        labels.append(class_names.index(_class_of(rel)))
        paths.append(rel.as_posix())
    if not arrays:
        raise DataError(f"no readable clips of at least {frames} frames in '{root}' ({split} split)")
    _note_small(len(clips), "clips", root)
    _warn_skipped(skipped, f"unreadable or too-short clip{{s}} (fewer than {frames} frames)", root, split, len(clips))
    _warn_empty_classes(labels, class_names, "clips", root, split, f"unreadable or too short: fewer than {frames} frames")
    ds = _build(f"folder:{root}", root, arrays, labels, class_names, split)
    ds.paths = paths
    return ds


def torchvision_set(kind: str, path: str | Path, *, image_size: int, split: str) -> CachedDataset:
    """CIFAR-10/100, MNIST or Fashion-MNIST as torchvision stores them under `path` (download=False).

    split "train" -> the official training set, "heldout" -> the official test set. Pictures are resized
    to image_size (bicubic, antialiased) when their size differs; grayscale stays 1-channel in the cache.
    """
    import torchvision.datasets  # slow to import: only when asked for

    root = Path(path).expanduser()
    cls = getattr(torchvision.datasets, TORCHVISION_SETS[kind])
    try:
        tv = cls(root=str(root), train=split == "train", download=False)
    except Exception as e:  # missing files (torchvision's RuntimeError "... not found ..."), or corrupt ones
        if isinstance(e, RuntimeError) and "not found" in str(e).lower():  # (CIFAR: "not found or corrupted")
            also = " or corrupted" if "corrupt" in str(e).lower() else ""
            raise DataError(
                f"{kind} not found{also} under '{root}' (sigma never downloads; place torchvision's {cls.__name__} files there)"
            ) from None
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"{kind} under '{root}' could not be read: {first_line}") from None

    x = torch.as_tensor(np.asarray(tv.data))
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # [N, C, H, W]: MNIST is [N, H, W], CIFAR [N, H, W, 3]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = torch.cat([
            F.interpolate(part.float(), size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
            .round().clamp(0, 255).to(torch.uint8)
            for part in x.split(4096)  # bounded float memory
        ])
    labels = torch.as_tensor(np.asarray(tv.targets), dtype=torch.int64)
    return CachedDataset(kind, x[:, :, None].contiguous(), labels, list(tv.classes), split)
