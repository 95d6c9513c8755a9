"""Histogram-of-oriented-gradients targets for MAETok's auxiliary decoder, one feature vector per patch token.

Per frame and channel: central-difference gradients, unsigned orientation in [0, pi), each pixel's magnitude
split linearly between its two nearest orientation bins (bin k is centred on k*pi/bins, circularly), summed
over the 2x2 cells of every patch. Vectorised with scatter_add straight into the cell histograms, so no
[..., H, W, bins] tensor is ever built (that would be bins x the size of the video).
"""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def hog_features(x: torch.Tensor, patch: int, tubelet: int = 1, bins: int = 9) -> torch.Tensor:
    """HOG features per (tubelet, patch, patch) token. They are regression targets: no gradient flows back.

    x: [B, C, T, H, W] in [-1, 1] (any scale works: the features are L2-normalised).
    Returns [B, N, D] float32 with N = (T/tubelet) * (H/patch) * (W/patch) and D = tubelet * C * 4 * bins.

    Token order (grid_order): the tubelet grid (T/tubelet, H/patch, W/patch) flattened row-major, t slowest,
    w fastest -- the same order as `pipelines.nn.layers.patchify`. A model that orders tokens differently
    (e.g. cube-major) reorders these itself.
    Feature order within a token: [tubelet frame, channel, cell row, cell column, bin], flattened, then the whole
    token vector is L2-normalised (eps 1e-6, so flat patches give zeros, not NaN).
    """
    if patch < 2 or patch % 2:
        raise ValueError(f"HOG needs an even patch size (2x2 cells per patch), got {patch}")
    B, C, T, H, W = x.shape
    if T % tubelet or H % patch or W % patch:
        raise ValueError(f"media of size T={T}, H={H}, W={W} does not tile into tubelet {tubelet} x patch {patch}")
    cell = patch // 2
    x = x.float().reshape(B * C * T, 1, H, W)

    # central differences; replicate padding gives one-sided halves at the border instead of a fake edge
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")[:, 0]
    gx = (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]) / 2  # [M, H, W], along W
    gy = (p[:, 2:, 1:-1] - p[:, :-2, 1:-1]) / 2  # along H
    mag = torch.sqrt(gx * gx + gy * gy)
    theta = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned orientation in [0, pi)

    # linear assignment to the two nearest bin centres k*pi/bins, wrapping pi back onto bin 0
    pos = theta * (bins / math.pi)
    lo = pos.floor()
    w_hi = pos - lo
    lo = lo.long() % bins
    hi = (lo + 1) % bins

    # flat destination index (cell, bin) of every pixel within its picture
    Hc, Wc = H // cell, W // cell
    cell_h = torch.arange(H, device=x.device) // cell
    cell_w = torch.arange(W, device=x.device) // cell
    cell_idx = (cell_h[:, None] * Wc + cell_w[None, :]) * bins  # [H, W]
    M = x.shape[0]
    hist = torch.zeros(M, Hc * Wc * bins, device=x.device)
    hist.scatter_add_(1, (cell_idx + lo).reshape(M, -1), (mag * (1 - w_hi)).reshape(M, -1))
    hist.scatter_add_(1, (cell_idx + hi).reshape(M, -1), (mag * w_hi).reshape(M, -1))

    # [B, C, T', t, H', 2, W', 2, bins] -> [B, T', H', W', t, C, 2, 2, bins]
    hist = hist.reshape(B, C, T // tubelet, tubelet, H // patch, 2, W // patch, 2, bins)
    hist = hist.permute(0, 2, 4, 6, 3, 1, 5, 7, 8)
    feats = hist.reshape(B, (T // tubelet) * (H // patch) * (W // patch), tubelet * C * 4 * bins)
    return F.normalize(feats, dim=-1, eps=1e-6)
