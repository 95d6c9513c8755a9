"""The `sigma` Typer app: one module per command group, thin wrappers over pipelines/."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sigmacli import __version__
from sigmacli.common import JsonOpt, command, emit

app = typer.Typer(
    name="sigma",
    help="sigma: train and sample tokenizers, few-step diffusion transformers and sparse-attention kernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"sigma {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None):
    """sigma: generative-vision research from the command line."""


@app.command()
@command
def info(path: Annotated[Path, typer.Argument(help="A sigma model or run folder.")], as_json: JsonOpt = False):
    """Kind, config, parameter count and training step of a model or run folder (reads metadata only)."""
    from checkpoints.io import parameter_count
    from checkpoints.meta import CONFIG, RUN_META, WEIGHTS, folder_kind, model_folder, read_json, read_safetensors_header

    kind = folder_kind(path)
    folder = model_folder(path)  # an IMM pipeline folder keeps its transformer in transformer/
    config = {k: v for k, v in read_json(folder / CONFIG).items() if not k.startswith("_")}
    read_safetensors_header(folder / WEIGHTS)  # one line if the weights are missing or broken
    run = read_json(path / RUN_META) if (path / RUN_META).exists() else {}
    result = {"path": str(path), "kind": kind, "parameters": parameter_count(folder, kind),
              "step": run.get("step"), "data": run.get("data"), "config": config}
    lines = [f"{path}: {kind}, {result['parameters']:,} parameters"
             + (f", trained {result['step']} steps on {result['data']}" if run else "")]
    lines += [f"  {k} = {_short(v)}" for k, v in config.items()]
    emit(result, as_json, lines)


def _short(value) -> str:
    """A config value for reading: long lists (the DiT's per-token latent statistics) as their shape (--json has all)."""
    text = str(value)
    if len(text) <= 120 or not isinstance(value, list):
        return text
    shape, inner = [], value
    while isinstance(inner, list):
        shape.append(len(inner))
        inner = inner[0] if inner else None
    return f"[{' x '.join(map(str, shape))} numbers] (--json prints them)"


from sigmacli import tokenizer  # noqa: E402,F401  (registers its commands on `app`)
from sigmacli import imm  # noqa: E402,F401
from sigmacli import classifier  # noqa: E402,F401
from sigmacli import bench  # noqa: E402,F401
from sigmacli import lm  # noqa: E402,F401


def main():
    """The console entry (`sigma`, `python -m sigmacli`). Typer's usage errors (an unknown option or command, a
    value of the wrong type, a missing argument) become one `error:` line with exit code 2, like every other bad
    input, instead of Typer's boxed usage message."""
    import sys

    try:
        rv = app(standalone_mode=False)  # returns the exit code of a typer.Exit, else the command's value
    except Exception as e:  # Typer vendors Click: its usage errors are recognised by their interface
        if not (hasattr(e, "format_message") and type(getattr(e, "exit_code", None)) is int):
            raise
        message = e.format_message()  # empty for `sigma` alone, which has printed the help already
        if message:
            where = getattr(getattr(e, "ctx", None), "command_path", None) or "sigma"
            typer.echo(f"error: {message} (see {where} --help)", err=True)
        sys.exit(e.exit_code)
    code = rv if type(rv) is int else 0
    training = sys.modules.get("pipelines.train")  # loaded by the training commands only (`sigma --help` stays fast)
    if training is not None:
        training.exit_process(code)  # a torchrun rank ends without the interpreter's teardown
    sys.exit(code)
