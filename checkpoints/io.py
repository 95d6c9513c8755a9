"""Weight I/O. Nothing is pickled and loading never runs code.

A model folder is diffusers' layout: `config.json` (with `_class_name`) + `diffusion_pytorch_model.safetensors`,
so `MAETok.from_pretrained(folder)` works too. A run folder is a model folder plus `sigma.json` (kind, step,
training config), `metrics.jsonl`, pictures, and `checkpoint/` (training state: raw and EMA weights,
optimiser tensors in safetensors, counters in JSON). Every file is written to a temporary name and renamed;
the `checkpoint/` folder is swapped as a whole, so a run killed mid-save keeps its previous checkpoint.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from checkpoints.meta import (CHECKPOINT, CONFIG, MODEL_CLASSES, RUN_META, WEIGHTS,  # noqa: F401
                              expect_kind, folder_kind, kind_of_class, model_folder, read_json, read_safetensors_header)
from pipelines.errors import CheckpointError

def _class_for(kind: str):
    module, name = MODEL_CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def parameter_count(folder: Path | str, kind: str) -> int:
    """The parameters of a model folder's network, from config.json alone: the model is built on the meta device
    (no memory, no weights read). Buffers saved beside them (the LM's router bias, the DiT's latent
    statistics) are not parameters, so this matches what training reports."""
    config = {k: v for k, v in read_json(Path(folder) / CONFIG, "model config").items() if not k.startswith("_")}
    with torch.device("meta"):
        model = _class_for(kind).from_config(config)
    return sum(p.numel() for p in model.parameters())


# ---- atomic writes ---------------------------------------------------------------------------------------
def new_file_mode() -> int:
    """The mode a plain new file gets under the current umask (0644 under 022): temporary files are made
    0600 (mkstemp, safetensors), and a run's pictures and weights should be as readable as any other file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_replace(tmp: Path, path: Path):
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)


def atomic_write_text(path: Path | str, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    _fsync_replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    _fsync_replace(tmp, path)


# ---- model folders -----------------------------------------------------------------------------------------
def save_model(model: torch.nn.Module, folder: Path | str, state_dict: dict | None = None):
    """Write config.json + weights (default: the model's own; pass `state_dict` for e.g. EMA weights)."""
    folder = Path(folder)
    config = {k: v for k, v in model.config.items() if k != "_use_default_values"}  # diffusers' own bookkeeping
    # FSDP2 swaps in a subclass (FSDPDiT(FSDPModule, DiT)): record the model's own class
    config["_class_name"] = next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    atomic_save_tensors(state_dict if state_dict is not None else model.state_dict(), folder / WEIGHTS)
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True))


def load_state_checked(model: torch.nn.Module, path: Path | str):
    """Load safetensors weights into `model`, with a one-line error for missing/extra/mis-shaped tensors."""
    header = read_safetensors_header(path)
    expected = model.state_dict()
    names = set(header) - {"__metadata__"}
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or extra:
        raise CheckpointError(f"'{path}' does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in expected.items():
        if list(tensor.shape) != header[name]["shape"]:
            raise CheckpointError(f"'{path}': tensor {name} has shape {header[name]['shape']}, "
                                  f"the model expects {list(tensor.shape)}")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"'{path}' could not be read ({e})") from None
    model.load_state_dict(state)


def load_model(folder: Path | str, kind: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model from config.json and load its weights. Wrong kind, bad config or weights that do not
    fit raise CheckpointError with one line."""
    folder = Path(folder)
    expect_kind(folder, kind)
    folder = model_folder(folder)
    cls = _class_for(kind)
    config = read_json(folder / CONFIG, "model config")
    try:
        model = cls.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"'{folder / CONFIG}' is not a valid {kind} config ({e})") from None
    load_state_checked(model, folder / WEIGHTS)
    return model.to(device).eval()


# ---- training state ----------------------------------------------------------------------------------------
def save_training_state(run_dir: Path | str, *, model_state: dict, ema_state: dict | None, optimizer, counters: dict):
    """Write run_dir/checkpoint/ as a whole: a complete new folder is swapped in by two renames; a reader
    that finds only `checkpoint.old` (killed between them) uses that."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{CHECKPOINT}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save_tensors(model_state, tmp / "model.safetensors")
    if ema_state is not None:
        atomic_save_tensors(ema_state, tmp / "ema.safetensors")
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    atomic_save_tensors(tensors, tmp / "optimizer.safetensors")
    meta = {"counters": counters, "param_groups": opt["param_groups"], "scalars": scalars}
    atomic_write_text(tmp / "state.json", json.dumps(meta, indent=2))
    final, old = run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


SNAPSHOTS = "snapshots"


def keep_snapshot(run_dir: Path | str, step: int) -> Path:
    """Copy the run's model folder as it is now (configs, sampling weights, sigma.json; no optimiser state,
    log or pictures) to run_dir/snapshots/step-NNNNNNN, a folder every command loads like the run itself.
    Files are hard links where the file system allows (every file of a run is replaced by rename, never
    rewritten in place, so a link keeps this step's version; the frozen tokenizer is not copied each time).
    Written under a temporary name and renamed, so a snapshot is whole or absent."""
    run_dir = Path(run_dir)
    snapshots = run_dir / SNAPSHOTS
    for stale in snapshots.glob(".step-*.tmp*"):  # left by a process killed while copying
        shutil.rmtree(stale, ignore_errors=True)
    final = snapshots / f"step-{step:07d}"
    tmp = snapshots / f".step-{step:07d}.tmp{os.getpid()}"
    tmp.mkdir(parents=True)

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for item in run_dir.iterdir():  # configs, weights and model subfolders (transformer/, scheduler/, tokenizer/)
        if item.name.startswith((CHECKPOINT, SNAPSHOTS, ".")):
            continue
        if item.is_file() and item.suffix in (".json", ".safetensors"):
            link_or_copy(item, tmp / item.name)
        elif item.is_dir() and any(item.glob("*.json")):  # not samples/ (pictures only)
            shutil.copytree(item, tmp / item.name, copy_function=link_or_copy)
    shutil.rmtree(final, ignore_errors=True)  # a resumed run that passes this step again replaces it
    os.replace(tmp, final)
    return final


def checkpoint_dir(run_dir: Path | str) -> Path | None:
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (run_dir / name / "state.json").exists():
            return run_dir / name
    return None


def load_training_state(run_dir: Path | str, model, ema, optimizer, weights: bool = True) -> dict:
    """Restore weights (unless weights=False: FSDP loads them before sharding), EMA and optimiser in place;
    return the counters saved with them."""
    ckpt = checkpoint_dir(run_dir)
    if ckpt is None:
        raise CheckpointError(f"no training checkpoint to resume in '{run_dir}'")
    meta = read_json(ckpt / "state.json", "training state")
    if not (isinstance(meta.get("counters"), dict) and isinstance(meta["counters"].get("step"), int)
            and isinstance(meta.get("param_groups"), list) and isinstance(meta.get("scalars"), dict)):
        raise CheckpointError(f"training state '{ckpt / 'state.json'}' is incomplete (it needs counters.step, "
                              "param_groups and scalars)")
    if weights:
        load_state_checked(model, ckpt / "model.safetensors")
    if weights and ema is not None:
        load_state_checked(ema, ckpt / ("ema.safetensors" if (ckpt / "ema.safetensors").exists() else "model.safetensors"))
    read_safetensors_header(ckpt / "optimizer.safetensors")
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    try:
        for key, value in [*tensors.items(), *meta["scalars"].items()]:
            idx, name = key.split(".", 1)  # "INDEX.NAME", as save_training_state writes them
            state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the optimiser state in '{ckpt}' does not fit this run ({e})") from None
    return meta["counters"]
