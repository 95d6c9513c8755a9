"""What every command shares: the --json/--device/--seed options, one-line errors, result printing.

Heavy imports (torch, diffusers) happen inside commands so `sigma --help` stays fast.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object of the results on stdout.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]


def _seed(value: int) -> int:
    """A seed torch can take (its generators hold 64 bits): a larger one is a usage error, not a traceback."""
    if not -2**63 <= value < 2**64:
        raise typer.BadParameter(f"{value} does not fit in 64 bits")
    return value


SeedOpt = Annotated[int, typer.Option("--seed", callback=_seed, help="Random seed (data order, masks, sampling).")]


def picture_file(value) -> Path:
    """A picture's --out (a Typer parser). Path() drops a trailing separator and a last '.', so `--out runs/` or
    `--out runs/.` would have written runs.png; a name that ends in one (or in '..') says a folder, and is refused as
    an existing folder is (output_picture)."""
    if isinstance(value, str) and value and os.path.basename(value) in ("", ".", ".."):
        raise typer.BadParameter(f"'{value}' names a folder; give the picture a file name, e.g. '{Path(value) / 'picture.png'}'")
    return Path(value)


FsdpOpt = Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard with FSDP2 (per block, then the root) instead of DDP.")]
KeepEveryOpt = Annotated[Optional[int], typer.Option("--keep-every", help="Also keep the sampling weights every N steps as a loadable folder, OUT/snapshots/step-NNNNNNN, the step in 7 digits (a checkpoint is written at those steps too; --save-every keeps only the latest). Default 0 (off), or the run's own on --resume, where it may be changed.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the network ($SIGMA_COMPILE_BACKEND, default inductor).")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16 (autocast; on the CPU fast only with native bf16, AVX512-BF16 or AMX: elsewhere a warning says how much slower). Default: auto, or the run's own on --resume.")]


def trained_or_shipped(kind: str) -> Path:
    """The default folder of a model kind ("tokenizer", "classifier"): runs/<kind> when the user has trained
    one there, else the shipped weights."""
    from checkpoints import SHIPPED

    own = Path("runs") / kind
    return own if (own / "config.json").exists() else SHIPPED[kind]


def fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def command(fn):
    """Run a command body; a SigmaError (bad input, data, checkpoint) or an OSError (a path that cannot be
    written or read) becomes one line on stderr + exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipelines import errors

        outer = not errors.holding_notes()  # (a command body that calls another command's function)
        if outer:
            errors.hold_notes()
        try:
            result = fn(*args, **kwargs)
        except (errors.SigmaError, OSError, KeyboardInterrupt) as e:
            if not outer:
                raise  # the outermost command reports it
            errors.drop_notes()  # the error line alone: notes printed before a failure read as if they explained it
            report(e)
        except BaseException as e:
            if outer and out_of_memory(e):
                errors.drop_notes()
                fail(f"out of memory ({str(e).splitlines()[0][:200]}); try a smaller --batch-size, --num or size")
            if outer:
                errors.release_notes()
            raise
        if outer:
            errors.release_notes()
        return result

    return wrapper


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: numpy's (MemoryError) or torch's (on the CPU a RuntimeError from its allocator,
    on CUDA torch.OutOfMemoryError, a RuntimeError too): sizes too large for the machine, not a bug."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("can't allocate memory", "std::bad_alloc", "out of memory")))


def report(e: BaseException):
    """The one `error:` line (and exit code) for a SigmaError, an OSError or Ctrl-C."""
    if isinstance(e, KeyboardInterrupt):
        fail("interrupted", 130)
    if isinstance(e, BrokenPipeError):  # `sigma info RUN | head`: the reader left; stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would fail again)
        raise typer.Exit(141)
    if not isinstance(e, OSError):  # a SigmaError: bad input, data, checkpoint
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, getattr(e, "exit_code", 1))
    # an --out that cannot be written (a file where a folder goes, no permission, disk full)
    path = _shown_path(e.filename) if isinstance(e.filename, (str, bytes)) else e.filename
    if e.errno in (errno.EEXIST, errno.ENOTDIR) and isinstance(path, Path):
        in_the_way = file_in_the_way(path)
        if in_the_way is not None:
            fail(f"'{in_the_way}' is a file, where a folder is needed (a run folder or a folder of pictures)")
    fail(f"{e.strerror or type(e).__name__}" + (f": '{path}'" if path is not None else ""))


# what --resume may change: how far and how the run goes on, never what it trains (the rest is the run's own)
RESUME_OPTIONS = {"out", "resume", "steps", "keep_every", "precision", "device", "fsdp", "compile_", "cache_latents", "as_json"}
# what a resume reads from the run's sigma.json besides its kind, per kind of run
RESUME_NEEDS = {"tokenizer": ("train", "stage", "data_spec"), "lm": ("train", "stage", "data_spec"),
                "imm": ("train", "stage", "schedule", "data_spec", "image_size", "frames"),
                "classifier": ("train", "data_spec")}


def options_given(ctx: typer.Context | None) -> dict[str, str]:
    """{parameter name: its flag} for the options of a command set on its command line (or by an environment
    variable), not left at their defaults. (Typer vendors its own Click: the command's context comes in as a
    parameter, not from click.)"""
    if ctx is None:
        return {}
    return {p.name: p.opts[0] for p in ctx.command.params
            if getattr(ctx.get_parameter_source(p.name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}


def _shown_path(filename) -> Path:
    """The path to name in an error: the file a temporary file stood for (atomic writes go through '.NAME.tmpPID'
    or '.STEM.RANDOM.SUFFIX.tmp' beside it), else the path itself."""
    path = Path(os.fsdecode(filename))
    m = re.fullmatch(r"\.(.+)\.tmp\d+", path.name) or re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]+(\.[^.]+)\.tmp", path.name)
    return path.with_name("".join(g for g in m.groups() if g)) if m else path


def resumed_train_config(meta: dict, steps: int | None, keep_every: int | None = None, device: str | None = None):
    """The TrainConfig a --resume continues with: the run's own, but for what a resume may change: --steps (to
    extend it), --keep-every (to watch a long run from where it is) and --device (None: the run's)."""
    from pipelines.train import TrainConfig

    cfg = run_part(TrainConfig, meta, "train")
    cfg.steps = steps if steps is not None else cfg.steps
    cfg.keep_every = keep_every if keep_every is not None else cfg.keep_every
    cfg.device = device if device is not None else cfg.device
    cfg.sample_every = max(cfg.sample_every, 0)  # runs saved before a negative value was refused (it drew every step)
    return cfg


def run_part(cls, meta: dict, key: str):
    """cls(**meta[key]): a part of the sigma.json a --resume reads (training config, stage, schedule), or one line
    if it is not a mapping of the fields this version knows."""
    from pipelines.errors import CheckpointError

    try:
        return cls(**meta[key])
    except TypeError as e:
        raise CheckpointError(f"--resume: the run's sigma.json has a {key!r} this version cannot read ({e})") from None


def resume_device(ctx: typer.Context | None, device: str) -> str | None:
    """--device for resumed_train_config: the value when given on the command line (auto included), else None."""
    return device if "device" in options_given(ctx) else None


def run_to_resume(out: Path, kind: str, ctx: typer.Context | None = None, folder_options: tuple[str, ...] = ()) -> dict:
    """The sigma.json of the run in `out` that --resume continues; one line if there is none or it is of another
    kind. Options of the command (`ctx`) that a resume does not take are named in a one-line note, except
    `folder_options` when --out is not given: they chose the default folder (e.g. --objective: runs/fm)."""
    from checkpoints.io import RUN_META, read_json
    from checkpoints.meta import a_or_an
    from pipelines.errors import SigmaError, say

    if not (out / RUN_META).exists():
        raise SigmaError(f"--resume: '{out}' holds no run to continue")
    meta = read_json(out / RUN_META)
    if meta.get("kind") != kind:
        found = f"{a_or_an(str(meta['kind']))} run" if meta.get("kind") else "a sigma.json that names no kind of run"
        raise SigmaError(f"--resume: '{out}' holds {found}, not {a_or_an(kind)} run")
    missing = [key for key in RESUME_NEEDS[kind] if key not in meta]
    if missing:
        raise SigmaError(f"--resume: '{out / RUN_META}' lacks {', '.join(missing)}: the run cannot be continued")
    given = options_given(ctx)
    takes = RESUME_OPTIONS | (set() if "out" in given else set(folder_options))
    ignored = [flag for name, flag in given.items() if name not in takes]
    if ignored:  # a warning, not an error: re-running the run's own command plus --resume is
        # the natural way to continue it, but a changed value must not look as if it had been taken
        flags = [p.opts[0] for p in ctx.command.params if p.name in RESUME_OPTIONS - {"out", "resume", "as_json"}]
        say(f"note: --resume continues the run as it was configured; ignored: {', '.join(ignored)} "
            f"(a resume takes {', '.join(flags)})")
    return meta


def output_picture(out: Path, clips: bool) -> Path:
    """The picture file `out` names (PNG for images, GIF for clips; see pipelines.visual.picture_path), checked
    before the work: a folder or another picture format's suffix is a one-line error."""
    from pipelines.errors import SigmaError
    from pipelines.visual import picture_path

    try:
        path = picture_path(out, clips)
    except ValueError as e:
        raise SigmaError(f"--out {e}") from None
    check_writable(path.parent, "--out")
    return path


def as_created(folder: Path) -> Path:
    """The path mkdir(parents=True) reaches: the longest existing prefix as the OS resolves it, the rest (folders
    mkdir makes, so no symbolic links among them) normalised by name; `missing/../a-file` is `a-file`, which
    looks free until `missing` exists."""
    parts = folder.parts
    for i in range(len(parts), 0, -1):
        if os.path.exists(Path(*parts[:i])):
            return Path(os.path.normpath(Path(os.path.realpath(Path(*parts[:i])), *parts[i:])))
    return Path(os.path.normpath(folder))


def file_in_the_way(folder: Path) -> Path | None:
    """The folder itself or its nearest parent that is a file, if any, as named or as mkdir would reach it
    (isfile never raises)."""
    reached = as_created(folder)
    return next((p for p in (folder, *folder.parents, reached, *reached.parents) if os.path.isfile(p)), None)


def check_writable(folder: Path, option: str):
    """The folder, or the nearest existing folder that mkdir would create it in, must let this user write: a
    read-only place is one line before the work, not an error after it (root passes every permission check;
    a read-only file system still fails it)."""
    from pipelines.errors import SigmaError

    reached = as_created(folder)
    existing = next((p for p in (reached, *reached.parents) if os.path.exists(p)), None)
    if existing is not None and os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        raise SigmaError(f"{option} '{folder}': cannot write into '{existing}' (no permission, or a read-only file system)")


def output_folder(folder: Path, option: str) -> Path:
    """A folder to write into, checked before the work: neither it nor a parent may be a file, and it (or where
    it would be made) must be writable."""
    from pipelines.errors import SigmaError

    in_the_way = file_in_the_way(folder)
    if in_the_way is not None:
        raise SigmaError(f"{option} '{folder}': '{in_the_way}' is a file, where a folder is needed")
    check_writable(folder, option)
    return folder


def fresh_run_folder(out: Path):
    """A new run's --out, checked before the set-up (a tokenizer to load, latent statistics): it must not hold a
    run already (pipelines.train.train checks it too, but only once everything is built)."""
    from pipelines.train import check_new_run

    output_folder(out, "--out")
    check_new_run(out)


def check_sizes(image_size: int | None, frames: int | None):
    """--image-size and --frames given as 0 or less (None: the default or the run's) are errors, not defaults."""
    from pipelines.errors import SigmaError

    if image_size is not None and image_size < 8:
        raise SigmaError(f"--image-size must be at least 8 pixels, not {image_size}")
    if frames is not None and frames < 1:
        raise SigmaError(f"--frames must be at least 1 (1: images), not {frames}")


RESUME_CLASSES_HINT = " (the run's labels are these classes: the folder must keep its class sub-folders to resume)"


def check_classes(model_config, data, what: str, hint: str = ""):
    """The data's classes must be the ones the model's labels mean (class i of the model = class i of the data):
    a folder that gained, lost or renamed a class since the run began would shift every label after it (or send
    one to IMM's null class) without a word. Configs saved without names are compared by count."""
    from pipelines.errors import SigmaError

    names, data_names = model_config.class_names, list(data.class_names)
    if (list(names) if names else model_config.num_classes) != (data_names if names else len(data_names)):
        known = ", ".join(names) if names else f"{model_config.num_classes} classes"
        raise SigmaError(f"{what} knows classes [{known}]; the data '{data.name}' has [{', '.join(data_names)}]{hint}")


def check_precision(precision: str | None):
    """Reject a bad --precision before a command makes its run folder (train() checks it again for API users)."""
    from pipelines.train import check_precision as check

    check(precision)


def steps_done(result: dict) -> str:
    """'trained 30 steps', or after --resume 'trained steps 12-30 (resumed from step 11)': the work of this call."""
    n, start = result["steps"], result.get("resumed_from") or 0
    if not start:
        return f"trained {n} step{'' if n == 1 else 's'}"
    done = f"step {n}" if n == start + 1 else f"steps {start + 1}-{n}"
    return f"trained {done} (resumed from step {start})"


def emit(result: dict, as_json: bool, lines: list[str]):
    """Print results: one JSON object on stdout with --json, else readable lines. Rank 0 only."""
    if not is_main_rank():
        return
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        for line in lines:
            typer.echo(line)


def parse_grid(text: str, what: str, minimum: int = 1, form: str = "TxHxW", example: str = "1x4x4") -> tuple[int, ...]:
    """'16x32x32' -> (16, 32, 32) (as many sizes as `form` names); anything else is a one-line SigmaError."""
    from pipelines.errors import SigmaError

    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != len(form.split("x")) or min(parts) < minimum:
        floor = "positive" if minimum >= 1 else "non-negative"
        raise SigmaError(f"{what} must look like {form} with {floor} integers (e.g. {example}), not {text!r}")
    return parts
