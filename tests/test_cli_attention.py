"""`sigma bench-attn` and `sigma train-imm --attn nsa|mta` end to end at tiny sizes."""
import json

import pytest
from PIL import Image

from tests.test_cli_imm import TINY_DIT, last_json


def test_bench_attn_checks_times_and_plots(cli, tmp_path):
    r = cli("bench-attn", "--grid", "1x8x8,2x8x8", "--cube", "1x4x4", "--heads", "2", "--head-dim", "16",
            "--top-n", "1", "--repeats", "1", "--out", tmp_path / "b.png", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["check"]) == {"cpu"} and all(v < 1e-4 for v in res["check"]["cpu"].values())
    assert [row["tokens"] for row in res["rows"]] == [64, 128]
    for row in res["rows"]:
        assert {"sdpa", "nsa-cpu", "nsa-reference"} <= set(row["methods"])
        assert all(e["forward_s"] > 0 and e["forward_backward_s"] > 0 for e in row["methods"].values())
    assert "nsa-cpu" in res["break_even_tokens"]
    assert Image.open(res["plot"]).size[0] > 500


def test_bench_attn_keeps_stdout_for_its_results(cli, tmp_path):
    """Its progress bar goes to stderr, as the trainers' does: stdout holds the table alone (no blank line)."""
    r = cli("bench-attn", "--grid", "1x4x4", "--cube", "1x4x4", "--heads", "2", "--head-dim", "16", "--repeats", "1",
            "--backends", "cpu", "--out", tmp_path / "b.png")
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("check against the reference"), r.stdout
    assert "\n\n" not in "\n" + r.stderr, repr(r.stderr)  # off a terminal the transient bar is not drawn at all


def test_bench_attn_bad_inputs_fail_with_one_line(cli, tmp_path):
    small = ("--grid", "1x4x4", "--cube", "1x4x4", "--heads", "2", "--head-dim", "16", "--repeats", "1")
    for args, message in [(("--grid", "1x6x8", "--cube", "1x4x4"), "not divisible by the cube"),
                          ((*small, "--out", tmp_path), "is a folder; give a file name"),  # the plot: checked first
                          ((*small, "--out", tmp_path / "b.jpg"), "images are written as PNG"),
                          (("--grid", "8x8"), "must look like TxHxW"),
                          (("--dtype", "fp8"), "--dtype must be one of"),
                          (("--backends", "triton"), "not available on cpu"),
                          (("--mta", "--mta-backends", "fused"), "MTA backend 'fused' is unknown"),
                          (("--mta", "--mta-backends", "triton", "--heads", "6"), "power-of-two number of heads")]:
        r = cli("bench-attn", *args)
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("interpret", [None, "false", "0"])
def test_bench_attn_mta_triton_without_a_gpu_is_one_line(cli, tmp_path, monkeypatch, interpret):
    """Compiled Triton needs CUDA: `--mta --mta-backends triton` on a CPU-only machine (no interpreter) died in
    Triton's driver lookup with a traceback, where `--backends triton` (NSA) was already one line. TRITON_INTERPRET
    is read as Triton reads it: "false" is off there, and was taken for on here."""
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as a user's shell has it (conftest sets it)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    r = cli("bench-attn", "--grid", "1x4x4", "--cube", "1x4x4", "--heads", "2", "--head-dim", "16", "--repeats", "1",
            "--mta", "--mta-backends", "triton,cpu", "--device", "cpu", "--out", tmp_path / "b.png")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "MTA backend 'triton' needs a CUDA GPU" in r.stderr and "TRITON_INTERPRET=1" in r.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any timing


def test_train_imm_pixels_with_nsa_trains_and_samples(cli, tmp_path):
    r = last_json(cli("train-imm", "--space", "pixels", "--image-size", "16", "--patch-size", "2", *TINY_DIT,
                      "--attn", "nsa", "--top-n", "1", "--steps", "2", "--out", tmp_path / "nsa", "--json"))
    assert r["steps"] == 2
    cfg = json.loads((tmp_path / "nsa" / "transformer" / "config.json").read_text())
    assert cfg["attn"] == "nsa" and cfg["attn_config"] == {"top_n": 1, "radius": [0, 0, 0]}
    s = last_json(cli("sample", "--model", tmp_path / "nsa", "--num", "4", "--out", tmp_path / "s.png", "--json"))
    assert Image.open(s["picture"]).size[0] > 16
    assert last_json(cli("info", tmp_path / "nsa", "--json"))["parameters"] > 0  # built on the meta device
    r = cli("train-imm", "--space", "pixels", "--attn", "nsa", "--radius", "1x1", "--steps", "1", "--out", tmp_path / "bad")
    assert r.exit_code == 1 and "--radius must look like" in r.stderr


def test_train_imm_with_mta_trains_and_samples(cli, tmp_path):
    r = last_json(cli("train-imm", "--space", "pixels", "--image-size", "16", *TINY_DIT, "--depth", "2",
                      "--attn", "mta", "--kq-every", "2", "--steps", "2", "--out", tmp_path / "mta", "--json"))
    assert r["steps"] == 2
    cfg = json.loads((tmp_path / "mta" / "transformer" / "config.json").read_text())
    assert cfg["attn"] == "mta" and cfg["attn_config"] == {"kq_every": 2}
    last_json(cli("sample", "--model", tmp_path / "mta", "--num", "2", "--out", tmp_path / "m.png", "--json"))


def test_bench_attn_with_mta(cli, tmp_path):
    r = cli("bench-attn", "--grid", "1x4x4", "--cube", "1x4x4", "--heads", "2", "--head-dim", "16", "--top-n", "1",
            "--repeats", "1", "--mta", "--mta-kernel", "2x3", "--mta-backends", "triton,cpu,reference", "--backends", "cpu",
            "--out", tmp_path / "b.png", "--json")  # triton: interpreted here
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    for b in ("mta-cpu", "mta-triton"):
        assert res["check"][b]["o"] < 1e-5 and res["check"][b]["dparams"] < 1e-5
    assert {"mta-triton", "mta-cpu", "mta-reference"} <= set(res["rows"][0]["methods"])


def test_bench_attn_default_mta_backends_on_cuda_only_take_the_kernel_where_it_fits():
    """On CUDA the default MTA backends held the fused kernel whatever the heads: `bench-attn --mta --heads 6` then
    stopped in the kernel's shape check with a traceback (the NSA kernel's shapes are checked up front)."""
    from kernels.bench_attn import available_mta_backends

    assert available_mta_backends("cuda", 8, 64) == ["triton", "cpu", "reference"]
    assert available_mta_backends("cuda", 6, 64) == available_mta_backends("cuda", 8, 24) == ["cpu", "reference"]
    assert available_mta_backends("cpu", 8, 64) == ["cpu", "reference"]
