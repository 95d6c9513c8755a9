"""The shapes classifier (sigma eval's feature space and class accuracy), the Fréchet distance, and
`sigma train-classifier` end to end at tiny sizes."""
import json
import math

import pytest
import torch

from pipelines.evaluation.classifier import ClassifierTask, ShapesClassifier, extract_features, predict
from pipelines.metrics import class_accuracy, confusion_matrix, frechet_distance

TINY = ["--image-size", "16", "--batch-size", "16"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small gain nothing from a second thread, and on a busy 2-core machine two OpenMP threads
    wait on each other (this file took 175 s instead of 5 s beside a training run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def last_json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the model -------------------------------------------------------------------------------------------
def test_images_and_clips_are_scored_per_frame():
    model = ShapesClassifier(image_size=16, width=8, feature_dim=16).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    assert model(images).shape == (3, 6) and model.features(images).shape == (3, 16)
    clips = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    feats = extract_features(model, clips, batch_size=3)  # chunks that cut across clips
    assert feats.shape == (8, 16) and feats.dtype == torch.float64
    # clip-major: row 4 * b + t is frame t of clip b
    assert torch.allclose(feats[5].float(), model.features(clips[1, :, 1][None])[0], atol=1e-5)
    assert predict(model, clips).shape == (8,) and predict(model, clips).dtype == torch.int64


def test_other_sizes_are_resized_and_bad_shapes_refused():
    model = ShapesClassifier(image_size=16, width=8, feature_dim=16)
    assert predict(model, torch.rand(2, 3, 1, 32, 32) * 2 - 1).shape == (2,)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ShapesClassifier(width=12)


def test_default_model_is_small():
    model = ShapesClassifier()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6)


def test_loss_falls_in_a_short_run(tmp_path):
    from pipelines.data import make_dataset
    from pipelines.train import TrainConfig, train

    data = make_dataset("shapes", image_size=32)
    model = ShapesClassifier(image_size=32, width=8, feature_dim=32)
    cfg = TrainConfig(steps=150, batch_size=32, lr=1e-2, warmup=5, ema=0.0, save_every=0, sample_every=0, log_every=5)
    train(ClassifierTask(model, data, 32, 0, "shapes"), cfg, tmp_path, quiet=True)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[:3]) / 3 > 1.6  # chance level is ln 6 = 1.79
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3, losses


# ---- Fréchet distance -------------------------------------------------------------------------------------
def gaussian_sample(n: int, mean: torch.Tensor, cov: torch.Tensor, generator) -> torch.Tensor:
    """n points whose *sample* mean and covariance are exactly `mean` and `cov` (whitened, then coloured), so the
    closed form applies to machine precision."""
    z = torch.randn(n, len(mean), generator=generator, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance exactly I
    return z @ torch.linalg.cholesky(cov).T + mean


def closed_form(mu_a, cov_a, mu_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^1/2), the last term through the eigenvalues of the
    (non-symmetric) product C_a C_b: real and >= 0, being those of C_a^1/2 C_b C_a^1/2."""
    eig = torch.linalg.eigvals(cov_a @ cov_b).real.clamp_min(0)
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * eig.sqrt().sum())


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(a, a)) < 1e-8
    assert abs(frechet_distance(a.float(), a[torch.randperm(500)])) < 1e-6  # float32 in, order irrelevant
    for seed in range(8):  # rounding lands below 0 for about half of these sets: a distance never prints as -0.000
        b = torch.randn(200, 16, generator=torch.Generator().manual_seed(seed))
        assert 0 <= frechet_distance(b, b[torch.randperm(200)]) < 1e-8


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    # diagonal: sum (s_a - s_b)^2 over standard deviations, plus the squared mean difference
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    s_a, s_b = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    a = gaussian_sample(1000, mu_a, torch.diag(s_a**2), g)
    b = gaussian_sample(1000, mu_b, torch.diag(s_b**2), g)
    assert frechet_distance(a, b) == pytest.approx(5.0 + 4.0 + 1.0 + 0.0, abs=1e-8)
    # full, non-commuting covariances
    m_a, m_b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov_a, cov_b = m_a @ m_a.T + 0.1 * torch.eye(6), m_b @ m_b.T + 0.1 * torch.eye(6)
    mu_a, mu_b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a, b = gaussian_sample(2000, mu_a, cov_a, g), gaussian_sample(2000, mu_b, cov_b, g)
    expected = closed_form(mu_a, cov_a, mu_b, cov_b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)  # symmetric
    # random (not exact) samples of N(0, I) vs N(m, diag(s^2)) approach the population value
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    m = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    y = torch.randn(20000, 3, generator=g, dtype=torch.float64) * s_a + m
    assert frechet_distance(x, y) == pytest.approx(float(m.pow(2).sum() + (1 - s_a).pow(2).sum()), rel=0.05)


def test_frechet_distance_shift_and_singular_covariances():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    shift = torch.linspace(-1, 2, 8, dtype=torch.float64)
    # a shift leaves the covariance term at zero: only |shift|^2 remains
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-9)
    b = torch.randn(400, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) > 0 and frechet_distance(a, b + 1) > frechet_distance(a, b)
    # more features than samples: rank-deficient covariances stay finite (negative eigenvalue noise is clamped);
    # the square roots of ~1e-16 noise leave an error of ~1e-8 per null direction, tiny against tr(C) ~ 64
    low = torch.randn(10, 64, generator=g)
    assert math.isfinite(frechet_distance(low, low)) and abs(frechet_distance(low, low)) < 1e-6 * torch.cov(low.T).trace()
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(a, b[:, :4])


def test_class_accuracy():
    assert class_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        class_accuracy(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))


def test_confusion_matrix_rows_are_the_asked_class():
    m = confusion_matrix(torch.tensor([1, 2, 2, 0]), torch.tensor([1, 2, 0, 0]), 3)
    assert m.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert m.diagonal().sum() / m.sum() == pytest.approx(class_accuracy(torch.tensor([1, 2, 2, 0]), torch.tensor([1, 2, 0, 0])))
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([1]), torch.tensor([1, 2]), 3)


# ---- the CLI ----------------------------------------------------------------------------------------------
def test_train_classifier_cli_writes_a_loadable_folder_and_resumes(cli, tmp_path):
    from checkpoints.io import load_model

    out = tmp_path / "clf"
    result = last_json(cli("train-classifier", *TINY, "--steps", "20", "--out", out, "--json"))
    assert result["steps"] == 20 and 0 <= result["accuracy"] <= 1 and result["num"] == 4096
    model = load_model(out, "classifier")
    assert isinstance(model, ShapesClassifier) and model.config.image_size == 16
    assert model.config.class_names == ["circle", "square", "triangle", "ring", "cross", "star"]
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))
    info = last_json(cli("info", out, "--json"))
    assert info["kind"] == "classifier" and info["step"] == 20 and info["data"] == "shapes"
    resumed = last_json(cli("train-classifier", "--out", out, "--resume", "--steps", "25", "--json"))
    assert resumed["resumed_from"] == 20 and resumed["steps"] == 25
    plain = cli("train-classifier", "--out", out, "--resume", "--steps", "26")
    assert plain.exit_code == 0 and "held-out accuracy" in plain.stdout


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "at least 1"),
    (["--batch-size", "0"], "at least 1"),
    (["--lr", "-1"], "--lr must be a finite number >= 0"),
    (["--data", "nope"], "unknown data set"),
    (["--image-size", "4"], "image size"),
    (["--device", "tpu"], "--device"),
    (["--resume"], "no run to continue"),
])
def test_bad_input_is_one_error_line(cli, tmp_path, args, message):
    r = cli("train-classifier", *TINY, "--steps", "1", "--out", tmp_path / "run", *args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_resume_refuses_a_folder_whose_classes_changed(cli, tmp_path):
    """Labels are indices into the sorted class folders: a class added since the run began moved every label after
    it (here to one past the head: a traceback); one line instead."""
    from PIL import Image

    for c, name in enumerate(["ant", "cow"]):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (100 * c, 20 * i, 0)).save(tmp_path / "pics" / name / f"{i}.png")
    last_json(cli("train-classifier", *TINY, "--steps", "1", "--data", tmp_path / "pics", "--out", tmp_path / "run", "--json"))
    (tmp_path / "pics" / "bee").mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "pics" / "bee" / "0.png")
    r = cli("train-classifier", "--out", tmp_path / "run", "--resume", "--steps", "2")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "knows classes [ant, cow]" in lines[0] and "[ant, bee, cow]" in lines[0], r.stderr
    (tmp_path / "pics" / "bee" / "0.png").unlink()  # as many classes as before, one renamed: still other classes
    (tmp_path / "pics" / "bee").rmdir()
    (tmp_path / "pics" / "cow").rename(tmp_path / "pics" / "cat")
    r = cli("train-classifier", "--out", tmp_path / "run", "--resume", "--steps", "2")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "knows classes [ant, cow]" in lines[0] and "[ant, cat]" in lines[0], r.stderr


def test_a_folder_of_one_class_is_refused(cli, tmp_path):
    """Cross-entropy over one class is 0: such a run trained nothing and reported 100 % held-out accuracy."""
    from PIL import Image

    (tmp_path / "one").mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (0, 20 * i, 0)).save(tmp_path / "one" / f"x{i}.png")
    r = cli("train-classifier", *TINY, "--steps", "1", "--data", tmp_path / "one", "--out", tmp_path / "run")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "needs at least 2 classes" in lines[0], r.stderr
    for i in range(5, 12):  # a folder under 10 pictures has a note to print, but a failing command shows its error alone
        (tmp_path / "one" / f"x{i}.png").unlink()
    r = cli("train-classifier", *TINY, "--steps", "1", "--data", tmp_path / "one", "--out", tmp_path / "run")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "needs at least 2 classes" in lines[0], r.stderr
    # the dropped note was not shown, so a later command in this process on the same folder still shows it
    r = cli("train-tokenizer", "--image-size", "16", "--batch-size", "4", "--steps", "1", "--sample-every", "0",
            "--data", tmp_path / "one", "--out", tmp_path / "tok")
    assert r.exit_code == 0 and "note: only 5 images" in r.stderr, r.stderr


def test_class_order_matches_classes_by_name():
    """eval and reconstruct --spectrum score a model or data whose classes are the classifier's in another order (a
    folder's are sorted) by name; other class sets get None, which both refuse with one line."""
    from types import SimpleNamespace

    from pipelines.evaluation.classifier import class_order

    clf = SimpleNamespace(config=SimpleNamespace(class_names=["circle", "square", "ring"]))
    assert class_order(clf, ["circle", "square", "ring"]).tolist() == [0, 1, 2]
    assert class_order(clf, ["ring", "circle", "square"]).tolist() == [1, 2, 0]  # classifier index -> the names' index
    assert class_order(clf, ["circle", "square"]) is None and class_order(clf, ["circle", "square", "star"]) is None
    assert class_order(clf, None) is None
