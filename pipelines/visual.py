"""Pictures people look at: media tensors [B, C, T, H, W] in [-1, 1] -> PNG grids (images) or GIF grids (clips).

Files are written atomically (temporary file in the same folder, then os.replace), so a viewer or a crashed run
never leaves a half-written picture behind.
"""

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from checkpoints.io import new_file_mode

PAD_VALUE = 235  # light grey between tiles: visible against both black and white samples


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, T, H, W] float in [-1, 1] -> uint8 numpy [B, T, H, W, C] (values outside [-1, 1] are clamped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile B samples into one picture per frame.

    x: [B, C, T, H, W] in [-1, 1], C = 3 (C = 1 is shown as grey). nrow: samples per row, ceil(sqrt(B)) by
    default. Returns uint8 [T, Hg, Wg, 3] with Hg = rows * (H + pad) + pad, Wg = nrow * (W + pad) + pad; the
    padding (also around the border) and the empty slots of the last row are light grey.
    """
    img = to_uint8(x)  # [B, T, H, W, C]
    B, T, H, W, C = img.shape
    if C == 1:
        img = img.repeat(3, axis=-1)
    elif C != 3:
        raise ValueError(f"make_grid needs 1 or 3 channels, got {C}")
    nrow = max(1, min(nrow or math.ceil(math.sqrt(B)), B))
    rows = math.ceil(B / nrow)
    # fill the last row with blank tiles, pad every tile top/left, then lay the tiles out with one reshape
    blank = np.full((rows * nrow - B, T, H, W, 3), PAD_VALUE, np.uint8)
    tiles = np.concatenate([img, blank])
    tiles = np.pad(tiles, ((0, 0), (0, 0), (pad, 0), (pad, 0), (0, 0)), constant_values=PAD_VALUE)
    tiles = tiles.reshape(rows, nrow, T, H + pad, W + pad, 3).transpose(2, 0, 3, 1, 4, 5)
    grid = tiles.reshape(T, rows * (H + pad), nrow * (W + pad), 3)
    return np.pad(grid, ((0, 0), (0, pad), (0, pad), (0, 0)), constant_values=PAD_VALUE)  # bottom/right border


PICTURE_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def picture_path(path: str | os.PathLike, clips: bool) -> Path:
    """Where a picture is written: PNG for images, GIF for clips. .png and .gif swap to match what is drawn (one
    `--out samples.png` serves image and clip models); a name without a picture suffix gets the right one
    appended (`grid` -> grid.png, `run.v2` -> run.v2.png); an existing folder, or another picture format's suffix
    (x.jpg), raises ValueError with a one-line message (call it before the work, to fail early)."""
    suffix = ".gif" if clips else ".png"
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder; give a file name for the picture, e.g. '{path / ('samples' + suffix)}'")
    if path.suffix.lower() == suffix:
        return path
    if path.suffix.lower() in (".png", ".gif"):
        return path.with_suffix(suffix)
    if path.suffix.lower() in PICTURE_SUFFIXES:
        kind = "clips are written as animated GIF" if clips else "images are written as PNG"
        raise ValueError(f"'{path}': {kind}; name the file '{path.with_suffix(suffix)}'")
    return path.with_name(path.name + suffix)


def _write_frames(frames: np.ndarray, path: Path, fps: int) -> Path:
    """Write uint8 [T, H, W, 3] as PNG (T = 1) or looping GIF (T > 1) at `picture_path`; atomic."""
    suffix = ".png" if len(frames) == 1 else ".gif"
    path = picture_path(path, len(frames) > 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = [Image.fromarray(f) for f in frames]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if len(pictures) == 1:
                pictures[0].save(f, format="PNG")
            else:
                # Pillow merges identical consecutive frames (adding up their durations): playback is unchanged
                pictures[0].save(f, format="GIF", save_all=True, append_images=pictures[1:], loop=0,
                                 duration=max(1, round(1000 / fps)))
        os.chmod(tmp, new_file_mode())  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_media(x: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, fps: int = 8) -> Path:
    """Save a grid of x [B, C, T, H, W] in [-1, 1]: a PNG if T == 1, else an animated GIF (loops, 1000/fps ms a frame).

    The suffix of `path` is replaced when it does not match (clips asked for as '.png' become '.gif' and vice
    versa); parent folders are created. Returns the path actually written.
    """
    return _write_frames(make_grid(x, nrow), Path(path), fps)


def side_by_side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Interleave two batches so a grid shows pairs: [B, ...] + [B, ...] -> [2B, ...] ordered a0, b0, a1, b1, ...

    Typical use: a = originals, b = reconstructions. Give the grid an even nrow so that each pair stays on one row.
    """
    if a.shape != b.shape:
        raise ValueError(f"side_by_side needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.stack([a, b.to(a.dtype)], dim=1).flatten(0, 1)


def save_individual(x: torch.Tensor, folder: str | os.PathLike, prefix: str = "sample", fps: int = 8) -> list[Path]:
    """One file per sample of x [B, C, T, H, W]: folder/{prefix}_{i:04d}.png (T == 1) or .gif (T > 1), no padding."""
    frames = to_uint8(x)  # [B, T, H, W, C]
    if frames.shape[-1] == 1:
        frames = frames.repeat(3, axis=-1)
    suffix = ".png" if frames.shape[1] == 1 else ".gif"
    return [_write_frames(f, Path(folder) / f"{prefix}_{i:04d}{suffix}", fps) for i, f in enumerate(frames)]


# ---- benchmark plots (Pillow only: no plotting library is a dependency) -------------------------------------
PLOT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _panel(draw, box, series: dict, title: str, ylabel: str, hline: float | None = None):
    """One log-log panel in box (x0, y0, x1, y1): series name -> [(x, y), ...]."""
    x0, y0, x1, y1 = box
    # a series is [(x, y), ...] or (points, colour index, hollow markers)
    series = {k: (s if isinstance(s, tuple) else (s, i, False)) for i, (k, s) in enumerate(series.items())}
    pts = [p for s in series.values() for p in s[0] if p[1] and p[1] > 0]
    if not pts:
        return
    lx = [math.log10(p[0]) for p in pts]
    ly = [math.log10(p[1]) for p in pts] + ([math.log10(hline)] if hline else [])
    xa, xb = min(lx) - 0.05, max(lx) + 0.05
    ya, yb = math.floor(min(ly) * 2) / 2, math.ceil(max(ly) * 2) / 2 + 1e-9
    px = lambda v: x0 + (math.log10(v) - xa) / (xb - xa) * (x1 - x0)  # noqa: E731
    py = lambda v: y1 - (math.log10(v) - ya) / (yb - ya) * (y1 - y0)  # noqa: E731
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y0 - 22), title + (f" [{ylabel}]" if ylabel else ""), fill=(0, 0, 0))
    e = math.ceil(ya * 2) / 2
    while e <= yb:  # grid lines every half decade
        y = py(10**e)
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((x0 - 58, y - 6), f"{10**e:.3g}", fill=(80, 80, 80))
        e += 0.5
    for xv in sorted({p[0] for p in pts}):
        draw.text((px(xv) - 14, y1 + 6), f"{xv:,}", fill=(80, 80, 80))
    if hline:
        draw.line((x0, py(hline), x1, py(hline)), fill=(120, 120, 120), width=1)
    for i, (name, (s, c, hollow)) in enumerate(series.items()):
        colour = PLOT_COLOURS[c % len(PLOT_COLOURS)]
        xy = [(px(x), py(y)) for x, y in s if y and y > 0]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=1 if hollow else 2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), outline=colour, fill="white" if hollow else colour)
        draw.text((x0 + 8, y0 + 6 + 14 * i), name, fill=colour)


def save_plot(panels: list[dict], path: str | os.PathLike, xlabel: str = "tokens") -> Path:
    """A row of log-log line panels as a PNG. Each panel: {"title", "ylabel", "series": {name: [(x, y)] or
    ([(x, y)], colour index, hollow markers)}, optional "hline" (a reference level, e.g. speed-up 1)}."""
    from PIL import ImageDraw

    w, h, margin = 460, 340, 70
    img = Image.new("RGB", (len(panels) * (w + margin) + margin, h + 2 * margin), "white")
    draw = ImageDraw.Draw(img)
    for i, p in enumerate(panels):
        x0 = margin + i * (w + margin)
        _panel(draw, (x0, margin, x0 + w, margin + h - 40), p["series"], p["title"], p.get("ylabel", ""), p.get("hline"))
        draw.text((x0 + w // 2 - 20, margin + h - 14), xlabel, fill=(80, 80, 80))
    return _write_frames(np.asarray(img)[None], Path(path), fps=1)
