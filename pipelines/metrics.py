"""Reconstruction metrics for media tensors [B, C, T, H, W] in [-1, 1]: PSNR and SSIM, one value per sample.

Both are computed on the [0, 1] scale (data range 1), the scale the published numbers use. Inputs are not
clamped here: callers clamp reconstructions to [-1, 1] first, as they would when saving them as pictures.
"""

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], at least float32 (half precision is too coarse for squared errors)."""
    x = x if x.dtype == torch.float64 else x.float()
    return (x + 1) / 2


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, peak 1 on the [0, 1] scale.

    x, y: [B, C, T, H, W] in [-1, 1]. Returns [B]; the MSE (over C, T, H, W) is clamped at 1e-10, so identical
    inputs give 100 dB instead of inf.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def gaussian_window(size: int, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """[size] normalised 1-D Gaussian; the 2-D SSIM window is its outer product (separable)."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), Gaussian window, data range 1 on the [0, 1] scale.

    x, y: [B, C, T, H, W] in [-1, 1]. Returns [B]: the SSIM map of every frame and channel ('valid' positions
    only, no padding) averaged over C, T, H, W. Frames smaller than the window use a window of
    min(window, H, W) rounded down to odd, with the same sigma.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    B, C, T, H, W = x.shape
    size = min(window, H, W)
    size -= 1 - size % 2  # odd, so the window has a centre pixel
    x, y = _unit(x), _unit(y)
    # every (sample, channel, frame) is an independent picture: one depthwise channel each, and the five local
    # statistics ride along as the batch, so a single grouped conv filters everything
    x = x.reshape(B * C * T, H, W)
    y = y.reshape(B * C * T, H, W)
    M = x.shape[0]
    g = gaussian_window(size, sigma, x.dtype, x.device)
    gh = g.view(1, 1, size, 1).expand(M, 1, size, 1)
    gw = g.view(1, 1, 1, size).expand(M, 1, 1, size)
    stats = torch.stack([x, y, x * x, y * y, x * y])  # [5, M, H, W]
    # separable Gaussian filter, 'valid' padding: [5, M, H, W] -> [5, M, H-size+1, W-size+1]
    stats = F.conv2d(F.conv2d(stats, gh, groups=M), gw, groups=M)
    mx, my, mxx, myy, mxy = stats
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = k1**2, k2**2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.reshape(B, -1).mean(1)  # [M] is (B, C, T)-major, so this averages over C, T, H, W


# ---- generative metrics ------------------------------------------------------------------------------------
def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, F] and b [M, F]:
    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), in float64. The matrix square root goes
    through symmetric eigen-decompositions (stable, no complex parts): tr((C_a C_b)^1/2) equals the sum of
    square roots of the eigenvalues of the symmetric C_a^1/2 C_b C_a^1/2."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs [N, F] and [M, F] with N, M >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double().cpu(), b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    fd = float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)
    return max(fd, 0.0)  # a squared distance: below 0 only by rounding (printed as -0.000 otherwise)


def class_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of equal labels; pred and target: int [N] (e.g. per-frame predictions and repeated labels)."""
    if pred.shape != target.shape or pred.numel() == 0:
        raise ValueError(f"class_accuracy needs equal, non-empty shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return float((pred.cpu() == target.cpu()).float().mean())


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [num_classes, num_classes]: row = the class asked for (target), column = the class predicted."""
    if pred.shape != target.shape or pred.numel() == 0:
        raise ValueError(f"confusion_matrix needs equal, non-empty shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    index = target.cpu().long() * num_classes + pred.cpu().long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)
