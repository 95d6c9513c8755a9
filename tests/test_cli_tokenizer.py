"""`sigma` end to end at tiny sizes: train-tokenizer, reconstruct, info, resume, torchrun, bad inputs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

TINY = ["--image-size", "16", "--batch-size", "4", "--sample-every", "0", "--save-every", "2"]
SIGMA = [sys.executable, "-m", "sigmacli"]


def last_json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny tokenizer run shared by the tests below."""
    from typer.testing import CliRunner

    from sigmacli.app import app

    out = tmp_path_factory.mktemp("runs") / "tok"
    r = CliRunner().invoke(app, ["train-tokenizer", *TINY, "--steps", "3", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


def test_train_writes_weights_pictures_and_metadata(trained):
    out, result = trained
    assert result["steps"] == 3
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "sigma.json", "metrics.jsonl", "recon.png"):
        assert (out / name).exists(), name
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    assert Image.open(out / "recon.png").size[0] > 16


def test_info_reads_metadata(trained, cli):
    out, _ = trained
    info = last_json(cli("info", out, "--json"))
    assert info["kind"] == "tokenizer" and info["step"] == 3 and info["data"] == "shapes"
    assert info["parameters"] > 100_000 and info["config"]["image_size"] == 16


def test_reconstruct_reports_psnr_and_picture(trained, cli, tmp_path):
    out, _ = trained
    result = last_json(cli("reconstruct", "--model", out, "--num", "8", "--out", tmp_path / "r.png", "--json"))
    assert 0 < result["psnr"] < 60 and -1 <= result["ssim"] <= 1 and result["num"] == 8
    assert Image.open(tmp_path / "r.png").size[0] > 32
    result = last_json(cli("reconstruct", "--model", out, "--num", "8", "--grid", "0", "--probe", "--json"))
    assert 0 <= result["probe_accuracy"] <= 1 and result["num_classes"] == 6 and result["picture"] is None
    # --spectrum needs a classifier of the tokenizer's image size (the shipped one reads 32 px, this one makes 16)
    r = cli("reconstruct", "--model", out, "--num", "8", "--grid", "0", "--spectrum")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1 and "32 px" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_reconstruct_spectrum_on_the_shipped_tokenizer(cli, tmp_path, monkeypatch):
    from checkpoints import SHIPPED

    monkeypatch.chdir(tmp_path)  # no runs/tokenizer here: the default --model is the shipped tokenizer
    result = last_json(cli("reconstruct", "--num", "16", "--grid", "0", "--spectrum", "--json"))
    assert result["model"] == str(SHIPPED["tokenizer"])
    assert f"tokenizer: {SHIPPED['tokenizer']} (the default" in cli("reconstruct", "--num", "2", "--grid", "0").stdout
    assert 0.5 <= result["spectrum_all"] <= 1 and result["spectrum_num_train"] == 4000
    assert {"spectrum_32", "spectrum_256"} <= result.keys() and "spectrum_512" not in result


def test_resume_continues_the_run(trained, cli, tmp_path):
    out, _ = trained
    run = tmp_path / "tok"
    shutil.copytree(out, run)
    result = last_json(cli("train-tokenizer", "--out", run, "--resume", "--steps", "5", "--json"))
    assert result["resumed_from"] == 3 and result["steps"] == 5
    assert json.loads((run / "sigma.json").read_text())["step"] == 5


def test_finetune_decoder_stage(trained, cli, tmp_path):
    out, _ = trained
    result = last_json(cli("train-tokenizer", "--finetune-decoder", "--init", out, "--steps", "2",
                           "--batch-size", "4", "--sample-every", "0", "--out", tmp_path / "ft", "--json"))
    assert result["steps"] == 2
    meta = json.loads((tmp_path / "ft" / "sigma.json").read_text())
    assert meta["stage"]["finetune_decoder"] and meta["stage"]["init_from"] == str(out)


def test_the_seed_fixes_the_initial_weights(cli, tmp_path):
    from safetensors.torch import load_file

    def weights(name, seed):
        last_json(cli("train-tokenizer", *TINY, "--steps", "1", "--seed", seed, "--out", tmp_path / name, "--json"))
        return load_file(tmp_path / name / "diffusion_pytorch_model.safetensors")

    a, b, c = weights("a", 3), weights("b", 3), weights("c", 4)
    assert all((a[k] == b[k]).all() for k in a) and any((a[k] != c[k]).any() for k in a)


def test_init_keeps_its_architecture_and_resume_its_kind(trained, cli, tmp_path):
    out, _ = trained
    for args, message in [(["--init", out, "--image-size", "32"], "--init takes the architecture from"),
                          (["--finetune-decoder", "--init", out, "--frames", "4"], "leave out --frames 4")]:
        r = cli("train-tokenizer", *args, "--steps", "1", "--batch-size", "4", "--out", tmp_path / "x")
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and message in lines[0], r.stderr
    for command in ("train-imm", "train-lm", "train-classifier"):  # a tokenizer run is no other kind's run
        r = cli(command, "--resume", "--out", out)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and "holds a tokenizer run, not a" in lines[0], r.stderr


def test_unwritable_outputs_are_one_line_and_pictures_are_readable(trained, cli, tmp_path):
    out, _ = trained
    (tmp_path / "file").write_text("x")
    r = cli("reconstruct", "--model", out, "--num", "2", "--out", tmp_path / "file" / "r.png")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.stderr and "file" in lines[0], r.stderr
    old = os.umask(0o022)
    try:
        assert cli("reconstruct", "--model", out, "--num", "2", "--out", tmp_path / "r.png").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "r.png").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    mask = os.umask(0)
    os.umask(mask)  # the weights, written by the fixture under this process's umask, have a plain file's mode
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_warm_start_with_a_feature_teacher(trained, cli, tmp_path):
    out, _ = trained
    teacher = tmp_path / "teacher"
    last_json(cli("train-classifier", "--image-size", "16", "--steps", "2", "--batch-size", "4", "--out", teacher, "--json"))
    run = tmp_path / "warm"
    result = last_json(cli("train-tokenizer", "--init", out, "--feature-teacher", teacher, "--steps", "2",
                           "--batch-size", "4", "--finetune-tail", "0", "--sample-every", "0", "--out", run, "--json"))
    assert result["steps"] == 2
    meta = json.loads((run / "sigma.json").read_text())
    assert meta["stage"]["feature_teacher"] == str(teacher) and meta["stage"]["init_from"] == str(out)
    assert json.loads((run / "config.json").read_text())["feature_dim"] == 128  # the teacher's feature width
    assert all("feature" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    # a teacher that is not a classifier: one line
    r = cli("train-tokenizer", "--feature-teacher", out, *TINY, "--steps", "1", "--out", tmp_path / "bad")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "holds a tokenizer model, but this needs a classifier model" in r.stderr, r.stderr
    # a teacher of another size than the --init tokenizer: refused as for a fresh run (it used to train, resizing)
    big = tmp_path / "teacher32"
    last_json(cli("train-classifier", "--image-size", "32", "--steps", "1", "--batch-size", "2", "--out", big, "--json"))
    r = cli("train-tokenizer", "--init", out, "--feature-teacher", big, "--steps", "1", "--out", tmp_path / "bad32")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--feature-teacher was trained at 32 px, the tokenizer at 16" in r.stderr and not (tmp_path / "bad32").exists()


def test_video_and_image_folder_runs(cli, tmp_path):
    clips = last_json(cli("train-tokenizer", "--data", "moving-shapes", "--frames", "4", *TINY, "--steps", "2",
                          "--out", tmp_path / "vid", "--json"))
    assert clips["pictures"].endswith(".gif")
    rec = last_json(cli("reconstruct", "--model", tmp_path / "vid", "--num", "4", "--out", tmp_path / "v.png", "--json"))
    assert rec["picture"].endswith(".gif")
    folder = tmp_path / "imgs"
    for cls in ("cats", "dogs"):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20 + i, 24), (40 * i, 100, 200 if cls == "cats" else 20)).save(folder / cls / f"{i}.png")
    last_json(cli("train-tokenizer", "--data", folder, *TINY, "--steps", "2", "--bottleneck", "vae",
                  "--out", tmp_path / "fold", "--json"))
    assert json.loads((tmp_path / "fold" / "config.json").read_text())["bottleneck"] == "vae"
    assert last_json(cli("reconstruct", "--model", tmp_path / "fold", "--num", "4", "--out", tmp_path / "f.png", "--json"))["psnr"] > 0
    from checkpoints import SHIPPED  # the shapes classifier cannot score cats and dogs

    r = cli("reconstruct", "--model", SHIPPED["imm"] / "tokenizer", "--data", folder, "--num", "2", "--grid", "0", "--spectrum")
    assert r.exit_code == 1 and "knows classes" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing"], "does not exist"),
    (["--data", "{tmp}/empty"], "no images"),
    (["--data", "{tmp}/corrupt"], "no readable"),
    (["--image-size", "18"], "not divisible"),
    (["--steps", "0"], "at least 1"),
    (["--preset", "huge"], "unknown preset"),
    (["--device", "tpu"], "--device"),
    (["--lr", "-1"], "--lr must be a finite number >= 0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0"),
    (["--hog-weight", "-1"], "--hog-weight and --feature-weight must be >= 0"),
])
def test_bad_training_input_is_one_line(cli, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.png").write_bytes(os.urandom(300))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = cli("train-tokenizer", "--steps", "1", "--batch-size", "2", *args, "--out", tmp_path / "run")
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_usage_errors_are_one_line_from_the_console_entry(tmp_path):
    """Typer's usage errors (checked before any command runs) are one `error:` line with exit code 2 from the
    real entry point; --help and --version still exit 0."""
    for args, message in ((["train-tokenizer", "--steps", "abc"], "Invalid value for '--steps'"),
                          (["sample", "--stpes", "2"], "No such option: --stpes"),
                          (["bogus"], "No such command 'bogus'"),
                          (["info"], "Missing argument")):
        r = subprocess.run([*SIGMA, *args], capture_output=True, text=True, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    for args in (["--help"], ["--version"]):
        r = subprocess.run([*SIGMA, *args], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0 and r.stdout and not r.stderr, r.stderr


def test_bad_model_folders_are_one_line(cli, trained, tmp_path, monkeypatch):
    out, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for model, message in ((tmp_path / "nope", "does not exist"), (broken, "not a valid safetensors"),
                           (tmp_path, "not a sigma model folder")):
        r = cli("reconstruct", "--model", model)
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    # a folder of another sigma kind
    from checkpoints import io

    monkeypatch.setitem(io.MODEL_CLASSES, "classifier", "torch.nn:Linear")
    other = tmp_path / "other"
    shutil.copytree(out, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "_class_name": "Linear"}))
    r = cli("reconstruct", "--model", other)
    assert r.exit_code == 1 and "holds a classifier model, but this needs a tokenizer model" in r.stderr


def test_resume_of_a_run_with_a_broken_config_is_one_line(cli, trained, tmp_path):
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "config.json").write_text("{}")  # valid JSON, but no tokenizer config
    r = cli("train-tokenizer", "--out", run, "--resume", "--steps", "5")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "names no model class" in r.stderr, r.stderr


def test_two_gloo_processes_through_torchrun(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sigmacli",
           "train-tokenizer", *TINY, "--steps", "2", "--out", str(out), "--device", "cpu", "--json"]
    # TMPDIR: torchrun's agent leaves a torchelastic_* folder in the temp folder, one a run
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["steps"] == 2  # only rank 0 reports
    assert json.loads((out / "checkpoint" / "state.json").read_text())["counters"]["world"] == 2


def test_ctrl_c_saves_then_resume_works(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*SIGMA, "train-tokenizer", *TINY, "--steps", "100000", "--save-every", "0",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        time.sleep(0.2)
        assert time.time() < deadline, "training did not start"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted at step" in err and "Traceback" not in err, err  # as for any Ctrl-C
    step = json.loads((out / "checkpoint" / "state.json").read_text())["counters"]["step"]
    assert step >= 10
    r = subprocess.run([*SIGMA, "train-tokenizer", "--out", str(out), "--resume", "--steps", str(step + 2), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from"] == step
