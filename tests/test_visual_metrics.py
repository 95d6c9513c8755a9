"""Metrics (PSNR, SSIM), HOG targets and the picture writers."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.maetok.hog import hog_features
from pipelines.metrics import psnr, ssim
from pipelines.visual import make_grid, save_individual, save_media, side_by_side, to_uint8


def rand_media(b=2, c=3, t=1, h=16, w=16, dtype=torch.float32):
    return torch.rand(b, c, t, h, w, dtype=dtype) * 2 - 1


# ---------------------------------------------------------------- metrics


def test_identical_inputs_are_perfect():
    x = rand_media(t=2)
    assert (psnr(x, x) >= 90).all()
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 1, 8, 8)
    y = x.clone()
    y[0] += 0.2  # 0.1 on the [0, 1] scale everywhere -> MSE 0.01 -> 20 dB
    y[1, :, :, :4] -= 0.4  # 0.2 on half the pixels -> MSE 0.02
    expected = torch.tensor([20.0, -10 * math.log10(0.02)])
    assert torch.allclose(psnr(y, x), expected, atol=1e-4)


def test_ssim_decreases_with_noise():
    x = rand_media(b=1, h=32, w=32).clamp(-1, 1)
    scores = [ssim((x + s * torch.randn_like(x)).clamp(-1, 1), x).item() for s in (0.05, 0.2, 0.5)]
    assert 1 > scores[0] > scores[1] > scores[2]


def reference_ssim(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5) -> float:
    """Plain loops over one [H, W] picture pair on the [0, 1] scale, full 2-D Gaussian window, valid positions."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    H, W = x.shape
    values = []
    for i in range(H - size + 1):
        for j in range(W - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            ma, mb = (win * a).sum(), (win * b).sum()
            va, vb = (win * (a - ma) ** 2).sum(), (win * (b - mb) ** 2).sum()
            cov = (win * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("h,w,size", [(16, 16, 11), (8, 10, 7)])
def test_ssim_matches_reference(h, w, size):
    x = rand_media(b=2, t=2, h=h, w=w, dtype=torch.float64)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    got = ssim(x, y)
    x01, y01 = ((x + 1) / 2).numpy(), ((y + 1) / 2).numpy()
    for b in range(2):
        ref = np.mean([reference_ssim(x01[b, c, t], y01[b, c, t], size) for c in range(3) for t in range(2)])
        assert abs(got[b].item() - ref) < 1e-5


# ---------------------------------------------------------------- HOG


def test_hog_shape_and_order():
    x = rand_media(b=2, t=4, h=16, w=24)
    f = hog_features(x, patch=8, tubelet=2)
    assert f.shape == (2, 2 * 2 * 3, 2 * 3 * 4 * 9)
    assert torch.allclose(f.norm(dim=-1), torch.ones(2, 12), atol=1e-5)
    # a picture that is flat except one patch: only that token (t'=1, h'=1, w'=2 -> 1*6 + 1*3 + 2) is non-zero
    x = torch.zeros(1, 3, 4, 16, 24)
    x[:, :, 3, 9:15, 17:23] = torch.rand(3, 6, 6)  # one pixel inside: central differences reach one pixel out
    nonzero = hog_features(x, patch=8, tubelet=2).norm(dim=-1)[0] > 0
    assert nonzero.nonzero().flatten().tolist() == [11]


def test_hog_needs_even_patch():
    with pytest.raises(ValueError):
        hog_features(rand_media(h=15, w=15), patch=5)


def test_hog_vertical_edge_is_orientation_zero():
    x = -torch.ones(1, 3, 1, 16, 16)
    x[..., 8:] = 1  # vertical step edge: the gradient points along W
    f = hog_features(x, patch=8).reshape(1, 4, 3, 4, 9)  # [B, N, C, cells, bins]
    per_bin = f.sum(dim=(0, 1, 2, 3))
    assert per_bin[0] > 0
    assert torch.allclose(per_bin[1:], torch.zeros(8))


def test_hog_constant_is_zero():
    f = hog_features(torch.full((2, 3, 2, 8, 8), 0.3), patch=4, tubelet=2)
    assert not f.isnan().any() and (f == 0).all()


def test_hog_rotation_shifts_bins():
    # a smooth random picture, so that gradients are not dominated by pixel noise
    x = torch.nn.functional.interpolate(rand_media(b=1, h=4, w=4)[:, :, 0], size=(32, 32), mode="bicubic")[:, :, None]
    rotated = torch.rot90(x, 1, dims=(-2, -1))
    # even bin count: a quarter turn is exactly bins/2 bins (patches and cells are permuted, norms are kept)
    hist = hog_features(x, 8, bins=8).reshape(-1, 8).sum(0)
    hist_rot = hog_features(rotated, 8, bins=8).reshape(-1, 8).sum(0)
    assert torch.allclose(hist_rot, hist.roll(4), atol=1e-4)
    # 9 bins: the dominant orientation (circular mean on the doubled angle) turns by pi/2
    def mean_angle(h):
        ang = torch.arange(9) * (2 * math.pi / 9)
        return torch.atan2((h * ang.sin()).sum(), (h * ang.cos()).sum())
    h9 = hog_features(x, 8).reshape(-1, 9).sum(0)
    h9_rot = hog_features(rotated, 8).reshape(-1, 9).sum(0)
    turn = torch.remainder(mean_angle(h9_rot) - mean_angle(h9), 2 * math.pi)
    assert abs(turn.item() - math.pi) < 0.1  # doubled angle: pi/2 -> pi


# ---------------------------------------------------------------- pictures


def test_png_round_trip(tmp_path):
    values = torch.tensor([0, 64, 128, 255], dtype=torch.float32)
    x = (values / 127.5 - 1).reshape(1, 1, 1, 2, 2).expand(2, 3, 1, 2, 2).clone()
    x[1, 0] = 1.0  # red channel of the second sample saturated
    out = save_media(x, tmp_path / "sub" / "grid.png", nrow=2)
    assert out == tmp_path / "sub" / "grid.png" and out.exists()
    img = np.asarray(Image.open(out).convert("RGB"))
    pad = 2
    assert img.shape == (pad + 2 + pad, pad + 2 * (2 + pad), 3)
    first = img[pad:pad + 2, pad:pad + 2]
    second = img[pad:pad + 2, 2 * pad + 2:2 * pad + 4]
    expected = values.to(torch.uint8).numpy().reshape(2, 2)
    assert (first == expected[..., None]).all()
    assert (second[..., 0] == 255).all() and (second[..., 1] == expected).all()
    assert (img[0] == img[0, 0]).all()  # border is the padding colour
    assert not list(out.parent.glob("*.tmp"))  # no temporary file left behind


def test_gif_frames_and_suffix(tmp_path):
    x = rand_media(b=3, t=5, h=8, w=8)
    out = save_media(x, tmp_path / "clip.png", fps=10)
    assert out == tmp_path / "clip.gif" and out.exists() and not (tmp_path / "clip.png").exists()
    with Image.open(out) as im:
        assert im.n_frames == 5
        assert im.info["duration"] == 100 and im.info["loop"] == 0
        assert im.size == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2)
    # and the other way round: a single frame asked for as '.gif' becomes a PNG
    assert save_media(rand_media(t=1), tmp_path / "img.gif") == tmp_path / "img.png"


def test_make_grid_layout():
    x = rand_media(b=5, t=2, h=4, w=6)
    grid = make_grid(x, nrow=3, pad=1)
    assert grid.shape == (2, 2 * 5 + 1, 3 * 7 + 1, 3) and grid.dtype == np.uint8
    u = to_uint8(x)
    assert (grid[:, 1 + 5:1 + 5 + 4, 1 + 7:1 + 7 + 6] == u[4]).all()  # sample 4: row 1, column 1
    assert make_grid(x).shape[2] == 3 * (6 + 2) + 2  # default nrow = ceil(sqrt(5)) = 3


def test_side_by_side_order():
    a, b = torch.zeros(3, 3, 1, 2, 2), torch.ones(3, 3, 1, 2, 2)
    a[:, 0, 0, 0, 0] = torch.arange(3.0)
    b[:, 0, 0, 0, 0] = torch.arange(3.0) + 10
    s = side_by_side(a, b)
    assert s.shape == (6, 3, 1, 2, 2)
    assert s[:, 0, 0, 0, 0].tolist() == [0, 10, 1, 11, 2, 12]


def test_save_individual(tmp_path):
    paths = save_individual(rand_media(b=2, t=3, h=8, w=8), tmp_path / "clips")
    assert [p.name for p in paths] == ["sample_0000.gif", "sample_0001.gif"]
    with Image.open(paths[1]) as im:
        assert im.size == (8, 8) and im.n_frames == 3
    paths = save_individual(rand_media(b=1), tmp_path, prefix="img")
    assert paths == [tmp_path / "img_0000.png"]
