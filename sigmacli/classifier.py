"""`sigma train-classifier`: the small shapes classifier behind `sigma eval` (Fréchet distance features and
class accuracy of conditional samples)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sigmacli.app import app
from sigmacli.common import (RESUME_CLASSES_HINT, CompileOpt, DeviceOpt, FsdpOpt, JsonOpt, PrecisionOpt, SeedOpt,
                             check_classes, check_precision, command, emit, fresh_run_folder, resume_device,
                             resumed_train_config, run_to_resume, steps_done)

# the default schedule: >= 99.9 % held-out accuracy on 32x32 shapes in well under two minutes of CPU
DEFAULTS = dict(steps=1000, batch_size=64, lr=3e-3, warmup=50, weight_decay=0.01, ema=0.0)
EVAL_SAMPLES = 4096  # held-out samples scored at the end


@app.command("train-classifier")
@command
def train_classifier(
    ctx: typer.Context = None,  # (injected by Typer; None when called from Python)
    data: Annotated[str, typer.Option(help="Labelled images: shapes | an image folder (one sub-folder per class) | "
                                           "cifar10:PATH, cifar100:PATH, mnist:PATH, fashion-mnist:PATH")] = "shapes",
    image_size: Annotated[int, typer.Option(help="Image side in pixels; other sizes are resized to it when scoring.")] = 32,
    steps: Annotated[Optional[int], typer.Option(help=f"Training steps (default {DEFAULTS['steps']}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Global batch size (default {DEFAULTS['batch_size']}).")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate (default {DEFAULTS['lr']}).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/classifier"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    fsdp: FsdpOpt = False,
    compile_: CompileOpt = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Train the shapes classifier used by `sigma eval`; print its held-out accuracy."""
    check_precision(precision)
    import torch

    from checkpoints.io import load_model
    from pipelines.data import make_dataset
    from pipelines.errors import SigmaError
    from pipelines.evaluation.classifier import ClassifierTask, ShapesClassifier, evaluate_classifier
    from pipelines.train import TrainConfig, check_train_config, evaluable, resolve_device, train

    if resume:  # everything but --steps comes from the run itself
        meta = run_to_resume(out, "classifier", ctx)
        cfg = resumed_train_config(meta, steps, device=resume_device(ctx, device))
        data = meta["data_spec"]
        model = load_model(out, "classifier")  # its config checked, in one line, as the other trainers' resumes
        image_size = model.config.image_size
    else:
        fresh_run_folder(out)
        cfg = TrainConfig(**DEFAULTS, seed=seed, device=device, save_every=250, sample_every=0)
        for name, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
            if value is not None:
                setattr(cfg, name, value)
        model = None
    check_train_config(cfg)
    torch.manual_seed(cfg.seed)
    # frames=1: video sets are scored frame by frame, and a frame of moving-shapes is a shapes image
    train_set = make_dataset(data, image_size=image_size, split="train", seed=cfg.seed)
    if train_set.num_classes < 2:  # cross-entropy over one class is 0: nothing would train, and 100 % be reported
        raise SigmaError(f"a classifier needs at least 2 classes; '{data}' has 1 ({train_set.class_names[0]}; "
                         "the class of a picture is its first-level sub-folder)")
    if model is not None:  # a resume: its labels must still mean the same classes
        check_classes(model.config, train_set, f"the run in '{out}'", RESUME_CLASSES_HINT)
    heldout = make_dataset(data, image_size=image_size, split="heldout", seed=cfg.seed)
    if model is None:
        model = ShapesClassifier(image_size=image_size, num_classes=train_set.num_classes,
                                 class_names=list(train_set.class_names))
    task = ClassifierTask(model, train_set, cfg.batch_size, cfg.seed, data_spec=data)
    cfg.fsdp, cfg.compile = fsdp, compile_
    cfg.precision = precision or cfg.precision
    result = train(task, cfg, out, resume=resume, quiet=as_json)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    if result["rank"] == 0:
        result.update(evaluate_classifier(evaluable(model, out, "classifier").eval(), heldout, EVAL_SAMPLES, resolve_device(cfg.device)))
    emit(result, as_json, [
        f"{steps_done(result)} in {result['seconds']:.0f} s ({result['samples_per_s']:.0f} samples/s), "
        f"final loss {result['final_loss']:.4f}",
        f"held-out accuracy {100 * result.get('accuracy', float('nan')):.2f} % on {result.get('num')} samples "
        f"of {heldout.name.removeprefix('folder:')}; weights: {out}/",
    ])
