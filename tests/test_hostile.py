"""Hostile input, property-based (hypothesis): random and mutated bytes reach the checkpoint loader, the image
loader and the text loader; the only outcomes allowed are a clean load or our one-line error types."""
import json
import shutil

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
