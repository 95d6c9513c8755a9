"""Hostile input. Property-based (hypothesis): random and mutated bytes reach the checkpoint loader, the image
loader and the text loader; the only outcomes allowed are a clean load or our one-line error types. Then the CLI
given sizes the machine or a kernel cannot take, and run folders with parts missing: one `error:` line each."""
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from checkpoints.io import load_model, load_training_state, save_model
from checkpoints.meta import read_safetensors_header
from pipelines.errors import SigmaError

# derandomize: CI sees the same examples every run (a failure is reproducible, never a flake)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from pipelines.evaluation.classifier import ShapesClassifier

    folder = tmp_path_factory.mktemp("clf") / "model"
    torch.manual_seed(0)
    save_model(ShapesClassifier(), folder)
    return folder


def _fresh(model_folder, tmp_path, name):
    dst = tmp_path / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(model_folder, dst)
    return dst


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_weights(model_folder, tmp_path, data):
    folder = _fresh(model_folder, tmp_path, "rand")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(data)
    with pytest.raises(SigmaError):
        load_model(folder, "classifier")


@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
       header_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_mutated_safetensors(model_folder, tmp_path, cut, flips, header_len):
    folder = _fresh(model_folder, tmp_path, "mut")
    path = folder / "diffusion_pytorch_model.safetensors"
    raw = bytearray(path.read_bytes())
    for where, value in flips:  # flipped bytes anywhere: header JSON, shapes, dtypes, data
        raw[int(where * (len(raw) - 1))] = value
    if header_len is not None:  # a truncated or oversized header length
        raw[:8] = header_len.to_bytes(8, "little")
    raw = raw[: max(0, int(cut * len(raw))) if cut < 0.9 else len(raw)]
    path.write_bytes(bytes(raw))
    try:
        m = load_model(folder, "classifier")
    except SigmaError:
        return
    from pipelines.evaluation.classifier import ShapesClassifier  # loaded: then every tensor has its true shape

    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ShapesClassifier().state_dict().items()}


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_as_config(model_folder, tmp_path, data):
    folder = _fresh(model_folder, tmp_path, "cfg")
    (folder / "config.json").write_bytes(data)
    with pytest.raises(SigmaError):
        load_model(folder, "classifier")


@FUZZ
@given(config=st.dictionaries(st.sampled_from(["width", "depth", "num_classes", "image_size", "_class_name", "bogus"]),
                              st.one_of(st.integers(-5, 512), st.text(max_size=5), st.none(), st.floats()), max_size=4))
def test_hostile_config_values(model_folder, tmp_path, config):
    folder = _fresh(model_folder, tmp_path, "cfgv")
    base = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    try:
        load_model(folder, "classifier")
    except SigmaError:
        pass


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_as_training_state(model_folder, tmp_path, data):
    from pipelines.evaluation.classifier import ShapesClassifier

    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.json").write_text(json.dumps({"counters": {"step": 1}, "param_groups": [], "scalars": {}}))
    shutil.copy(model_folder / "diffusion_pytorch_model.safetensors", run / "checkpoint" / "model.safetensors")
    (run / "checkpoint" / "optimizer.safetensors").write_bytes(data)
    m = ShapesClassifier()
    with pytest.raises(SigmaError):
        load_training_state(run, m, None, torch.optim.AdamW(m.parameters()))


def _good_png(path):
    Image.fromarray(np.full((12, 12, 3), 100, np.uint8)).save(path)


@FUZZ
@given(data=st.binary(max_size=3000), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff"]))
def test_random_bytes_as_images_are_skipped_and_counted(tmp_path, data, prefix):
    from pipelines.data import make_dataset

    root = tmp_path / "imgs"
    shutil.rmtree(root, ignore_errors=True)
    (root / "a").mkdir(parents=True)
    _good_png(root / "a" / "good.png")
    (root / "a" / "fuzz.png").write_bytes(prefix + data)
    (root / "a" / "fuzz.gif").write_bytes(prefix + data)
    ds = make_dataset(str(root), image_size=8)
    assert 1 <= len(ds) <= 3  # the good picture always; the fuzzed ones only if they really decode
    x, _ = ds.get_batch(torch.arange(len(ds)))
    assert x.shape[1:] == (3, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("frames", [1, 2])
def test_a_fifo_named_like_a_picture_is_skipped_not_read_forever(tmp_path, frames):
    from pipelines.data import make_dataset

    (tmp_path / "a" / "clip").mkdir(parents=True)
    for i in range(2):
        _good_png(tmp_path / "a" / "clip" / f"f{i}.png")
    os.mkfifo(tmp_path / "a" / "pipe.png")  # (frames 2: as a picture of the clip folder a/; a GIF-named one alike)
    os.mkfifo(tmp_path / "a" / "pipe.gif")

    class Hung(BaseException):  # (not an Exception: the loader skips those as unreadable files)
        pass

    def hung(signum, frame):
        raise Hung("reading the folder blocked on a FIFO")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        ds = make_dataset(str(tmp_path), image_size=8, frames=frames)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(ds) == (2 if frames == 1 else 1)  # the two pictures, or the clip; the FIFOs skipped and counted


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_text(tmp_path, data):
    from pipelines.lm.data import ByteCorpus

    path = tmp_path / "t.txt"
    path.write_bytes(data)
    try:
        corpus = ByteCorpus(str(path), 16)
    except SigmaError:
        return
    assert corpus.train.max() < 256 and len(corpus.val) >= 17


def test_headers_past_the_end_and_huge_lengths(model_folder, tmp_path):
    path = _fresh(model_folder, tmp_path, "hdr") / "diffusion_pytorch_model.safetensors"
    raw = path.read_bytes()
    for bad in (raw[:4], (2**63).to_bytes(8, "little") + raw[8:], raw[:-10]):
        path.write_bytes(bad)
        with pytest.raises(SigmaError, match="not a valid safetensors file"):
            read_safetensors_header(path)


# ---- the CLI: sizes the machine or a kernel cannot take, and run folders with parts missing ------------------------
def one_line(r, message, code=1):
    lines = r.stderr.strip().splitlines()
    return r.exit_code == code and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_out_of_memory_is_one_line_and_other_errors_still_raise(cli, tmp_path, monkeypatch):
    """numpy's MemoryError and torch's failed CPU allocation (a RuntimeError) end as one line (an absurd --num or
    --batch-size reaches them); any other RuntimeError is a bug and still raises."""
    import pipelines.imm.sampling as sampling

    for error in (MemoryError("Unable to allocate 14.9 GiB for an array with shape (100000000, 20) and data type "
                              "uint64"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 102400000000 bytes. Error code 12"),
                  RuntimeError("std::bad_alloc"), RuntimeError("a bug")):
        def generate(*args, **kwargs):
            raise error
        monkeypatch.setattr(sampling, "generate", generate)
        r = cli("sample", "--num", "2", "--out", tmp_path / "s.png")
        if str(error) == "a bug":
            assert r.exception is error
        else:
            assert one_line(r, "out of memory"), r.stderr
    assert not (tmp_path / "s.png").exists()


def test_a_picture_named_as_a_folder_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """`--out runs/`: Path() drops the '/', and the picture went to runs.png; now one line, exit 2, nothing written."""
    import sys

    from sigmacli.app import main

    for command in (["sample", "--num", "1"], ["reconstruct", "--num", "2"], ["bench-attn"]):
        monkeypatch.setattr(sys, "argv", ["sigma", *command, "--out", f"{tmp_path / 'runs'}/"])
        with pytest.raises(SystemExit) as exit_:
            main()
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and "'runs/' names a folder" in lines[0].replace(str(tmp_path) + "/", ""), lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["runs/", "runs/.", "runs/./", "runs/.."])
def test_a_picture_name_that_ends_as_a_folder_is_refused(name):
    """Path() drops a last '.' as it drops a trailing '/': `--out runs/.` wrote runs.png, `runs/..` a file '...png'."""
    from pathlib import Path

    import typer

    from sigmacli.common import picture_file

    with pytest.raises(typer.BadParameter, match="names a folder"):
        picture_file(name)
    assert picture_file("runs/a") == Path("runs/a") and picture_file("a.png") == Path("a.png")


def test_seed_beyond_64_bits_is_a_usage_error(cli, tmp_path, monkeypatch, capsys):
    import sys

    from sigmacli.app import main

    for seed in (2**64, -(2**63) - 1):
        monkeypatch.setattr(sys, "argv", ["sigma", "sample", "--num", "1", "--seed", str(seed)])
        with pytest.raises(SystemExit) as exit_:
            main()
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and "'--seed'" in lines[0] and "64 bits" in lines[0], lines
    for seed in (2**64 - 1, -(2**63)):  # what torch takes still works
        assert cli("sample", "--num", "1", "--seed", seed, "--out", tmp_path / "s.png").exit_code == 0


TINY_LM = ["--depth", "1", "--context", "16", "--experts", "4", "--top-k", "2", "--steps", "1", "--batch-size", "2",
           "--sample-every", "0"]


def test_lm_widths_rope_or_grouped_mm_cannot_take(cli, tmp_path):
    """Heads of odd size are one line (RoPE turns channel pairs); a width whose rows are not whole 16-byte units
    trains on the sorted loop instead of failing inside torch._grouped_mm, with the same result."""
    from kernels.moe import moe_ffn

    r = cli("train-lm", *TINY_LM, "--width", "6", "--heads", "2", "--out", tmp_path / "odd")
    assert one_line(r, "RoPE needs an even size"), r.stderr
    for width, heads in ((2, 1), (6, 3)):
        r = cli("train-lm", *TINY_LM, "--width", width, "--heads", heads, "--out", tmp_path / f"w{width}")
        assert r.exit_code == 0, r.stderr
    g = torch.Generator().manual_seed(0)
    x, w_in, w_out = (torch.randn(8, 6, generator=g), torch.randn(3, 6, 10, generator=g),
                      torch.randn(3, 5, 6, generator=g))
    idx, gate = torch.randint(0, 3, (8, 2), generator=g), torch.rand(8, 2, generator=g)
    torch.testing.assert_close(moe_ffn(x, w_in, w_out, idx, gate), moe_ffn(x, w_in, w_out, idx, gate, "reference"))
    for args, message in ((("--dim", "6"), "must be multiples of 4 in fp32"),
                          (("--hidden", "12", "--dtype", "bf16"), "must be multiples of 8 in bf16")):
        r = cli("bench-moe", "--tokens", "16", "--repeats", "1", *args)
        assert one_line(r, message), r.stderr


def test_resume_of_a_run_whose_metadata_lacks_parts_is_one_line(cli, tmp_path):
    run = tmp_path / "lm"
    assert cli("train-lm", *TINY_LM, "--width", "16", "--heads", "2", "--out", run).exit_code == 0
    meta = json.loads((run / "sigma.json").read_text())
    for broken, message in (({}, "names no kind of run"),
                            ({"kind": "lm", "step": 1}, "lacks train, stage, data_spec"),
                            ({**meta, "train": {**meta["train"], "bogus": 1}},
                             "has a 'train' this version cannot read"),
                            ({**meta, "stage": [1]}, "has a 'stage' this version cannot read")):
        (run / "sigma.json").write_text(json.dumps(broken))
        r = cli("train-lm", "--out", run, "--resume", "--steps", "2")
        assert one_line(r, message), (broken, r.stderr)
    (run / "sigma.json").write_text(json.dumps(meta))
    state = run / "checkpoint" / "state.json"
    good = json.loads(state.read_text())
    for broken in ({}, {**good, "counters": {}}, {**good, "scalars": None}):
        state.write_text(json.dumps(broken))
        r = cli("train-lm", "--out", run, "--resume", "--steps", "2")
        assert one_line(r, "is incomplete"), (broken, r.stderr)
    state.write_text(json.dumps({**good, "scalars": {"no-index": 1.0}}))
    assert one_line(cli("train-lm", "--out", run, "--resume", "--steps", "2"), "does not fit this run")
    state.write_text(json.dumps(good))
    assert cli("train-lm", "--out", run, "--resume", "--steps", "2").exit_code == 0


def test_a_new_run_into_a_folder_holding_one_fails_before_the_set_up(cli, tmp_path):
    """The check comes first: with a missing tokenizer or data folder as well, the error is about --out (the set-up
    behind it, e.g. loading a tokenizer and its latent statistics, took seconds before the line came)."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.json").write_text("{}")
    missing = str(tmp_path / "missing")
    for args in (("train-imm", "--tokenizer", missing), ("train-tokenizer", "--data", missing),
                 ("train-lm", "--data", missing), ("train-classifier", "--data", missing)):
        r = cli(*args, "--steps", "1", "--out", run)
        assert one_line(r, "already holds a run; pass --resume"), (args, r.stderr)


def test_classifier_resume_with_a_broken_config_is_one_line(cli, tmp_path):
    """As the tokenizer's, LM's and IMM's resumes: the run's config.json is checked (it used to be read as
    defaults, so an empty one resumed a default classifier)."""
    run = tmp_path / "clf"
    assert cli("train-classifier", "--steps", "1", "--batch-size", "8", "--out", run).exit_code == 0
    (run / "config.json").write_text("{}")
    assert one_line(cli("train-classifier", "--out", run, "--resume", "--steps", "2"), "names no model class")


def test_unwritable_output_places_fail_before_the_work(cli, tmp_path, monkeypatch):
    """--out and --save-individual in a folder this user cannot write: one line, before any work or file. (Tests
    run as root here, whom os.access never refuses, so the refusal is simulated for one folder.)"""
    import sigmacli.common

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(sigmacli.common.os, "access", lambda p, mode: (str(p) != str(locked) or not mode & os.W_OK)
                        and real_access(p, mode))  # locked: readable and searchable, not writable
    for args in (("sample", "--num", "2", "--out", locked / "x.png"),
                 ("sample", "--num", "2", "--out", tmp_path / "x.png", "--save-individual", locked / "new" / "each"),
                 ("train-classifier", "--steps", "1", "--out", locked / "run"),
                 ("bench-attn", "--out", locked / "plot.png")):
        r = cli(*args)
        assert r.exit_code == 1 and "cannot write into" in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert list(locked.iterdir()) == [] and not (tmp_path / "x.png").exists()


def test_a_fifo_named_config_json_is_refused_not_read(tmp_path):
    """A FIFO where a model's config.json goes would block the read for ever: one error instead."""
    import threading

    (tmp_path / "m").mkdir()
    fifo = tmp_path / "m" / "config.json"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():  # should the loader read the FIFO after all, feed it after a while: the test fails, not hangs
        if not done.wait(5):
            with open(fifo, "w") as f:
                f.write("{}")

    threading.Thread(target=unblock, daemon=True).start()
    with pytest.raises(SigmaError, match="is not a file"):
        load_model(tmp_path / "m", "classifier")
    done.set()
