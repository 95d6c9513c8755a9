"""Procedural data: `shapes` (one coloured shape on a background) and `moving-shapes` (the same, in motion).

Every sample is a pure function of (seed, split, index): its random parameters come from a counter-based
integer hash, not from a stateful generator, so any index can be drawn alone, in any batch, on any rank.
Rendering is vectorised over the whole batch with signed distance functions (SDFs) on the pixel grid.

Determinism across batch compositions: per-pixel work uses only +, -, *, /, abs, min/max, sqrt and
comparisons (correctly rounded, so SIMD and scalar code paths agree bit for bit); trigonometry is per
sample, in float64, before rounding to float32.

A clip's frame 0 is exactly the `shapes` image of the same (seed, split, index): both share parameters.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.data.base import SPLITS, Dataset, as_index_tensor

SHAPE_CLASSES = ["circle", "square", "triangle", "ring", "cross", "star"]

# Parameter numbers in the hash (one uniform [0, 1) each per sample).
P_CLASS, P_BG, P_GRAD_ON, P_GRAD, P_GRAD_ANGLE, P_FG, P_SIZE, P_X, P_Y, P_ANGLE = 0, 1, 4, 5, 8, 9, 12, 13, 14, 15
P_DIR, P_SPEED, P_SPIN, P_SPIN_SIGN = 16, 17, 18, 19
N_PARAMS = 20

MIN_CONTRAST = 0.35  # mean |RGB difference| in [0, 1] units between the shape and every background pixel
GRADIENT = 0.2  # a gradient moves each background channel by at most this much across the image

_M32 = np.uint64(0xFFFFFFFF)


def _mix32(x: np.ndarray) -> np.ndarray:
    """A bijective 32-bit integer hash (xor-shift / multiply rounds), elementwise on uint64 arrays.

    Values stay below 2**32 between rounds, so the products never overflow 64 bits.
    """
    x = np.asarray(x, dtype=np.uint64) & _M32
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


def hash_uniforms(seed: int, split: str, indices: np.ndarray, n_params: int) -> np.ndarray:
    """Counter-based uniforms: float64 [B, n_params] in [0, 1), entry (b, k) a pure function of
    (seed, split, indices[b], k). Each value has 24 random bits, so it is exact in float32 too."""
    s = seed % 2**64
    key = _mix32(np.uint64(s & 0xFFFFFFFF) ^ np.uint64(0x9E3779B9))
    key = _mix32(key ^ np.uint64(s >> 32))
    key = _mix32(key + np.uint64(SPLITS.index(split) + 1))  # the split enters here: held-out is another stream
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    h = _mix32(key ^ (idx & _M32))
    h = _mix32(h ^ (idx >> np.uint64(32)))  # [B]
    k = _mix32(np.arange(n_params, dtype=np.uint64) + np.uint64(0x632BE5AB))  # [K]
    u = _mix32(_mix32(h[:, None] + k[None, :]))  # [B, K]
    return (u >> np.uint64(8)).astype(np.float64) / 2.0**24


def _shape_colour(fg: np.ndarray, bg0: np.ndarray, bg1: np.ndarray) -> np.ndarray:
    """Pick a shape colour [B, 3] near the random candidate `fg` with enough contrast to the background.

    The background runs linearly from bg0 to bg1, so every background colour c satisfies
    mean|s - c| >= mean|s - mid| - mean|bg1 - bg0| / 2; asking that bound for MIN_CONTRAST guarantees it
    everywhere. If the candidate fails, slide it towards the per-channel extreme furthest from the
    background (which always passes: it is >= 0.5 away in every channel) and keep the first step that passes.
    """
    mid = (bg0 + bg1) / 2
    need = MIN_CONTRAST + np.abs(bg1 - bg0).mean(1) / 2  # [B]
    far = (mid < 0.5).astype(np.float64)  # [B, 3]
    out = far.copy()
    done = np.zeros(len(fg), dtype=bool)
    for t in (0.0, 0.25, 0.5, 0.75):
        s = fg + t * (far - fg)
        ok = ~done & (np.abs(s - mid).mean(1) >= need)
        out[ok] = s[ok]
        done |= ok
    return out


def _clip_params(u: np.ndarray, size: int, frames: int) -> dict[str, np.ndarray]:
    """Per-sample and per-frame parameters (float64 numpy) from hash uniforms u: [B, N_PARAMS].

    Positions are pixel coordinates (pixel centres at i + 0.5). The shape's circumradius R is 0.2-0.4
    of the image side and its centre stays in [R, size - R], so the shape is always fully inside; motion
    bounces off those limits (a triangle wave), rotation is uniform. Frame t uses only (u, t).
    """
    cls = np.minimum((u[:, P_CLASS] * len(SHAPE_CLASSES)).astype(np.int64), len(SHAPE_CLASSES) - 1)
    bg0 = u[:, P_BG : P_BG + 3]
    grad_on = (u[:, P_GRAD_ON] < 0.5)[:, None]  # half of the backgrounds are flat
    bg1 = np.clip(bg0 + grad_on * GRADIENT * (2 * u[:, P_GRAD : P_GRAD + 3] - 1), 0.0, 1.0)
    fg = _shape_colour(u[:, P_FG : P_FG + 3], bg0, bg1)
    radius = size * (0.2 + 0.2 * u[:, P_SIZE])

    t = np.arange(frames, dtype=np.float64)[None, :]  # [1, T]
    speed = size * (0.02 + 0.04 * u[:, P_SPEED])  # pixels per frame
    direction = 2 * math.pi * u[:, P_DIR]
    spin = (0.05 + 0.15 * u[:, P_SPIN]) * np.where(u[:, P_SPIN_SIGN] < 0.5, -1.0, 1.0)  # radians per frame

    def bounce(start01: np.ndarray, velocity: np.ndarray) -> np.ndarray:
        lo, span = radius[:, None], (size - 2 * radius)[:, None]  # span >= 0.2 * size > 0
        travelled = np.mod(start01[:, None] * span + velocity[:, None] * t, 2 * span)  # [B, T]
        return lo + span - np.abs(travelled - span)  # reflect at both walls

    angle = 2 * math.pi * u[:, P_ANGLE][:, None] + spin[:, None] * t  # [B, T]
    return dict(
        cls=cls, bg0=bg0, bg1=bg1, fg=fg, radius=radius,
        cx=bounce(u[:, P_X], speed * np.cos(direction)), cy=bounce(u[:, P_Y], speed * np.sin(direction)),
        cos=np.cos(angle), sin=np.sin(angle), grad_angle=2 * math.pi * u[:, P_GRAD_ANGLE],
    )


# ---- signed distance functions: q = pixel offsets in the shape's frame [M, H, W], r = circumradius [M, 1, 1]
# Negative inside; in pixels, so coverage = clamp(0.5 - sdf, 0, 1) anti-aliases a one-pixel edge.


def _length(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y)


def _sdf_circle(qx, qy, r):
    return _length(qx, qy) - 0.85 * r


def _sdf_ring(qx, qy, r):
    return (_length(qx, qy) - 0.72 * r).abs() - 0.26 * r  # outer radius 0.98 r, hole radius 0.46 r


def _sdf_box(qx, qy, half_x, half_y):
    dx, dy = qx.abs() - half_x, qy.abs() - half_y
    outside = _length(dx.clamp(min=0), dy.clamp(min=0))
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _sdf_cross(qx, qy, r):
    arm, width = 0.95 * r, 0.3 * r
    return torch.minimum(_sdf_box(qx, qy, arm, width), _sdf_box(qx, qy, width, arm))


def _sdf_star_polygon(qx, qy, r, points: int, inner: float):
    """A regular `points`-fold star: tips at radius r (angles 2 pi k / points), inner corners at radius
    inner * r halfway between. inner = cos(pi / points) gives the regular convex polygon.

    Fold the plane into one wedge [0, pi / points] by symmetry (no atan2: rotate by each 2 pi k / points,
    keep the rotation that lands nearest the tip axis, mirror y), then measure the distance to the one
    edge segment tip -> inner corner; the sign says which side of that edge the point lies on.
    """
    best_x = torch.full_like(qx, -math.inf)
    best_y = torch.zeros_like(qy)
    for k in range(points):
        c, s = math.cos(2 * math.pi * k / points), math.sin(2 * math.pi * k / points)
        x = qx * c + qy * s
        better = x > best_x
        best_x = torch.where(better, x, best_x)
        best_y = torch.where(better, qy * c - qx * s, best_y)
    half = math.pi / points
    ex, ey = (inner * math.cos(half) - 1) * r, inner * math.sin(half) * r  # edge vector tip -> inner corner
    wx, wy = best_x - r, best_y.abs()  # from the tip
    h = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    dist = _length(wx - ex * h, wy - ey * h)
    inside = ex * wy - ey * wx > 0  # same side as the centre
    return torch.where(inside, -dist, dist)


_SDFS = [
    _sdf_circle,
    lambda qx, qy, r: _sdf_star_polygon(qx, qy, r, 4, math.cos(math.pi / 4)),  # square
    lambda qx, qy, r: _sdf_star_polygon(qx, qy, r, 3, math.cos(math.pi / 3)),  # triangle
    _sdf_ring,
    _sdf_cross,
    lambda qx, qy, r: _sdf_star_polygon(qx, qy, r, 5, 0.48),  # star
]


def render(params: dict[str, np.ndarray], size: int) -> torch.Tensor:
    """Draw clips from `_clip_params`: float32 [B, 3, T, H, W] in [-1, 1]."""
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    B, T = params["cx"].shape
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    xs, ys = grid.view(1, 1, size), grid.view(1, size, 1)

    # Coverage of each frame, [B*T, H, W]; one pass per class over only that class's frames.
    cls = torch.from_numpy(params["cls"]).repeat_interleave(T)
    radius = f32(params["radius"]).repeat_interleave(T).view(-1, 1, 1)
    cx, cy = f32(params["cx"]).view(-1, 1, 1), f32(params["cy"]).view(-1, 1, 1)
    cos, sin = f32(params["cos"]).view(-1, 1, 1), f32(params["sin"]).view(-1, 1, 1)
    sdf = torch.empty(B * T, size, size)
    for k, fn in enumerate(_SDFS):
        idx = (cls == k).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        px, py = xs - cx[idx], ys - cy[idx]  # [M, H, W]
        c, s = cos[idx], sin[idx]
        sdf[idx] = fn(px * c + py * s, py * c - px * s, radius[idx])  # rotate the grid by -angle
    cover = (0.5 - sdf).clamp(0, 1).view(B, 1, T, size, size)

    # Static background: a flat colour, or a gentle linear ramp bg0 -> bg1 along a random direction.
    gc, gs = f32(np.cos(params["grad_angle"])).view(B, 1, 1), f32(np.sin(params["grad_angle"])).view(B, 1, 1)
    ramp = (0.5 + ((xs - size / 2) * gc + (ys - size / 2) * gs) / size).clamp(0, 1)  # [B, H, W]
    bg0, bg1 = f32(params["bg0"]).view(B, 3, 1, 1), f32(params["bg1"]).view(B, 3, 1, 1)
    bg = (bg0 + (bg1 - bg0) * ramp[:, None]).unsqueeze(2)  # [B, 3, 1, H, W]
    fg = f32(params["fg"]).view(B, 3, 1, 1, 1)
    img = bg + cover * (fg - bg)  # [B, 3, T, H, W]
    return img * 2 - 1


class ShapesDataset(Dataset):
    """`shapes` (frames == 1, images) or `moving-shapes` (clips of `frames` frames): 6 classes
    (SHAPE_CLASSES), an endless stream; sample i is a pure function of (seed, split, i)."""

    def __init__(self, *, moving: bool, image_size: int = 32, frames: int = 1, split: str = "train", seed: int = 0):
        self.name = "moving-shapes" if moving else "shapes"
        self.class_names = list(SHAPE_CLASSES)
        self.channels, self.frames, self.image_size = 3, frames, image_size
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return 2**31 - 1

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: int64 [B] -> (x: float32 [B, 3, T, H, W] in [-1, 1], y: int64 [B])."""
        idx = as_index_tensor(indices).numpy()
        params = _clip_params(hash_uniforms(self.seed, self.split, idx, N_PARAMS), self.image_size, self.frames)
        return render(params, self.image_size), torch.from_numpy(params["cls"])

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        idx = as_index_tensor(indices).numpy()
        return torch.from_numpy(_clip_params(hash_uniforms(self.seed, self.split, idx, N_PARAMS), self.image_size, self.frames)["cls"])

    def indices_for_step(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """arange(step * B, (step + 1) * B): every step sees fresh samples. `seed` is unused here (the
        data set's own seed, given at construction, already picks the stream)."""
        return torch.arange(step * batch_size, (step + 1) * batch_size, dtype=torch.int64)
