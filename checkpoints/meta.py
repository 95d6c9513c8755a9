"""Reading sigma folders without torch: safetensors headers, JSON, the kind of a folder. Fast (`sigma info`)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from pipelines.errors import CheckpointError

WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
RUN_META = "sigma.json"
CHECKPOINT = "checkpoint"
PIPELINE_INDEX = "model_index.json"  # an IMM run/pipeline folder: the model lives in its transformer/ subfolder
RUN_LOG = "metrics.jsonl"  # a training run's log: opened at its first step, before any picture or checkpoint

# kind -> model class; `_class_name` in config.json tells the kind of a folder
MODEL_CLASSES = {
    "tokenizer": "pipelines.maetok.model:MAETok",
    "imm": "pipelines.imm.model:DiT",
    "classifier": "pipelines.evaluation.classifier:ShapesClassifier",
    "lm": "pipelines.lm.model:MoELM",
}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def kind_of_class(class_name: str) -> str | None:
    return next((k for k, v in MODEL_CLASSES.items() if v.split(":")[1] == class_name), None)


# ---- reading without loading tensors ---------------------------------------------------------------------
def read_safetensors_header(path: Path | str) -> dict:
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}, "__metadata__"),
    validated against the file size. Raises CheckpointError for a truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file '{path}' is missing" if not path.exists() else f"'{path}' is not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            n = struct.unpack("<Q", raw)[0]
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            end = max(end, stop)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} bytes, tensors need {8 + n + end}")
        return header
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any defect of the file is the same user-facing problem
        raise CheckpointError(f"'{path}' is not a valid safetensors file ({e})") from None


def read_json(path: Path | str, what: str = "file") -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a FIFO that would block the read for ever
        raise CheckpointError(f"{what} '{path}' is not a file")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} '{path}' is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} '{path}' is not a JSON object")
    return data


def model_folder(folder: Path | str) -> Path:
    """The folder holding config.json + weights: the folder itself, or the transformer/ of a pipeline folder."""
    folder = Path(folder)
    if (folder / PIPELINE_INDEX).exists() and (folder / "transformer" / CONFIG).exists():
        return folder / "transformer"
    return folder


def folder_kind(folder: Path | str) -> str:
    """The kind of a sigma model or run folder ("tokenizer", "imm", ...), from config.json only."""
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(f"'{folder}' is a file; a model is a folder (config.json + weights)")
    if not folder.is_dir():
        raise CheckpointError(f"model folder '{folder}' does not exist")
    folder = model_folder(folder)
    if not (folder / CONFIG).exists():
        raise CheckpointError(f"'{folder}' is not a sigma model folder (no {CONFIG})")
    config = read_json(folder / CONFIG, "model config")
    if "_class_name" not in config:
        raise CheckpointError(f"'{folder / CONFIG}' names no model class (_class_name): not a sigma model folder")
    kind = kind_of_class(str(config["_class_name"]))
    if kind is None:
        raise CheckpointError(f"'{folder}' holds a {config['_class_name']!r} model, which sigma does not know")
    return kind


def a_or_an(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' or word in ('lm',) else 'a'} {word}"  # "an lm": said as "el-em"


def expect_kind(folder: Path | str, kind: str) -> None:
    """Raise CheckpointError (one line) unless the folder holds a `kind` model."""
    found = folder_kind(folder)
    if found != kind:
        raise CheckpointError(f"'{folder}' holds {a_or_an(found)} model, but this needs {a_or_an(kind)} model")
