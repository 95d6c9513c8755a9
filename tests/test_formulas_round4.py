"""Round-4 mutation-audit tests: sample pictures (pipelines/visual.py), image/video folders, the MoE dispatch and
its benchmark, the shared transformer layers (3D RoPE, grid positions, cubes, Block), the shapes classifier and
the CLI's shared checks (sigmacli/common.py). Expected values come from the docstrings, worked out by hand."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.errors import SigmaError


# ---- pictures -----------------------------------------------------------------------------------------------
def test_to_uint8_rounds_to_the_nearest_level():
    from pipelines.visual import to_uint8

    # (x + 1) * 127.5 = 100.6 -> 101 (nearest), 3.4 -> 3, 254.7 -> 255
    levels = torch.tensor([100.6, 3.4, 254.7])
    x = (levels / 127.5 - 1).view(1, 1, 1, 1, 3)
    assert to_uint8(x).reshape(-1).tolist() == [101, 3, 255]


def test_make_grid_grey_samples_and_no_empty_columns():
    from pipelines.visual import make_grid

    x = torch.full((3, 1, 1, 4, 5), -1.0)  # grey (C = 1) black samples
    x[1] = 1.0
    grid = make_grid(x, nrow=8, pad=1)  # more columns asked for than there are samples: 3 columns, one row
    assert grid.shape == (1, 4 + 2, 3 * (5 + 1) + 1, 3)
    tile = grid[0, 1:5, 1 + 6:1 + 6 + 5]  # sample 1: white in every channel
    assert (tile == 255).all()
    assert (grid[0, 1:5, 1:6] == 0).all()  # sample 0: black in every channel


@pytest.mark.parametrize("name, clips, expected", [("grid", False, "grid.png"), ("run.v2", True, "run.v2.gif"),
                                                   ("a.PNG", False, "a.PNG"), ("a.png", True, "a.gif")])
def test_picture_path_suffixes(tmp_path, name, clips, expected):
    from pipelines.visual import picture_path

    assert picture_path(tmp_path / name, clips) == tmp_path / expected


@pytest.mark.parametrize("name", ["x.jpg", "x.JPEG", "x.webp", "x.bmp", "x.tiff"])
def test_picture_path_refuses_other_picture_formats(tmp_path, name):
    from pipelines.visual import picture_path

    with pytest.raises(ValueError, match="images are written as PNG"):
        picture_path(tmp_path / name, False)


def test_picture_path_refuses_a_folder_but_not_an_existing_file(tmp_path):
    from pipelines.visual import picture_path

    (tmp_path / "old.png").write_bytes(b"x")  # overwriting a picture is fine
    assert picture_path(tmp_path / "old.png", False) == tmp_path / "old.png"
    with pytest.raises(ValueError, match="is a folder"):
        picture_path(tmp_path, False)


def test_save_individual_grey_samples_are_rgb_files_with_the_usual_mode(tmp_path):
    from checkpoints.io import new_file_mode
    from pipelines.visual import save_individual

    x = torch.zeros(2, 1, 1, 4, 4)  # grey 0.0 -> level 128 (127.5 rounded half to even)
    x[1] = 1.0
    paths = save_individual(x, tmp_path)
    with Image.open(paths[1]) as im:
        assert im.mode == "RGB" and (np.asarray(im) == 255).all()
    assert os.stat(paths[0]).st_mode & 0o777 == new_file_mode()  # not mkstemp's 0600


# ---- image / video folders --------------------------------------------------------------------------------
def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)


def test_exactly_ten_images_hold_out_the_tenth(tmp_path):
    from pipelines.data.folders import image_folder

    for i in range(10):
        _save(tmp_path / f"im{i}.png", np.full((8, 8, 3), 20 * i, np.uint8))
    train = image_folder(tmp_path, image_size=8, split="train")
    held = image_folder(tmp_path, image_size=8, split="heldout")
    assert held.paths == ["im9.png"] and len(train) == 9 and "im9.png" not in train.paths


def test_sixteen_bit_grey_is_scaled_by_65535_over_255(tmp_path):
    from pipelines.data.folders import image_folder

    a = np.full((8, 8), 60000, np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")  # mode I;16 (or I)
    ds = image_folder(tmp_path, image_size=8, split="train")
    assert ds.data.unique().tolist() == [233]  # round(60000 * 255 / 65535) = round(233.46)


def test_float_pictures_in_zero_one_reach_white_at_one(tmp_path):
    from pipelines.data.folders import image_folder

    a = np.ones((8, 8), np.float32)
    a[:, :4] = 0.5
    Image.fromarray(a, "F").save(tmp_path / "f.tif")
    ds = image_folder(tmp_path, image_size=8, split="train")
    px = ds.data[0, 0, 0]
    assert (px[:, 4:] == 255).all() and (px[:, :4] == 128).all()  # 1.0 -> 255, 0.5 -> 127.5 -> 128


# ---- MoE dispatch and benchmark ---------------------------------------------------------------------------
def _moe_case(seed=0, T=40, D=16, E=4, Fh=8, k=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w_in, w_out = torch.randn(E, D, 2 * Fh, generator=g), torch.randn(E, Fh, D, generator=g)
    scores = torch.rand(T, E, generator=g)
    gate, idx = scores.topk(k, -1)
    return x, w_in, w_out, idx, gate


@pytest.mark.parametrize("backend", ["loop", "sorted-loop", "grouped", "auto"])
def test_every_backend_uses_every_expert_including_the_last(backend):
    from kernels.moe import HAS_GROUPED_MM, moe_ffn

    if backend == "grouped" and not HAS_GROUPED_MM:
        pytest.skip("no grouped_mm")
    x, w_in, w_out, idx, gate = _moe_case()
    idx[:, 0] = w_in.shape[0] - 1  # every token sends its first slot to the last expert
    idx[:, 1] = torch.where(idx[:, 1] == w_in.shape[0] - 1, 0, idx[:, 1])
    # by hand: out[t] = sum_j gate[t, j] * (silu(x Wg) * (x Wu)) Wd of expert idx[t, j]
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = x[t] @ w_in[e]
            want[t] += gate[t, j] * (F.silu(h[:8]) * h[8:]) @ w_out[e]  # [Wg | Wu], F = 8
    out = moe_ffn(x, w_in, w_out, idx, gate, backend)
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-4)


def test_auto_backend_is_grouped_when_available():
    from kernels.moe import HAS_GROUPED_MM, moe_ffn

    x, w_in, w_out, idx, gate = _moe_case(seed=1, T=64, D=32, Fh=48)
    want = moe_ffn(x, w_in, w_out, idx, gate, "grouped" if HAS_GROUPED_MM else "sorted-loop")
    assert torch.equal(moe_ffn(x, w_in, w_out, idx, gate, "auto"), want)


def test_bench_timing_takes_the_minimum_over_rounds(monkeypatch):
    from kernels.moe import bench

    clock = [0.0]
    durations = iter([9.0, 1.0, 3.0, 2.0])  # warm-up, then 3 rounds

    def fake_clock():
        return clock[0]

    def work():
        clock[0] += next(durations)

    monkeypatch.setattr(bench.time, "perf_counter", fake_clock)
    assert bench._time_round_robin({"a": work}, "cpu", 3) == {"a": 1.0}


def test_bench_reports_throughputs_and_the_check_from_its_own_times(monkeypatch):
    from kernels import moe
    from kernels.moe import bench

    real = moe.moe_ffn

    def spiked(x, w_in, w_out, idx, gate, backend):  # the grouped path off by 0.25 in one entry
        out = real(x, w_in, w_out, idx, gate, backend)
        return out + (F.one_hot(torch.tensor(3), out.numel()).view_as(out) * 0.25 if backend == "grouped" else 0)

    monkeypatch.setattr(bench, "moe_ffn", spiked)
    res = bench.run_bench(32, 16, 4, 8, 2, "fp32", "cpu", 1)
    assert abs(res["check_max_abs"] - 0.25) < 1e-4
    for m in res["methods"].values():
        assert math.isclose(m["forward_tokens_per_s"], 32 / m["forward_s"])
        assert math.isclose(m["forward_backward_tokens_per_s"], 32 / m["forward_backward_s"])
    meth = res["methods"]
    assert math.isclose(res["grouped_vs_loop"], meth["loop"]["forward_backward_s"] / meth["grouped"]["forward_backward_s"])
    assert math.isclose(res["grouped_vs_dense"], meth["dense"]["forward_backward_s"] / meth["grouped"]["forward_backward_s"])


# ---- layers -----------------------------------------------------------------------------------------------
def test_grid_positions_are_row_major_t_h_w():
    from pipelines.nn.layers import grid_positions

    want = [(t, h, w) for t in range(2) for h in range(3) for w in range(4)]
    assert [tuple(p) for p in grid_positions(2, 3, 4).tolist()] == want


def test_rope_3d_splits_the_pairs_a_quarter_to_t_the_rest_to_h_and_w():
    from pipelines.nn.layers import rope_3d

    head_dim, theta = 32, 100.0  # 16 pairs: 4 to t, 6 to h, 6 to w
    pos = torch.tensor([[3.0, 5.0, 7.0]])
    cos, sin = rope_3d(pos, head_dim, theta)
    assert cos.shape == (1, 16)
    angle = torch.atan2(sin, cos)[0]
    # each axis its own ladder of frequencies theta^(-i/n), i < n: angle = position * frequency
    want = [3.0 * theta ** (-i / 4) for i in range(4)] + [5.0 * theta ** (-i / 6) for i in range(6)] \
        + [7.0 * theta ** (-i / 6) for i in range(6)]
    want = torch.remainder(torch.tensor(want) + math.pi, 2 * math.pi) - math.pi  # wrapped as atan2 does
    assert torch.allclose(angle, want, atol=1e-5)


def test_auto_cube_and_a_grid_not_divisible_along_w():
    from pipelines.nn.layers import auto_cube, cube_major_order

    assert auto_cube((1, 8, 8)) == (1, 4, 4) and auto_cube((2, 6, 4)) == (2, 2, 4) and auto_cube((3, 5, 16), (2, 8, 8)) == (1, 1, 8)
    with pytest.raises(ValueError, match="not divisible"):
        cube_major_order((1, 4, 6), (1, 2, 4))


def _ln(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    out = (x - mu) / torch.sqrt(var + 1e-5)
    return out * ln.weight + ln.bias if ln.weight is not None else out


def _randomise(module, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # LayerNorm weights near 1, everything else near 0
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module


def test_plain_block_is_pre_norm_with_its_own_norms():
    """x1 = x + attn(LN1(x)); out = x1 + mlp(LN2(x1)), each LayerNorm with its own (trained) affine."""
    from pipelines.nn.layers import Block

    blk = _randomise(Block(16, 2))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        x1 = x + blk.attn(_ln(x, blk.norm1))
        want = x1 + blk.mlp(_ln(x1, blk.norm2))
        assert torch.allclose(blk(x), want, atol=1e-5)


@pytest.mark.parametrize("cond", [False, True])
def test_block_passes_rope_to_attention(cond):
    from pipelines.nn.layers import Block, grid_positions, rope_3d

    blk = _randomise(Block(16, 2, cond_dim=8 if cond else None)).eval()
    x, c = torch.randn(1, 6, 16), (torch.randn(1, 8) if cond else None)
    rope = rope_3d(grid_positions(1, 2, 3), 8)
    identity = (torch.ones_like(rope[0]), torch.zeros_like(rope[1]))
    with torch.no_grad():
        plain = blk(x, None, c)
        assert torch.allclose(blk(x, identity, c), plain, atol=1e-6)  # the identity rotation changes nothing
        assert not torch.allclose(blk(x, rope, c), plain, atol=1e-3)  # a real rotation does


# ---- shapes classifier ------------------------------------------------------------------------------------
def test_classifier_resizes_non_square_frames_to_its_size():
    from pipelines.evaluation.classifier import ShapesClassifier

    m = ShapesClassifier(image_size=16, width=8, feature_dim=8).eval()
    with torch.no_grad():
        assert m.feature_map(torch.zeros(2, 3, 24, 16)).shape == (2, 8, 2, 2)  # H differs, W matches
        assert m.feature_map(torch.zeros(2, 3, 16, 24)).shape == (2, 8, 2, 2)


def test_classifier_resize_is_antialiased():
    """A 1-pixel checkerboard at twice the size averages to grey (0, but at the border) under a bilinear resize;
    picking every other pixel (nearest) would see a flat black (-1) picture instead."""
    from pipelines.evaluation.classifier import ShapesClassifier

    m = ShapesClassifier(image_size=16, width=8, feature_dim=8).eval()
    board = ((torch.arange(32)[:, None] + torch.arange(32)) % 2 * 2 - 1).float().expand(1, 3, 32, 32)
    m.body = torch.nn.Identity()  # look at the resized frame itself
    with torch.no_grad():
        seen = m.feature_map(board)
    assert seen.shape == (1, 3, 16, 16)
    assert seen[..., 1:-1, 1:-1].abs().max() < 1e-5 and seen.abs().mean() < 0.2


def test_classifier_flips_are_drawn_for_the_global_batch_and_sliced_per_rank():
    from pipelines.evaluation.classifier import ClassifierTask

    class Data:
        frames, image_size, name = 1, 8, "ramp"

        def indices_for_step(self, step, batch, seed):
            return torch.arange(batch)

        def get_batch(self, idx):
            ramp = torch.arange(64.0).view(8, 8) / 64
            return ramp.expand(len(idx), 3, 1, 8, 8).contiguous(), torch.zeros(len(idx), dtype=torch.long)

    class Model(torch.nn.Module):
        device = torch.device("cpu")

    def run(rank, world):
        seen = []
        task = ClassifierTask(Model(), Data(), 16, 0, "ramp")
        task.loss(lambda x: seen.append(x) or torch.zeros(x.shape[0], 6), Model(), 0,
                  torch.Generator().manual_seed(7), rank, world)
        return seen[0]

    whole = run(0, 1)
    assert torch.equal(run(0, 2), whole[0::2]) and torch.equal(run(1, 2), whole[1::2])


def test_evaluate_classifier_caps_num_at_the_heldout_size():
    from pipelines.evaluation.classifier import ShapesClassifier, evaluate_classifier

    class Held:
        def __len__(self):
            return 3

        def get_batch(self, idx):
            return torch.zeros(len(idx), 3, 1, 16, 16), torch.zeros(len(idx), dtype=torch.long)

    res = evaluate_classifier(ShapesClassifier(image_size=16, width=8, feature_dim=8), Held(), 10, "cpu")
    assert res["num"] == 3


# ---- sigmacli/common.py -----------------------------------------------------------------------------------
def test_check_sizes_bounds():
    from sigmacli.common import check_sizes

    check_sizes(8, 1), check_sizes(None, None)
    with pytest.raises(SigmaError, match="--image-size must be at least 8"):
        check_sizes(7, None)
    with pytest.raises(SigmaError, match="--frames must be at least 1"):
        check_sizes(None, 0)


def test_steps_done_names_the_steps_of_this_call():
    from sigmacli.common import steps_done

    assert steps_done({"steps": 30}) == "trained 30 steps"
    assert steps_done({"steps": 30, "resumed_from": 0}) == "trained 30 steps"
    assert steps_done({"steps": 1}) == "trained 1 step"
    assert steps_done({"steps": 30, "resumed_from": 11}) == "trained steps 12-30 (resumed from step 11)"
    assert steps_done({"steps": 12, "resumed_from": 11}) == "trained step 12 (resumed from step 11)"  # not "steps 12-12"


def test_file_in_the_way_as_named_and_as_mkdir_reaches_it(tmp_path):
    from sigmacli.common import as_created, file_in_the_way, output_folder

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "d").mkdir()
    assert file_in_the_way(tmp_path / "a-file") == tmp_path / "a-file"
    assert file_in_the_way(tmp_path / "a-file" / "sub" / "deeper") == tmp_path / "a-file"
    assert file_in_the_way(tmp_path / "missing" / ".." / "a-file") == tmp_path.resolve() / "a-file"
    assert file_in_the_way(tmp_path / "d" / "new") is None
    assert as_created(tmp_path / "missing" / ".." / "x") == tmp_path.resolve() / "x"
    assert as_created(tmp_path / "d") == (tmp_path / "d").resolve()
    (tmp_path / "d" / "e").mkdir()
    (tmp_path / "d" / "b-file").write_text("x")
    os.symlink(tmp_path / "d" / "e", tmp_path / "link")
    assert as_created(tmp_path / "link") == (tmp_path / "d" / "e").resolve()  # the OS resolves the link
    assert as_created(tmp_path / "link" / ".." / "y") == (tmp_path / "d").resolve() / "y"  # link first, then ..
    assert file_in_the_way(tmp_path / "link" / ".." / "b-file" / "x") is not None  # d/b-file, through the link
    assert output_folder(tmp_path / "d" / "new", "--out") == tmp_path / "d" / "new"
    with pytest.raises(SigmaError, match="--save-individual .*a-file' is a file, where a folder is needed"):
        output_folder(tmp_path / "a-file" / "x", "--save-individual")


def test_output_picture_errors_are_sigma_errors(tmp_path):
    from sigmacli.common import output_picture

    assert output_picture(tmp_path / "g", True) == tmp_path / "g.gif"
    with pytest.raises(SigmaError, match="^--out .*images are written as PNG"):
        output_picture(tmp_path / "g.jpg", False)
    with pytest.raises(SigmaError, match="^--out .*is a folder"):
        output_picture(tmp_path, False)
