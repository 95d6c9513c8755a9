"""Tests for pipelines.data: procedural shapes, image and video folders, torchvision sets on disk."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data import SHAPE_CLASSES, Dataset, make_dataset
from pipelines.data import shapes as shapes_mod
from pipelines.errors import DataError

# ---- procedural shapes ---------------------------------------------------------------------------------


def test_shapes_deterministic_and_batch_independent():
    ds = make_dataset("shapes", seed=3)
    x, y = ds.get_batch(torch.arange(40))
    assert torch.equal(ds.get_batch(torch.tensor([3, 4, 5]))[0][2], ds.get_batch(torch.tensor([5]))[0][0])
    for i in (0, 7, 17, 39):  # alone, the same bits as inside a batch of 40
        xi, yi = ds.get_batch(torch.tensor([i]))
        assert torch.equal(xi[0], x[i]) and yi[0] == y[i]
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    xp, yp = ds.get_batch(perm)
    assert torch.equal(xp, x[perm]) and torch.equal(yp, y[perm])
    again = make_dataset("shapes", seed=3).get_batch(torch.arange(40))  # a fresh object: same data
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    other = make_dataset("shapes", seed=4).get_batch(torch.arange(40))[0]
    assert not torch.equal(other, x)


def test_shapes_train_and_heldout_differ():
    idx = torch.arange(64)
    train = make_dataset("shapes", split="train").get_batch(idx)[0]
    held = make_dataset("shapes", split="heldout").get_batch(idx)[0]
    same = (train == held).flatten(1).all(1)
    assert not same.any()  # no held-out sample repeats its training counterpart


@pytest.mark.parametrize("size", [8, 32, 48])
def test_shapes_range_and_shapes(size):
    ds = make_dataset("shapes", image_size=size)
    assert isinstance(ds, Dataset) and len(ds) == 2**31 - 1
    assert (ds.name, ds.class_names, ds.num_classes, ds.channels, ds.frames, ds.image_size) == (
        "shapes", SHAPE_CLASSES, 6, 3, 1, size)
    x, y = ds.get_batch(torch.arange(100, 132))
    assert x.shape == (32, 3, 1, size, size) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    assert ((y >= 0) & (y < 6)).all()
    assert torch.equal(ds.indices_for_step(3, 4, seed=9), torch.arange(12, 16))


def test_shapes_classes_balanced():
    y = make_dataset("shapes").get_batch(torch.arange(600))[1]
    counts = torch.bincount(y, minlength=6)
    assert len(counts) == 6 and counts.min() >= 60 and counts.max() <= 140, counts


def test_shapes_contrast():
    x = make_dataset("shapes").get_batch(torch.arange(300))[0][:, :, 0]  # [B, 3, H, W]
    corner = x[:, :, :1, :1]  # the shape never reaches a corner pixel, so this is background
    diff = ((x - corner).abs() / 2).mean(1).flatten(1).amax(1)  # mean |RGB diff| in [0, 1] units
    assert diff.min() >= 0.34, diff.min()


def test_shapes_geometry():
    """Each class covers the area its drawing promises (so a square is not drawn as a triangle, etc.),
    and the centre pixel is shape-coloured, except for the ring's hole."""
    r_unit_area = {  # area / circumradius**2 of each drawing
        "circle": math.pi * 0.85**2, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4,
        "ring": math.pi * (0.98**2 - 0.46**2), "cross": 4 * 0.95 * 0.6 - 0.36,
        "star": 5 * 0.48 * math.sin(math.pi / 5),
    }
    size, n = 64, 240
    u = shapes_mod.hash_uniforms(0, "train", np.arange(n), shapes_mod.N_PARAMS)
    p = shapes_mod._clip_params(u, size, 1)
    p["bg0"][:] = 0.0  # flat black background and white shapes: the image is the coverage
    p["bg1"][:] = 0.0
    p["fg"][:] = 1.0
    cover = (shapes_mod.render(p, size)[:, 0, 0] + 1) / 2  # [n, H, W] in [0, 1]
    area = cover.flatten(1).sum(1).double().numpy() / p["radius"] ** 2
    cx, cy = p["cx"][:, 0].astype(int), p["cy"][:, 0].astype(int)
    for k, name in enumerate(SHAPE_CLASSES):
        m = p["cls"] == k
        assert m.sum() > 10
        assert np.allclose(area[m], r_unit_area[name], rtol=0.03), (name, area[m].min(), area[m].max())
        centre = cover[torch.from_numpy(np.nonzero(m)[0]), cy[m], cx[m]]
        assert (centre < 0.01).all() if name == "ring" else (centre > 0.99).all(), name


def test_moving_shapes_clips():
    T = 6
    ds = make_dataset("moving-shapes", frames=T, seed=1)
    assert (ds.name, ds.frames, ds.num_classes) == ("moving-shapes", T, 6)
    x, y = ds.get_batch(torch.arange(20))
    assert x.shape == (20, 3, T, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(ds.get_batch(torch.tensor([13]))[0][0], x[13])
    # the shape moves: every frame differs from the next
    step_change = (x[:, :, 1:] - x[:, :, :-1]).abs().flatten(3).amax(3).amax(1)  # [B, T-1]
    assert (step_change > 0.1).all()
    # the background is static: a corner pixel never changes (the shape stays off the corners)
    assert torch.equal(x[:, :, :, 0, 0], x[:, :, :1, 0, 0].expand(-1, -1, T))
    # frame t depends only on (index, t): a longer clip starts with the shorter one
    longer = make_dataset("moving-shapes", frames=T + 3, seed=1).get_batch(torch.arange(20))[0]
    assert torch.equal(longer[:, :, :T], x)
    # frame 0 is the still `shapes` picture of the same (seed, split, index), same label
    still, still_y = make_dataset("shapes", seed=1).get_batch(torch.arange(20))
    assert torch.equal(x[:, :, :1], still) and torch.equal(y, still_y)
    one = make_dataset("moving-shapes", frames=1, seed=1)
    assert one.get_batch(torch.arange(2))[0].shape == (2, 3, 1, 32, 32)


def test_make_dataset_errors(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    cases = [
        (dict(spec="shapes", frames=2), "use moving-shapes for clips"),
        (dict(spec="shapes", image_size=4), ">= 8"),
        (dict(spec="moving-shapes", frames=0), ">= 1"),
        (dict(spec="shapes", split="val"), "split"),
        (dict(spec="imagenet"), "unknown data set 'imagenet'; valid: shapes, moving-shapes, .*cifar10:PATH"),
        (dict(spec="imagenet:/data"), "unknown data set"),
        (dict(spec="cifar10"), "cifar10:PATH"),
        (dict(spec=str(tmp_path / "missing") + "/"), "does not exist"),
        (dict(spec=str(tmp_path / "file.png")), "is a file"),
        (dict(spec=str(tmp_path / "empty")), "no images"),
    ]
    for kwargs, pattern in cases:
        spec = kwargs.pop("spec")
        with pytest.raises(DataError, match=pattern) as info:
            make_dataset(spec, **kwargs)
        assert "\n" not in str(info.value)  # the CLI prints one line


# ---- image folders ---------------------------------------------------------------------------------


def _solid(path, mode, colour, size=(16, 16), **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)


def _pixel(ds, rel):
    """Mean colour of the picture at relative path `rel`, in [-1, 1]: [3]."""
    x, _ = ds.get_batch(torch.tensor([ds.paths.index(rel)]))
    return x[0, :, 0].mean((1, 2))


def test_image_folder_classes_and_formats(tmp_path, capsys):
    root = tmp_path / "pics"
    for i in range(3):
        _solid(root / "cats" / f"c{i}.png", "RGB", (200, 30 * i, 10))
    _solid(root / "dogs" / "cmyk.jpg", "CMYK", (255, 0, 0, 0), quality=95)  # cyan
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 = red
    pal.save(root / "dogs" / "palette.png")
    Image.fromarray(np.full((16, 16), 128 * 257, np.uint16)).save(root / "dogs" / "gray16.png")  # mid gray
    _solid(root / "dogs" / "clear.png", "RGBA", (0, 0, 0, 0))  # fully transparent: white on white
    (root / "dogs" / "broken.png").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "dogs" / ".hidden.png").write_bytes(b"not a picture, and ignored")
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 20:] = 255  # left half black, right half white
    Image.fromarray(wide).save(root / "loose.png")

    ds = make_dataset(str(root), image_size=16)
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"note: 1 image directly in {root.resolve()} forms a class 'all' beside its sub-folders' classes",
        f"note: only 9 images in {root.resolve()}: fewer than 10, so the held-out split is the training data",
        f"warning: skipped 1 unreadable file (corrupt, or over Pillow's decompression-bomb size limit) in {root.resolve()}"]
    make_dataset(str(root), image_size=16, split="heldout")  # the same files: nothing said twice
    assert capsys.readouterr().err == ""
    assert ds.name == f"folder:{root.resolve()}"
    assert ds.class_names == ["all", "cats", "dogs"] and ds.num_classes == 3
    assert len(ds) == 8 and ds.frames == 1 and ds.channels == 3  # 9 pictures < 10: all in both splits
    x, y = ds.get_batch(torch.arange(len(ds)))
    assert x.shape == (8, 3, 1, 16, 16) and x.dtype == torch.float32
    labels = dict(zip(ds.paths, y.tolist()))
    assert labels["loose.png"] == 0 and labels["cats/c1.png"] == 1 and labels["dogs/cmyk.jpg"] == 2

    assert torch.allclose(_pixel(ds, "dogs/cmyk.jpg"), torch.tensor([-1.0, 1, 1]), atol=0.1)
    assert torch.allclose(_pixel(ds, "dogs/palette.png"), torch.tensor([1.0, -1, -1]), atol=0.01)
    assert torch.allclose(_pixel(ds, "dogs/gray16.png"), torch.zeros(3), atol=0.02)  # not clipped to white
    assert torch.allclose(_pixel(ds, "dogs/clear.png"), torch.ones(3))
    # 40x20 -> 32x16 -> centre crop 16x16: the left half of the crop is black, the right half white
    loose = ds.get_batch(torch.tensor([ds.paths.index("loose.png")]))[0][0, 0, 0]  # red channel [H, W]
    assert (loose[:, :7] == -1).all() and (loose[:, 9:] == 1).all()
    assert torch.equal(ds.get_batch(torch.tensor([3, 4, 5]))[0][2], ds.get_batch(torch.tensor([5]))[0][0])


def test_image_folder_float_pictures_and_colour_key_transparency(tmp_path):
    root = tmp_path / "modes"
    root.mkdir()
    Image.fromarray(np.full((16, 16), 0.5, np.float32), "F").save(root / "float01.tif")  # floats in [0, 1]: mid gray
    key = np.zeros((16, 16, 3), np.uint8)  # black is the colour key: transparent, so white
    Image.fromarray(key).save(root / "rgb_key.png", transparency=(0, 0, 0))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "gray_key.png", transparency=0)
    ds = make_dataset(str(root), image_size=16)
    assert torch.allclose(_pixel(ds, "float01.tif"), torch.zeros(3), atol=0.01)
    assert torch.allclose(_pixel(ds, "rgb_key.png"), torch.ones(3)) and torch.allclose(_pixel(ds, "gray_key.png"), torch.ones(3))


def test_image_folder_16bit_colour_key_and_non_finite_floats(tmp_path):
    """A 16-bit gray PNG's colour key is transparency too (white), and NaN / inf in a float picture neither set
    its range (a NaN made the whole [0, 1] picture read as 8-bit, so black) nor print numpy's cast warning."""
    import warnings

    root = tmp_path / "modes"
    root.mkdir()
    gray = np.zeros((16, 16), np.uint16)
    gray[:, 8:] = 128 * 257  # left half keyed (0 is the key), right half mid gray
    Image.fromarray(gray).save(root / "key16.png", transparency=0)
    for name, bad in (("nan.tif", np.nan), ("inf.tif", np.inf)):
        a = np.full((16, 16), 0.5, np.float32)
        a[0, 0] = bad
        Image.fromarray(a, "F").save(root / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = make_dataset(str(root), image_size=16)
    key = ds.get_batch(torch.tensor([ds.paths.index("key16.png")]))[0][0, :, 0]  # [3, H, W]
    assert (key[:, :, :8] == 1).all() and torch.allclose(key[:, :, 8:], torch.zeros(()), atol=0.01)
    for name in ("nan.tif", "inf.tif"):  # the finite values, 0.5, are mid gray
        assert torch.allclose(_pixel(ds, name), torch.zeros(3), atol=0.02), name
    corner = lambda name: ds.get_batch(torch.tensor([ds.paths.index(name)]))[0][0, :, 0, 0, 0]  # noqa: E731
    assert torch.allclose(corner("inf.tif"), torch.zeros(3), atol=0.02)  # +inf: the largest value (0.5), not black
    assert torch.allclose(corner("nan.tif"), -torch.ones(3), atol=0.02)  # NaN: 0


def test_image_folder_links_inside_the_folder_are_aliases(tmp_path):
    """A class is its own folder: a link to a folder or file inside the data folder is skipped (no class renamed
    or merged, no picture in both splits); a link to a folder outside it is followed, once."""
    root, outside = tmp_path / "pets", tmp_path / "elsewhere" / "birds"
    for i in range(6):
        _solid(root / "dog" / f"d{i}.png", "RGB", (0, 0, 255))
        _solid(root / "cat" / f"c{i}.png", "RGB", (255, 0, 0))
        _solid(outside / f"b{i}.png", "RGB", (0, 255, 0))
    (root / "canine").symlink_to(root / "dog")  # sorts before "dog": it used to take dog's pictures and name
    (root / "cat" / "zz_dogs").symlink_to(root / "dog")  # dogs inside cat: used to be labelled cat
    (root / "cat" / "c9.png").symlink_to(root / "cat" / "c0.png")  # the same picture twice
    (root / "birds").symlink_to(outside)
    (root / "more_birds").symlink_to(outside)
    train, held = (make_dataset(str(root), image_size=8, split=split) for split in ("train", "heldout"))
    assert train.class_names == held.class_names == ["birds", "cat", "dog"]
    counts = torch.bincount(torch.cat([train.labels, held.labels]), minlength=3).tolist()
    assert counts == [6, 6, 6] and len(held) == 1, (counts, train.paths, held.paths)

    # links into places the walk does not list are the pictures themselves: git-annex (a hidden folder) and a
    # download cache (blobs without a picture's extension)
    annex = tmp_path / "annex"
    for i, name in enumerate(["cat", "dog"]):
        _solid(annex / ".git" / "objects" / f"k{i}", "RGB", (255 * i, 0, 0), format="PNG")
        _solid(annex / "blobs" / f"h{i}.dat", "RGB", (0, 255 * i, 0), format="PNG")
        (annex / name).mkdir()
        (annex / name / "a.png").symlink_to(annex / ".git" / "objects" / f"k{i}")
        (annex / name / "b.png").symlink_to(annex / "blobs" / f"h{i}.dat")
    ds = make_dataset(str(annex), image_size=8)
    assert ds.class_names == ["cat", "dog"] and sorted(ds.paths) == ["cat/a.png", "cat/b.png", "dog/a.png", "dog/b.png"]


def test_video_frame_folder_keeps_a_frame_repeated_through_a_link(tmp_path):
    clip = tmp_path / "vids" / "walk" / "clip1"
    for i in range(3):
        _solid(clip / f"f{i}.png", "RGB", (80 * i, 0, 0))
    (clip / "f3.png").symlink_to(clip / "f2.png")  # a held frame
    ds = make_dataset(str(tmp_path / "vids"), image_size=8, frames=4)
    assert ds.paths == ["walk/clip1"] and ds.frames == 4


def test_image_folder_split_and_bad_folders(tmp_path, capsys, monkeypatch):
    root = tmp_path / "flat"
    for i in range(23):
        _solid(root / f"img{i:02d}.png", "L", 10 * i)
    train = make_dataset(str(root), split="train", image_size=8)
    held = make_dataset(str(root), split="heldout", image_size=8)
    assert train.class_names == held.class_names == ["all"]
    assert sorted(held.paths) == ["img09.png", "img19.png"] and len(train) == 21
    assert not set(train.paths) & set(held.paths)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="no readable images in the train split.*all 1 of its files are unreadable"):
        make_dataset(str(bad))
    assert capsys.readouterr().err == ""  # the one error line says it all

    # a decompression bomb is unreadable, not a crash or a silent warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    bomb = tmp_path / "bomb"
    _solid(bomb / "ok.png", "RGB", (1, 2, 3), size=(8, 8))
    _solid(bomb / "big.png", "RGB", (1, 2, 3), size=(12, 12))  # 144 px: a warning, made an error
    _solid(bomb / "huge.png", "RGB", (1, 2, 3), size=(20, 20))  # 400 px: PIL's own error
    ds = make_dataset(str(bomb), image_size=8)
    assert ds.paths == ["ok.png"]
    assert "skipped 2 unreadable files" in capsys.readouterr().err


# ---- video folders ---------------------------------------------------------------------------------


def _gif(path, colours):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def test_video_folder(tmp_path, capsys):
    root = tmp_path / "clips"
    for name, level in [("f10.png", 250), ("f1.png", 10), ("f2.png", 20), ("f3.png", 30)]:
        _solid(root / "clip_a" / name, "L", level)
    for i in range(2):
        _solid(root / "clip_b" / f"{i}.png", "RGB", (0, 0, 0))  # too short for 3 frames
    _gif(root / "spin.gif", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)])

    ds = make_dataset(str(root), frames=3, image_size=8)
    assert "skipped 1 unreadable or too-short clip (fewer" in capsys.readouterr().err
    assert ds.paths == ["clip_a", "spin.gif"] and ds.class_names == ["all"] and ds.frames == 3
    x, y = ds.get_batch(torch.arange(2))
    assert x.shape == (2, 3, 3, 8, 8) and torch.equal(y, torch.zeros(2, dtype=torch.int64))
    levels = ((x[0, 0, :, 0, 0] + 1) * 127.5).round()  # frames sorted naturally: f1, f2, f3 (not f10)
    assert levels.tolist() == [10, 20, 30]
    gif = x[1, :, :, 0, 0].T  # [T, 3]
    assert torch.allclose(gif, torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]]), atol=0.02)


def test_video_folder_animated_webp_and_png_are_clips(tmp_path):
    """An animated WebP or PNG is a clip of its own, as a GIF is; they used to be read as stills, so a folder of
    them made one clip of their first frames (class of the folder above) and each lost its motion."""
    root = tmp_path / "actions"
    (root / "run").mkdir(parents=True)
    frames = [Image.new("RGB", (16, 16), (200, 60 * t, 0)) for t in range(4)]
    for ext, kw in ((".webp", dict(lossless=True)), (".png", {})):
        frames[0].save(root / "run" / f"a{ext}", save_all=True, append_images=frames[1:], duration=50, loop=0, **kw)
    for t in range(4):  # a frame folder of stills, still one clip
        _solid(root / "walk" / "c1" / f"f{t}.png", "RGB", (0, 0, 60 * t))
    ds = make_dataset(str(root), frames=4, image_size=8)
    assert ds.class_names == ["run", "walk"]
    assert dict(zip(ds.paths, ds.labels.tolist())) == {"run/a.png": 0, "run/a.webp": 0, "walk/c1": 1}
    x, _ = ds.get_batch(torch.tensor([ds.paths.index("run/a.webp"), ds.paths.index("run/a.png")]))
    green = ((x[:, 1, :, 0, 0] + 1) * 127.5).round()  # [2 clips, T]
    assert green.tolist() == [[0, 60, 120, 180]] * 2


def test_folders_sort_names_with_digit_like_characters(tmp_path):
    """'1²' splits into '1' and '²', which str.isdigit() calls a digit and int() refuses: a traceback used to end
    any command on a folder holding such a file, picture or not."""
    _solid(tmp_path / "pics" / "a.png", "RGB", (0, 0, 0))
    (tmp_path / "pics" / "notes 1²").write_text("not a picture")
    _solid(tmp_path / "pics" / "x1².png", "RGB", (0, 0, 0))
    assert make_dataset(str(tmp_path / "pics"), image_size=8).paths == ["a.png", "x1².png"]


def test_loose_items_and_a_sub_folder_named_all_do_not_merge(tmp_path, capsys):
    root = tmp_path / "pics"
    _solid(root / "loose.png", "RGB", (0, 0, 0))
    _solid(root / "loose2.png", "RGB", (0, 0, 0))
    _solid(root / "cats" / "c.png", "RGB", (0, 0, 0))
    assert make_dataset(str(root), image_size=8).class_names == ["all", "cats"]
    assert f"note: 2 images directly in {root.resolve()} form a class 'all'" in capsys.readouterr().err
    _solid(root / "all" / "a.png", "RGB", (0, 0, 0))
    with pytest.raises(DataError, match="holds images directly, which form class 'all', and a sub-folder 'all'"):
        make_dataset(str(root), image_size=8)
    (root / "loose.png").unlink()  # only the sub-folder: an ordinary class
    (root / "loose2.png").unlink()
    assert make_dataset(str(root), image_size=8).class_names == ["all", "cats"]
    clips = tmp_path / "clips"
    _gif(clips / "a.gif", [(10, 10, 10), (60, 60, 60)])
    _gif(clips / "all" / "b.gif", [(10, 10, 10), (60, 60, 60)])
    with pytest.raises(DataError, match="holds clips directly"):
        make_dataset(str(clips), frames=2, image_size=8)


def test_run_folders_inside_a_data_folder_are_not_data(tmp_path, capsys):
    """`cd photos && sigma train-imm --data . --out runs/x`: the run's sample grids used to become pictures of a
    class 'runs' the next time the folder was read, so the run's own --resume failed with 'classes changed' and a
    second command on the folder trained one class too many."""
    root = tmp_path / "pics"
    for cls in ("cats", "dogs"):
        _solid(root / cls / "a.png", "RGB", (0, 0, 0))
    for run in ("runs/imm", "runs/imm/snapshots/step-0000002"):  # a run, and a snapshot inside it
        _solid(root / run / "samples.png", "RGB", (255, 255, 255))
        (root / run / "model_index.json").write_text("{}")
    _solid(root / "runs" / "tok" / "recon.png", "RGB", (255, 255, 255))
    (root / "runs" / "tok" / "sigma.json").write_text("{}")
    ds = make_dataset(str(root), image_size=8)
    assert ds.class_names == ["cats", "dogs"] and ds.paths == ["cats/a.png", "dogs/a.png"]
    err = capsys.readouterr().err
    assert f"note: skipped 2 sigma run folders inside {root.resolve()} (runs/imm, runs/tok)" in err
    # a run still going, or stopped before its first checkpoint (--sample-every below --save-every): samples and log
    _solid(root / "runs" / "early" / "samples" / "samples_000100.png", "RGB", (255, 255, 255))
    (root / "runs" / "early" / "metrics.jsonl").write_text('{"step": 100}\n')
    assert make_dataset(str(root), image_size=8).class_names == ["cats", "dogs"]
    assert "note: skipped 3 sigma run folders" in capsys.readouterr().err
    _solid(root / "runs" / "mine.png", "RGB", (0, 0, 0))  # a picture beside the run folders is still data
    assert make_dataset(str(root), image_size=8).class_names == ["cats", "dogs", "runs"]
    clips = tmp_path / "clips"
    _gif(clips / "walk" / "a.gif", [(10, 10, 10), (60, 60, 60)])
    _gif(clips / "runs" / "vid" / "samples.gif", [(10, 10, 10), (60, 60, 60)])
    (clips / "runs" / "vid" / "sigma.json").write_text("{}")
    assert make_dataset(str(clips), frames=2, image_size=8).class_names == ["walk"]


def test_a_class_with_nothing_to_train_on_is_a_warning(tmp_path, capsys):
    """A class whose files are all unreadable, or whose one picture is the held-out one, kept its label silently: a
    classifier or IMM model then trained a class it never saw."""
    root = tmp_path / "pics"
    for i in range(9):
        _solid(root / "a" / f"{i}.png", "RGB", (0, 0, 0))
    _solid(root / "b" / "0.png", "RGB", (0, 0, 0))  # the 10th file, sorted: held out
    (root / "c").mkdir()
    (root / "c" / "0.png").write_bytes(b"not a picture")
    train = make_dataset(str(root), image_size=8)
    assert train.class_names == ["a", "b", "c"] and set(train.labels.tolist()) == {0}
    err = capsys.readouterr().err
    assert f"warning: classes 'b', 'c' of {root.resolve()} have no readable images in the training split" in err
    make_dataset(str(root), image_size=8, split="heldout")  # the held-out split may lack classes: no line
    assert "no readable images in the training split" not in capsys.readouterr().err
    clips = tmp_path / "clips"
    _gif(clips / "walk" / "a.gif", [(10, 10, 10), (60, 60, 60)])
    _gif(clips / "run" / "b.gif", [(10, 10, 10)])  # too short for 2 frames
    make_dataset(str(clips), frames=2, image_size=8)
    err = capsys.readouterr().err  # (the reason is the clip's length, not a file that cannot be read)
    assert f"warning: class 'run' of {clips.resolve()} has no readable clips in the training split (unreadable or " \
           "too short: fewer than 2 frames, or all held out" in err, err


def test_video_folder_classes(tmp_path):
    root = tmp_path / "actions"
    for t in range(3):
        _solid(root / "walk" / "c1" / f"{t}.png", "RGB", (t * 50, 0, 0))
        _solid(root / "walk" / "c2" / f"{t}.png", "RGB", (0, t * 50, 0))
    _gif(root / "run" / "a.gif", [(10, 10, 10), (60, 60, 60), (120, 120, 120)])
    ds = make_dataset(str(root), frames=3, image_size=8)
    assert ds.class_names == ["run", "walk"]
    assert dict(zip(ds.paths, ds.labels.tolist())) == {"run/a.gif": 0, "walk/c1": 1, "walk/c2": 1}
    with pytest.raises(DataError, match="at least 4 frames"):
        make_dataset(str(root), frames=4, image_size=8)


# ---- torchvision sets on disk -------------------------------------------------------------------


def _idx(path, array):
    """Write an IDX (MNIST raw) file: big-endian magic (0, 0, type 8 = ubyte, ndim), dims, bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    sets = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        sets[prefix] = (images, labels)
    return tmp_path, sets


def test_fake_mnist(fake_mnist, tmp_path):
    root, sets = fake_mnist
    ds = make_dataset(f"mnist:{root}", image_size=28)
    assert ds.name == "mnist" and len(ds) == 20 and ds.num_classes == 10 and ds.class_names[3] == "3 - three"
    x, y = ds.get_batch(torch.arange(20))
    assert x.shape == (20, 3, 1, 28, 28)
    expected = torch.from_numpy(sets["train"][0]).float() / 127.5 - 1
    assert torch.equal(x[:, 0, 0], expected) and torch.equal(x[:, 1], x[:, 0]) and torch.equal(x[:, 2], x[:, 0])
    assert y.tolist() == sets["train"][1].tolist()
    held = make_dataset(f"mnist:{root}", split="heldout", image_size=32)
    assert len(held) == 10 and held.get_batch(torch.arange(4))[0].shape == (4, 3, 1, 32, 32)
    assert held.get_batch(torch.arange(10))[1].tolist() == sets["t10k"][1].tolist()
    with pytest.raises(DataError, match="fashion-mnist not found under .*never downloads"):
        make_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")


def test_indices_for_step_epochs(fake_mnist):
    root, _ = fake_mnist
    ds = make_dataset(f"mnist:{root}", image_size=28)
    B, N = 8, 20
    stream = torch.cat([ds.indices_for_step(s, B, seed=5) for s in range(8)])  # 64 positions: 3+ epochs
    epochs = [stream[e * N : (e + 1) * N] for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(N))  # each epoch is a permutation
    assert not torch.equal(epochs[0], torch.arange(N)) and not torch.equal(epochs[0], epochs[1])
    fresh = make_dataset(f"mnist:{root}", image_size=28)  # resuming at step 5 replays the same batch
    assert torch.equal(fresh.indices_for_step(5, B, seed=5), stream[40:48])
    assert not torch.equal(ds.indices_for_step(0, B, seed=6), stream[:8])


def test_a_folders_held_out_split_is_a_fair_sample_in_any_prefix(tmp_path):
    """Sorted by path a folder runs class by class; its held-out split is shuffled (fixed), so the first n items,
    which eval's FD reference sets, the classifier's held-out accuracy and reconstruct take, hold every class."""
    for c in range(4):
        for i in range(50):
            _solid(tmp_path / "pics" / f"class{c}" / f"{i:02d}.png", "L", 60 * c)
    held = make_dataset(str(tmp_path / "pics"), split="heldout", image_size=8)
    assert len(held) == 20 and sorted(held.labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert set(held.labels[:10].tolist()) == {0, 1, 2, 3} and set(held.labels[10:].tolist()) == {0, 1, 2, 3}
    again = make_dataset(str(tmp_path / "pics"), split="heldout", image_size=8)
    assert held.paths == again.paths and torch.equal(held.data, again.data)  # the same order every time
    assert [p.split("/")[0] for p in held.paths] == [f"class{c}" for c in held.labels.tolist()]  # paths, labels aligned
