"""Copy trained runs into checkpoints/pretrained/ as the weights `sigma sample` and `sigma eval` use by default.

    python -m checkpoints.ship --imm runs/imm --classifier runs/classifier

Only what inference needs is copied (configs, sigma.json, weights; no optimiser state, no pictures), and the
large transformer is stored in float16 to keep the repository small (loading casts back to float32).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file

from checkpoints import SHIPPED
from checkpoints.io import atomic_save_tensors, load_model
from checkpoints.meta import CONFIG, CheckpointError, RUN_META, WEIGHTS


def _copy_model(src: Path, dst: Path, half: bool):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / CONFIG, dst / CONFIG)
    tensors = load_file(str(src / WEIGHTS))
    if half:
        # the latent space's principal directions stay float32: they map every sample back to the tokenizer
        tensors = {k: v.half() if v.is_floating_point() and k != "z_basis" else v for k, v in tensors.items()}
    atomic_save_tensors(tensors, dst / WEIGHTS)


def _check_run(folder: Path, kind: str, files: tuple[str, ...]):
    """One line, not a traceback, and before the shipped copy is removed: the run must be of `kind`, its weights
    must load, and it must hold every file shipping copies."""
    try:
        load_model(folder, kind)  # config and weights
        if kind == "imm" and (folder / "tokenizer").exists():
            load_model(folder / "tokenizer", "tokenizer")
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    missing = [name for name in files if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"error: '{folder}' has no {', '.join(missing)}: not a whole {kind} run to ship")


def ship(imm: Path | None, classifier: Path | None):
    if imm is not None:
        _check_run(imm, "imm", ("model_index.json", RUN_META, "scheduler/scheduler_config.json"))
    if classifier is not None:
        _check_run(classifier, "classifier", (RUN_META,))
    if imm is not None:
        dst = SHIPPED["imm"]
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for name in ("model_index.json", RUN_META):
            shutil.copy2(imm / name, dst / name)
        shutil.copytree(imm / "scheduler", dst / "scheduler")
        _copy_model(imm / "transformer", dst / "transformer", half=True)
        if (imm / "tokenizer").exists():
            _copy_model(imm / "tokenizer", dst / "tokenizer", half=False)
    if classifier is not None:
        dst = SHIPPED["classifier"]
        shutil.rmtree(dst, ignore_errors=True)
        _copy_model(classifier, dst, half=False)
        shutil.copy2(classifier / RUN_META, dst / RUN_META)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imm", type=Path)
    parser.add_argument("--classifier", type=Path)
    args = parser.parse_args()
    ship(args.imm, args.classifier)
