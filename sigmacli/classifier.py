"""`sigma train-classifier`: the small shapes classifier behind `sigma eval`'s features and class accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sigmacli.app import app
from sigmacli.common import DeviceOpt, JsonOpt, SeedOpt, command, emit
from sigmacli.tokenizer import DataOpt


@app.command("train-classifier")
@command
def train_classifier(
    data: DataOpt = None,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 600,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/classifier"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Train the shapes classifier used by `sigma eval` (Fréchet distance features, class accuracy)."""
    from pipelines.data import make_dataset
    from pipelines.errors import SigmaError
    from pipelines.evaluation.classifier import ClassifierTask, ShapesClassifier, evaluate_classifier
    from pipelines.train import TrainConfig, resolve_device, train

    if steps < 1 or batch_size < 1:
        raise SigmaError("--steps and --batch-size must be at least 1")
    data = data or "shapes"
    train_set = make_dataset(data, image_size=image_size, split="train", seed=seed)
    heldout = make_dataset(data, image_size=image_size, split="heldout", seed=seed)
    model = ShapesClassifier(image_size=image_size, num_classes=train_set.num_classes, class_names=list(train_set.class_names))
    if resume:
        from checkpoints.io import load_model

        model = load_model(out, "classifier")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, min(50, steps // 10)), ema=0.0, weight_decay=0.01, seed=seed,
                      device=device, save_every=200, sample_every=0)
    result = train(ClassifierTask(model, train_set, heldout, batch_size, seed, data), cfg, out, resume=resume, quiet=as_json)
    result.update(evaluate_classifier(model.eval(), heldout, 2048, resolve_device(device)))
    emit(result, as_json, [f"trained {result['steps']} steps in {result['seconds']:.0f} s; held-out accuracy "
                           f"{100 * result['accuracy']:.2f} % on {result['num']} samples; weights: {out}/"])
