"""`sigma train-imm`, `sigma sample`, `sigma eval` end to end at tiny sizes, and their bad inputs."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import pipelines.train

TINY_DIT = ["--width", "32", "--depth", "1", "--heads", "2", "--batch-size", "8", "--sample-every", "0",
            "--save-every", "2", "--group-size", "4"]


def last_json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny tokenizer and a tiny latent-space IMM run on it, shared by the tests below."""
    from typer.testing import CliRunner

    from sigmacli.app import app

    root = tmp_path_factory.mktemp("imm")
    invoke = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = invoke("train-tokenizer", "--image-size", "16", "--batch-size", "4", "--steps", "2", "--sample-every", "0",
               "--out", root / "tok", "--json")
    assert r.exit_code == 0, r.stderr
    r = invoke("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "3", "--keep-every", "2", "--out", root / "imm",
               "--json")
    assert r.exit_code == 0, r.stderr
    return root, json.loads(r.stdout.strip().splitlines()[-1])


def test_train_imm_writes_a_pipeline_folder(runs, cli):
    root, result = runs
    assert result["steps"] == 3 and result["objective"] == "imm"
    for name in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "tokenizer/config.json", "sigma.json", "samples.png", "metrics.jsonl"):
        assert (root / "imm" / name).exists(), name
    stage = json.loads((root / "imm" / "sigma.json").read_text())["stage"]
    assert stage["optimizer"] == "muon" and stage["cfg_scale"] == 3.0 and stage["fm_fraction"] == 0  # the defaults
    assert stage["groups"] == "complete" and stage["label_dropout"] == 0.1 and stage["start_time"] == 0.95
    assert stage["midpoint"] == 0.6
    sched = json.loads((root / "imm" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["start_time"] == 0.95 and sched["midpoint"] == 0.6
    index = json.loads((root / "imm" / "model_index.json").read_text())  # the sampling defaults, for diffusers users
    assert (index["default_steps"], index["guidance_scale"], index["guidance_scale_one_step"]) == (2, 3.0, None)
    info = last_json(cli("info", root / "imm", "--json"))
    assert info["kind"] == "imm" and info["step"] == 3 and info["config"]["space"] == "latent"
    snapshot = root / "imm" / "snapshots" / "step-0000002"  # --keep-every 2: a pipeline folder of step 2
    assert last_json(cli("info", snapshot, "--json"))["step"] == 2
    assert not (snapshot / "checkpoint").exists() and (snapshot / "scheduler" / "scheduler_config.json").exists()


def test_sample_checks_where_it_writes_before_the_work(runs, cli, tmp_path):
    """--out: a folder or another picture format is one error line and nothing written; a name without a picture
    suffix gets .png. --save-individual naming a file fails before the grid is written."""
    root, _ = runs
    args = ("sample", "--model", root / "imm", "--num", "2", "--steps", "1")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    for extra, message in ((("--out", tmp_path / "folder"), "is a folder"),
                           (("--out", tmp_path / "x.jpg"), "images are written as PNG"),
                           (("--out", tmp_path / "g.png", "--save-individual", tmp_path / "a-file"), "is a file"),
                           (("--out", tmp_path / "g.png", "--save-individual", tmp_path / "new" / ".." / "a-file"), "is a file")):
        r = cli(*args, *extra)
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder"]
    assert last_json(cli(*args, "--out", tmp_path / "grid.v2", "--json"))["picture"] == str(tmp_path / "grid.v2.png")


def test_sample_writes_a_grid_deterministically(runs, cli, tmp_path):
    root, _ = runs
    args = ("sample", "--model", root / "imm", "--num", "6", "--steps", "2", "--json")
    a = last_json(cli(*args, "--out", tmp_path / "a.png", "--save-individual", tmp_path / "each"))
    last_json(cli(*args, "--out", tmp_path / "b.png"))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert len(list((tmp_path / "each").glob("*.png"))) == 6
    assert a["labels"] == [0, 1, 2, 3, 4, 5]
    c = last_json(cli("sample", "--model", root / "imm", "--num", "4", "--class-label", "star", "--sampler", "restart",
                      "--steps", "3", "--out", tmp_path / "c.png", "--json"))
    assert c["labels"] == [5, 5, 5, 5] and Image.open(tmp_path / "c.png").size[0] > 16
    assert a["times"] == pytest.approx([0.95, 0.6, 0.006])  # the run's start time and midpoint (IMM: 0.95 and 0.6)
    last_json(cli("sample", "--model", root / "imm" / "snapshots" / "step-0000002", "--num", "2", "--out", tmp_path / "s.png",
                  "--json"))  # a snapshot samples like the run
    m = last_json(cli(*args, "--midpoint", "0.65", "--out", tmp_path / "m.png"))
    assert m["times"] == pytest.approx([0.95, 0.65, 0.006])
    st = last_json(cli(*args, "--start-time", "0.9", "--midpoint", "0.6", "--out", tmp_path / "st.png"))
    assert st["times"] == pytest.approx([0.9, 0.6, 0.006])
    early = last_json(cli(*args, "--start-time", "0.5", "--out", tmp_path / "e.png"))  # before the run's midpoint:
    assert early["times"] == pytest.approx([0.5, 0.253, 0.006])  # uniform from there


def test_a_pipeline_folder_without_sigma_json_samples_with_the_runs_defaults(runs, cli, tmp_path):
    """IMMPipeline.save_pretrained writes no sigma.json: sigma sample reads the run's steps and guidance from
    model_index.json, so the copy draws what the run draws."""
    from pipelines.imm.pipeline import IMMPipeline

    root, _ = runs
    IMMPipeline.from_pretrained(root / "imm", low_cpu_mem_usage=False).save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy" / "sigma.json").exists()
    args = ("sample", "--num", "2", "--out", tmp_path / "x.png", "--json")
    run, copy = (last_json(cli(*args, "--model", folder)) for folder in (root / "imm", tmp_path / "copy"))
    assert (copy["steps"], copy["cfg"]) == (run["steps"], run["cfg"]) == (2, 3.0)
    assert last_json(cli(*args, "--model", tmp_path / "copy", "--steps", "1"))["cfg"] == 3.0  # no 1-step value: --cfg


def test_compiled_training_matches_eager(runs, cli, tmp_path, monkeypatch):
    """--compile compiles the network and, in latent space, the frozen tokenizer's encoder: the same losses."""
    monkeypatch.setenv("SIGMA_COMPILE_BACKEND", "aot_eager")  # traces like inductor, without its C++ build
    compiled_names, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_names.append(getattr(fn, "__name__", type(fn).__name__))
                        or compile(fn, **kw))
    root, _ = runs
    eager, compiled = (last_json(cli("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "3", *flags,
                                     "--out", tmp_path / f"run{len(flags)}", "--json"))["final_loss"]
                       for flags in ((), ("--compile",)))
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert compiled_names == ["encode", "DiT"]  # the frozen encoder, then the network


def test_resume_extends_a_run(runs, cli, tmp_path):
    """(Exactness of --resume is tested on the task in test_imm.py; here the CLI path.)"""
    root, _ = runs
    last_json(cli("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "2", "--out", tmp_path / "r", "--json"))
    r = last_json(cli("train-imm", "--resume", "--steps", "4", "--keep-every", "1", "--out", tmp_path / "r", "--json"))
    assert r["resumed_from"] == 2 and r["steps"] == 4
    assert json.loads((tmp_path / "r" / "sigma.json").read_text())["step"] == 4
    # --keep-every applies on --resume (to watch a long run from where it is): steps 3 and 4, not before
    assert sorted(p.name for p in (tmp_path / "r" / "snapshots").iterdir()) == ["step-0000003", "step-0000004"]
    assert "note:" not in cli("train-imm", "--resume", "--steps", "5", "--out", tmp_path / "r").stderr
    # options a resume does not take are named, not dropped silently; the run goes on as it was configured
    r = cli("train-imm", "--resume", "--steps", "6", "--start-time", "0.8", "--cfg", "2", "--out", tmp_path / "r", "--json")
    assert r.exit_code == 0 and last_json(r)["steps"] == 6
    assert "ignored: --cfg, --start-time" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert json.loads((tmp_path / "r" / "sigma.json").read_text())["stage"]["start_time"] == 0.95
    for step, device in ((7, "cpu"), (8, "auto")):  # --device applies on resume when given, auto included
        assert last_json(cli("train-imm", "--resume", "--steps", step, "--device", device, "--out", tmp_path / "r", "--json"))
        assert json.loads((tmp_path / "r" / "sigma.json").read_text())["train"]["device"] == device
    # a resume that fails after naming ignored options shows its error alone
    r = cli("train-imm", "--resume", "--steps", "8", "--cfg", "2", "--out", tmp_path / "r")
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"error: '{tmp_path / 'r'}' is already at step 8; pass --steps above 8 to continue"], r.stderr


def test_resume_without_out_finds_the_default_folder_silently(runs, cli, tmp_path, monkeypatch):
    """--objective flow-matching chose runs/fm; on --resume without --out it is not an ignored option. Its progress
    bar is named for the objective (it said imm)."""
    from rich.progress import Progress

    root, _ = runs
    monkeypatch.chdir(tmp_path)
    # the bar's name as given to rich, not as rendered (FORCE_COLOR or a narrow COLUMNS changes the rendering)
    names, add_task = [], Progress.add_task
    monkeypatch.setattr(Progress, "add_task", lambda self, description, *a, **kw: names.append(description) or add_task(self, description, *a, **kw))
    r = cli("train-imm", "--objective", "flow-matching", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "2", "--sample-every", "0")
    assert r.exit_code == 0 and names == ["flow-matching"], (names, r.stderr)
    r = cli("train-imm", "--objective", "flow-matching", "--resume", "--steps", "3", "--json")
    assert last_json(r)["steps"] == 3 and (tmp_path / "runs" / "fm").is_dir() and not r.stderr.strip(), r.stderr


def test_bf16_precision_trains_on_the_cpu_and_is_kept_on_resume(runs, cli, tmp_path, monkeypatch):
    root, _ = runs
    monkeypatch.setitem(pipelines.train._slowdown, torch.bfloat16, 80.0)  # a CPU without native bf16: one warning
    out = cli("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "2", "--precision", "bf16",
              "--out", tmp_path / "b", "--json")
    r = last_json(out)
    assert r["final_loss"] == r["final_loss"] and r["final_loss"] > 0  # finite
    assert [line for line in out.stderr.splitlines() if "bf16" in line] == [
        "warning: this CPU multiplies bf16 matrices 80x slower than fp32 (no native bf16 arithmetic), so --precision "
        "bf16 runs far slower here than fp32"]
    meta = lambda: json.loads((tmp_path / "b" / "sigma.json").read_text())  # noqa: E731
    assert meta()["train"]["precision"] == "bf16"
    monkeypatch.setitem(pipelines.train._slowdown, torch.bfloat16, 0.4)  # native bf16 (faster than fp32): nothing said
    out = cli("train-imm", "--resume", "--steps", "3", "--out", tmp_path / "b", "--json")
    last_json(out)
    assert meta()["train"]["precision"] == "bf16" and meta()["step"] == 3 and "bf16" not in out.stderr


def test_muon_trains_and_is_kept_on_resume(runs, cli, tmp_path):
    root, _ = runs
    last_json(cli("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "2", "--optimizer", "muon",
                  "--muon-lr-scale", "5", "--fm-fraction", "0.5", "--groups", "sorted", "--label-dropout", "0.2",
                  "--s-grid", "2", "--out", tmp_path / "m", "--json"))
    meta = lambda: json.loads((tmp_path / "m" / "sigma.json").read_text())  # noqa: E731
    assert meta()["stage"]["optimizer"] == "muon" and meta()["stage"]["muon_lr_scale"] == 5
    assert meta()["stage"]["fm_fraction"] == 0.5  # with velocity groups too (kept on resume like the rest)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    r = last_json(cli("train-imm", "--resume", "--steps", "3", "--out", tmp_path / "m", "--json"))
    assert r["resumed_from"] == 2 and meta()["stage"]["optimizer"] == "muon" and lrs
    assert meta()["stage"]["groups"] == "sorted" and meta()["stage"]["label_dropout"] == 0.2  # not today's defaults: a run keeps its own
    assert meta()["schedule"]["s_grid"] == 2


def test_init_starts_a_new_run_from_another_runs_weights(runs, cli, tmp_path):
    """--init (e.g. IMM from a flow-matching run): the network, tokenizer and latent statistics come from it;
    at lr 0 the new run's sampling weights are exactly the ones it started from."""
    from safetensors.torch import load_file

    root, _ = runs
    small = TINY_DIT[6:]  # all but --width/--depth/--heads, which come from the run
    last_json(cli("train-imm", "--init", root / "imm", *small, "--steps", "2", "--lr", "0", "--out", tmp_path / "i", "--json"))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(root / "imm" / weights), load_file(tmp_path / "i" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "i" / "sigma.json").read_text())
    assert meta["stage"]["init"] == str(root / "imm") and meta["step"] == 2
    assert (json.loads((tmp_path / "i" / "transformer/config.json").read_text())["width"] == 32)
    r = last_json(cli("train-imm", "--init", root / "imm", *small, "--steps", "2", "--objective", "flow-matching",
                      "--out", tmp_path / "f", "--json"))
    assert r["objective"] == "flow-matching" and r["final_loss"] > 0


def test_a_folders_classes_must_match_the_runs_for_init_and_resume(cli, tmp_path):
    """The model's label i is the data's class i: --init from a run on other classes of the same count takes the
    data's names (it kept the old names on other pictures) and of another count is one line; a resume after a class
    folder was added (it sent a class to the null label) is one line."""
    def folder(name, classes):
        for c, cls in enumerate(classes):
            (tmp_path / name / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (100 * c, 50 * i, 0)).save(tmp_path / name / cls / f"{i}.png")
        return tmp_path / name
    zoo, other = folder("zoo", ["ant", "cow"]), folder("other", ["ant", "cat"])
    run = tmp_path / "run"
    last_json(cli("train-imm", "--space", "pixels", "--image-size", "16", "--data", zoo, *TINY_DIT, "--steps", "1",
                  "--out", run, "--json"))
    # --init onto other classes of the same count is fine-tuning: label i keeps its index, the names become the data's
    r = cli("train-imm", "--init", run, "--data", other, *TINY_DIT[6:], "--steps", "1", "--out", tmp_path / "i")
    assert r.exit_code == 0 and "note: --init" in r.stderr and "[ant, cat]" in r.stderr, r.stderr
    assert json.loads((tmp_path / "i" / "transformer" / "config.json").read_text())["class_names"] == ["ant", "cat"]
    assert last_json(cli("sample", "--model", tmp_path / "i", "--num", "2", "--class-label", "cat", "--out",
                         tmp_path / "cat.png", "--json"))["labels"] == [1, 1]
    r = cli("train-imm", "--init", run, "--data", folder("three", ["a", "b", "c"]), *TINY_DIT[6:], "--steps", "1",
            "--out", tmp_path / "j")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "knows 2 classes [ant, cow]" in lines[0] and "3 [a, b, c]" in lines[0], r.stderr
    (zoo / "bee").mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(zoo / "bee" / "0.png")
    r = cli("train-imm", "--out", run, "--resume", "--steps", "2")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "[ant, bee, cow]" in lines[0], r.stderr


def test_a_note_when_the_data_is_not_what_the_tokenizer_was_trained_on(runs, cli, tmp_path):
    root, _ = runs  # the fixture's tokenizer was trained on shapes
    for c in ("ant", "cow"):
        (tmp_path / "pics" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (90 * i, 0, 200)).save(tmp_path / "pics" / c / f"{i}.png")
    args = ("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "1")
    r = cli(*args, "--data", tmp_path / "pics", "--out", tmp_path / "a")
    assert r.exit_code == 0 and f"note: the tokenizer '{root / 'tok'}' was trained on 'shapes'" in r.stderr, r.stderr
    r = cli(*args, "--out", tmp_path / "b")
    assert r.exit_code == 0 and "was trained on" not in r.stderr, r.stderr


def test_class_labels_with_commas_and_digit_like_characters():
    from pipelines.errors import SigmaError
    from sigmacli.imm import parse_labels

    names = ["tench, Tinca tinca", "goldfish", " padded "]
    assert parse_labels(["tench, Tinca tinca"], names, 2).tolist() == [0, 0]  # a folder's name, comma and all
    assert parse_labels(["goldfish,0", " padded "], names, 3).tolist() == [1, 0, 2]
    with pytest.raises(SigmaError, match="unknown class label '²'"):  # (was int('²'): a ValueError's traceback)
        parse_labels(["²"], names, 1)


def test_pixel_space_and_flow_matching_and_clips(cli, tmp_path):
    r = last_json(cli("train-imm", "--space", "pixels", "--image-size", "16", *TINY_DIT, "--steps", "2",
                      "--objective", "flow-matching", "--out", tmp_path / "fm", "--json"))
    assert r["objective"] == "flow-matching"
    s = last_json(cli("sample", "--model", tmp_path / "fm", "--num", "4", "--steps", "3", "--out", tmp_path / "fm.png", "--json"))
    assert s["sampler"] == "euler" and s["cfg"] == 1.5  # each objective's guidance default (IMM: 3, below)
    assert s["times"][0] == pytest.approx(0.994)  # flow matching starts at T (IMM: 0.95)
    last_json(cli("train-imm", "--space", "pixels", "--data", "moving-shapes", "--frames", "4", "--image-size", "16",
                  *TINY_DIT, "--steps", "2", "--cfg-one-step", "1.5", "--out", tmp_path / "clip", "--json"))
    s = last_json(cli("sample", "--model", tmp_path / "clip", "--num", "2", "--out", tmp_path / "clip.png", "--json"))
    assert s["picture"].endswith(".gif") and Image.open(s["picture"]).n_frames == 4 and s["cfg"] == 3.0
    one = lambda *a: last_json(cli("sample", "--model", tmp_path / "clip", "--num", "2", "--steps", "1", *a,  # noqa: E731
                                   "--out", tmp_path / "one.png", "--json"))["cfg"]
    assert one() == 1.5 and one("--cfg", "2") == 2.0  # the run's 1-step guidance; --cfg still wins


def test_align_teacher_adds_the_repa_loss(runs, cli, tmp_path):
    root, _ = runs
    teacher = tmp_path / "teacher"
    last_json(cli("train-classifier", "--image-size", "16", "--steps", "2", "--batch-size", "4", "--out", teacher, "--json"))
    last_json(cli("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "2", "--align-teacher", teacher,
                  "--align-depth", "1", "--out", tmp_path / "a", "--json"))
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["align"] <= 2 for m in logged)
    assert json.loads((tmp_path / "a" / "transformer" / "config.json").read_text())["align_dim"] == 128
    s = last_json(cli("sample", "--model", tmp_path / "a", "--num", "2", "--out", tmp_path / "a.png", "--json"))
    assert Path(s["picture"]).exists()
    for args, message in (((teacher.parent / "nope",), "does not exist"), ((root / "tok",), "needs a classifier model"),
                          ((teacher, "--align-depth", "5"), "--align-depth must be between 1 and --depth 1")):
        r = cli("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "1", "--align-teacher", *args,
                "--out", tmp_path / "bad")
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_inputs_fail_with_one_line(runs, cli, tmp_path, monkeypatch):
    root, _ = runs
    (tmp_path / "a.png").write_bytes(b"")  # a file where a folder goes
    cases = [
        (("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "1", "--out", tmp_path / "a.png"),
         "'" + str(tmp_path / "a.png") + "' is a file, where a folder is needed"),
        (("sample", "--model", root / "imm", "--num", "2", "--save-individual", tmp_path / "a.png", "--out", tmp_path / "g.png"),
         "is a file, where a folder is needed"),
        (("info", tmp_path / ("a" * 300) / "run"), "File name too long"),
        (("train-imm", "--space", "pixels", "--attn", "mta", "--heads", "1", "--width", "32", "--out", tmp_path / "s"),
         "MTA: 1 heads do not split into head groups of 2"),  # the error path itself must not raise
        (("sample", "--model", root / "tok"), "holds a tokenizer model, but this needs an imm model"),
        (("sample", "--model", root / "imm", "--steps", "0"), "--steps must be"),
        (("sample", "--model", root / "imm", "--class-label", "dragon"), "unknown class label 'dragon'"),
        (("sample", "--model", root / "imm", "--steps", "4", "--midpoint", "0.6"), "it needs --steps 2, not 4"),
        (("train-imm", "--init", root / "tok", "--out", tmp_path / "i1"), "holds a tokenizer model, but this needs an imm model"),
        (("train-imm", "--init", root / "imm", "--tokenizer", root / "tok", "--out", tmp_path / "i2"), "leave out --tokenizer"),
        (("train-imm", "--init", root / "imm", "--width", "64", "--out", tmp_path / "i3"), "leave out --width"),
        (("train-imm", "--init", root / "imm", "--resume", "--out", root / "imm"), "pass one of them"),
        (("eval", "--model", root / "imm", "--steps", "2", "--midpoint", "1.5"), "--midpoint must lie between eps"),
        (("sample", "--model", root / "imm", "--start-time", "0.999"), "--start-time must lie in (eps 0.006, T 0.994]"),
        (("train-imm", "--tokenizer", root / "tok", "--midpoint", "0.97", "--steps", "1", "--out", tmp_path / "m"),
         "--midpoint must lie between eps 0.006 and the start 0.95"),
        (("sample", "--model", tmp_path / "nothing"), "does not exist"),
        (("sample", "--model", root / "imm" / "transformer"), "is the transformer of an IMM run; pass the run folder"),
        (("train-imm", "--space", "pixels", "--image-size", "18", "--steps", "1", "--out", tmp_path / "x"), "not divisible"),
        (("train-imm", "--space", "pixels", "--cube", "1x3x3", "--steps", "1", "--out", tmp_path / "y"), "not divisible by --cube"),
        (("train-imm", "--tokenizer", root / "tok", "--batch-size", "6", "--steps", "1", "--out", tmp_path / "z"), "divisible"),
        (("train-imm", "--tokenizer", root / "imm", "--steps", "1", "--out", tmp_path / "w"), "holds an imm model"),
        (("train-imm", "--tokenizer", root / "tok", "--steps", "0", "--out", tmp_path / "v"), "at least 1"),
        (("train-imm", "--tokenizer", root / "tok", "--precision", "fp64", "--steps", "1", "--out", tmp_path / "t"),
         "--precision must be one of auto, fp32, bf16"),
        (("train-imm", "--tokenizer", root / "tok", "--data", "moving-shapes", "--frames", "8", "--out", tmp_path / "u"),
         "encodes 1-frame 16px data"),
        (("train-imm", "--tokenizer", root / "tok", "--optimizer", "sgd", "--out", tmp_path / "s"), "--optimizer must be one of adamw, muon"),
        (("train-imm", "--tokenizer", root / "tok", "--groups", "mixed", "--out", tmp_path / "s"), "--groups must be one of sorted, complete"),
        (("train-imm", "--tokenizer", root / "tok", "--objective", "flow-matching", "--fm-fraction", "0.2", "--out", tmp_path / "s"),
         "--fm-fraction needs --objective imm"),
        (("train-imm", "--tokenizer", root / "tok", "--fm-fraction", "1", "--out", tmp_path / "s"), "--fm-fraction must be in [0, 1)"),
        (("train-imm", "--tokenizer", root / "tok", "--optimizer", "muon", "--muon-lr-scale", "0", "--out", tmp_path / "s"),
         "--muon-lr-scale must be > 0"),
        (("train-imm", "--tokenizer", root / "tok", "--s-grid", "-1", "--out", tmp_path / "s"), "--s-grid must be >= 0, not -1"),
        (("train-imm", "--tokenizer", root / "tok", "--weight-a", "3", "--out", tmp_path / "s"), "--weight-a (the a of w(s,t)'s"),
        (("train-imm", "--tokenizer", root / "tok", "--decrement-k", "0", "--out", tmp_path / "s"), "--decrement-k (r's decrement"),
        (("train-imm", "--tokenizer", root / "tok", "--objective", "flow-matching", "--s-grid", "2", "--out", tmp_path / "s"),
         "--s-grid picks IMM's s"),
        (("train-imm", "--tokenizer", root / "tok", "--lr", "-1", "--out", tmp_path / "s"), "--lr must be a finite number >= 0"),
        (("train-imm", "--tokenizer", root / "tok", "--depth", "0", "--out", tmp_path / "s"), "--depth 0: must be at least 1"),
        (("sample", "--model", root / "imm" / "sigma.json"), "is a file; a model is a folder"),
        (("train-imm", "--tokenizer", root / "tok", "--ema", "2", "--out", tmp_path / "s"), "--ema must be in [0, 1)"),
        (("sample", "--model", root / "imm", "--cfg", "nan"), "--cfg must be a number"),
        (("eval", "--model", root / "imm", "--cfg", "inf"), "--cfg must be a number"),
        (("train-imm", "--tokenizer", root / "tok", "--cfg-one-step", "nan", "--out", tmp_path / "s"), "--cfg-one-step must be a number"),
        (("train-imm", "--space", "pixels", "--image-size", "0", "--out", tmp_path / "s"), "--image-size must be at least 8"),
        (("train-tokenizer", "--frames", "0", "--out", tmp_path / "s"), "--frames must be at least 1"),
        (("train-imm", "--tokenizer", root / "tok", "--sample-every", "-1", "--out", tmp_path / "s"), "--sample-every must be >= 0"),
        (("train-tokenizer", "--resume", "--out", root / "imm"), "holds an imm run, not a tokenizer run"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code == 1, (args, r.stdout)
        assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "t").exists()  # a bad --precision is caught before the run folder is made
    monkeypatch.setenv("SIGMA_COMPILE_BACKEND", "bogus")
    r = cli("sample", "--model", root / "imm", "--compile", "--num", "2", "--out", tmp_path / "c.png")
    assert r.exit_code == 1 and "is not a torch.compile backend" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_shipped_model_samples_with_no_options(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = last_json(cli("sample", "--num", "8", "--json"))
    assert r["steps"] == 2 and (tmp_path / "samples.png").exists()
    assert Image.open(tmp_path / "samples.png").size[0] > 32 * 4


def test_ship_refuses_a_wrong_folder_in_one_line_and_keeps_the_shipped_copy(runs, tmp_path, monkeypatch):
    import checkpoints.ship as ship

    root, _ = runs
    shipped = tmp_path / "shipped-imm"
    shipped.mkdir()
    (shipped / "keep").write_text("x")
    monkeypatch.setitem(ship.SHIPPED, "imm", shipped)
    partial = tmp_path / "partial"  # an IMM pipeline folder without the run's sigma.json: nothing to copy it from
    shutil.copytree(root / "imm", partial, ignore=shutil.ignore_patterns("sigma.json"))
    for wrong, message in [(root / "tok", "holds a tokenizer model, but this needs an imm model"),
                           (tmp_path / "missing", "does not exist"), (partial, "has no sigma.json")]:
        with pytest.raises(SystemExit) as exit_:
            ship.ship(wrong, None)
        assert message in str(exit_.value.code) and "\n" not in str(exit_.value.code)
    assert (shipped / "keep").exists()
    ship.ship(root / "imm", None)  # a real run replaces the copy
    assert not (shipped / "keep").exists() and (shipped / "transformer").is_dir()


def test_eval_reports_fd_floor_and_accuracy(runs, cli):
    root, _ = runs
    from checkpoints import SHIPPED

    r = last_json(cli("eval", "--model", root / "imm", "--num", "12", "--classifier", SHIPPED["classifier"], "--json"))
    assert r["fd"] > 0 and r["fd_real_floor"] >= 0 and 0 <= r["class_accuracy"] <= 1 and r["reference"] == 12
    confusion = torch.tensor(r["confusion"])  # rows: the 12 labels, 2 of each of the 6 classes
    assert confusion.shape == (6, 6) and confusion.sum(1).tolist() == [2] * 6
    assert confusion.diagonal().sum().item() / 12 == pytest.approx(r["class_accuracy"])
    assert list(r["per_class_accuracy"]) == ["circle", "square", "triangle", "ring", "cross", "star"]


def test_eval_maps_the_classifiers_classes_by_name(runs, cli, tmp_path):
    """A model of the shapes classes in another order (a folder's classes are sorted) is scored by class name: the
    same samples, the confusion matrix's columns in the model's order. Other class sets are still refused."""
    import json
    import shutil

    from checkpoints import SHIPPED

    root, _ = runs
    args = ("--num", "12", "--classifier", SHIPPED["classifier"], "--json")
    plain = last_json(cli("eval", "--model", root / "imm", *args))
    shutil.copytree(root / "imm", tmp_path / "imm")
    config = tmp_path / "imm" / "transformer" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["class_names"] = cfg["class_names"][::-1]
    config.write_text(json.dumps(cfg))
    reordered = last_json(cli("eval", "--model", tmp_path / "imm", *args))
    assert list(reordered["per_class_accuracy"]) == ["star", "cross", "ring", "triangle", "square", "circle"]
    assert torch.equal(torch.tensor(reordered["confusion"]), torch.tensor(plain["confusion"]).flip(1))
    assert reordered["fd"] == plain["fd"]
    cfg["class_names"][0] = "comet"
    config.write_text(json.dumps(cfg))
    r = cli("eval", "--model", tmp_path / "imm", "--num", "12", "--classifier", SHIPPED["classifier"])
    assert r.exit_code == 1 and "knows classes" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_latent_cache_on_a_folder_gives_the_same_training(runs, cli, tmp_path):
    """A finite set is encoded once (`--cache-latents`, automatic when the run sees it twice): the loss
    matches per-step encoding; an endless set cannot be cached."""
    import numpy as np

    from pipelines.data import make_dataset

    root, _ = runs
    x, y = make_dataset("shapes", image_size=16).get_batch(torch.arange(24))
    for i, (img, label) in enumerate(zip(x, y.tolist())):
        (tmp_path / "pics" / f"c{label % 2}").mkdir(parents=True, exist_ok=True)
        pixels = ((img[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / "pics" / f"c{label % 2}" / f"{i}.png")
    common = ("train-imm", "--tokenizer", root / "tok", "--data", tmp_path / "pics", *TINY_DIT, "--steps", "6", "--json")
    auto = last_json(cli(*common, "--out", tmp_path / "auto"))
    off = last_json(cli(*common, "--no-cache-latents", "--out", tmp_path / "off"))
    assert auto["latents_cached"] and not off["latents_cached"]
    plain = cli(*common[:-1], "--out", tmp_path / "plain")  # the encoding bar goes to stderr: stdout holds the results
    assert plain.exit_code == 0 and plain.stdout.splitlines()[0].startswith("trained 6 steps"), plain.stdout
    assert "\n\n" not in "\n" + plain.stderr, repr(plain.stderr)  # nor a blank line where the bar was, off a terminal
    assert auto["final_loss"] == pytest.approx(off["final_loss"], rel=1e-5)
    short = ("train-imm", "--tokenizer", root / "tok", "--data", tmp_path / "pics", *TINY_DIT, "--json")
    assert not last_json(cli(*short, "--steps", "2", "--out", tmp_path / "r"))["latents_cached"]  # 16 samples < 2 passes
    assert not last_json(cli(*short, "--steps", "6", "--resume", "--out", tmp_path / "r"))["latents_cached"]  # kept
    assert last_json(cli(*short, "--steps", "8", "--resume", "--cache-latents", "--out", tmp_path / "r"))["latents_cached"]
    r = cli("eval", "--model", tmp_path / "auto", "--num", "8")  # 24 pictures hold out 2: too few for an FD
    assert r.exit_code == 1 and "held-out split" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("train-imm", "--tokenizer", root / "tok", "--cache-latents", "--steps", "1", "--out", tmp_path / "endless")
    assert r.exit_code == 1 and "needs a finite data set" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "endless").exists()


def test_a_slow_bf16_warning_comes_before_the_latents_are_encoded(runs, cli, tmp_path, monkeypatch):
    """The CLI holds notes until training starts; encoding a cached set in bf16 on a CPU without native bf16 is the
    slow part, so its warning must be out before it."""
    import pipelines.imm.trainer as imm_trainer
    from pipelines import errors

    root, _ = runs
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save((tmp_path / f"{i}.png"))
    monkeypatch.setitem(pipelines.train._slowdown, torch.bfloat16, 50.0)
    held, encode = [], imm_trainer.encode_dataset
    monkeypatch.setattr(imm_trainer, "encode_dataset", lambda *a, **k: held.append(errors.holding_notes()) or encode(*a, **k))
    r = cli("train-imm", "--tokenizer", root / "tok", "--data", tmp_path, *TINY_DIT, "--steps", "1", "--cache-latents",
            "--precision", "bf16", "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0 and held == [False], (held, r.stderr)
    assert r.stderr.count("warning: this CPU multiplies bf16 matrices 50x slower") == 1, r.stderr


def test_principal_component_latent_space_trains_resumes_and_samples(runs, cli, tmp_path):
    root, _ = runs
    out = tmp_path / "pca"
    last_json(cli("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "2", "--latent-norm", "pca",
                  "--pca-dims", "32", "--pca-whiten", "0", "--out", out, "--json"))
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["latent_pca"] == 32 and config["num_tokens"] == 2 and len(config["latent_std"]) == 32
    last_json(cli("train-imm", "--out", out, "--steps", "3", "--resume", "--json"))  # the basis comes back as a weight
    s = last_json(cli("sample", "--model", out, "--num", "2", "--out", tmp_path / "pca.png", "--json"))
    assert Path(s["picture"]).exists()
    for args, message in ((("--pca-dims", "40"), "--pca-dims must be a multiple of the latent width 16"),
                          (("--pca-dims", "0"), "--pca-dims must be a multiple of the latent width 16"),  # not channel
                          (("--pca-whiten", "2"), "--pca-whiten must be in [0, 1]"),
                          (("--latent-norm", "zca"), "--latent-norm must be token, channel or pca")):
        r = cli("train-imm", "--tokenizer", root / "tok", *TINY_DIT, "--steps", "1", "--latent-norm", "pca", *args,
                "--out", tmp_path / "bad")
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
