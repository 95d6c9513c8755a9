"""The shapes classifier (sigma eval's feature space) and the Fréchet distance."""
import json

import pytest
import torch

from pipelines.evaluation.classifier import ShapesClassifier, extract_features, predict
from pipelines.metrics import class_accuracy, frechet_distance


def test_classifier_scores_images_and_clips_per_frame():
    model = ShapesClassifier(image_size=16, width=8, feature_dim=12)
    assert model(torch.rand(3, 3, 16, 16) * 2 - 1).shape == (3, 6)
    assert extract_features(model, torch.rand(2, 3, 4, 16, 16)).shape == (8, 12)  # 2 clips x 4 frames
    assert predict(model, torch.rand(2, 3, 1, 32, 32)).shape == (2,)  # other sizes are resized


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    # N(0, I) vs N(m, diag(s^2)): |m|^2 + sum (1 + s^2 - 2 s)
    m, s = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * s + m
    expected = float(m.pow(2).sum() + (1 + s**2 - 2 * s).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    # a shift changes only the mean term
    assert frechet_distance(a, a + 3) == pytest.approx(27.0, rel=1e-6)
    assert class_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0])) == pytest.approx(2 / 3)


def test_classifier_learns_a_fixed_batch():
    from pipelines.data import make_dataset

    torch.manual_seed(0)
    x, y = make_dataset("shapes", image_size=16).get_batch(torch.arange(24))
    model = ShapesClassifier(image_size=16, width=16, feature_dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_train_classifier_cli(cli, tmp_path):
    r = cli("train-classifier", "--image-size", "16", "--steps", "40", "--batch-size", "16", "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= result["accuracy"] <= 1 and result["num"] == 2048
    from checkpoints.io import load_model

    assert load_model(tmp_path / "c", "classifier").config.class_names[0] == "circle"
    bad = cli("train-classifier", "--steps", "0", "--out", tmp_path / "d")
    assert bad.exit_code == 1 and bad.stderr.startswith("error:")
