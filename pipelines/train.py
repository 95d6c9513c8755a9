"""The one training loop every trainer shares (tokenizer, IMM, LM).

One process or many under torchrun (`"RANK" in os.environ`): DistributedDataParallel over gloo (CPU) or
nccl (CUDA); rank 0 logs and saves. A method plugs in as a `Task` (its model, its loss on a step's batch,
its pictures). Exact resume: the batch of step k and every random draw of step k are pure functions of
(seed, k), so a resumed run needs only weights, EMA, optimiser tensors and the step counter.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from checkpoints.io import (RUN_META, atomic_write_text, checkpoint_dir, keep_snapshot, load_training_state, save_model,
                            save_training_state)
from checkpoints.meta import RUN_LOG
from pipelines.errors import SigmaError, release_notes, say


PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str | None):
    """A bad --precision is a SigmaError (None: not given, the run's own or auto)."""
    if precision is not None and precision not in PRECISIONS:
        raise SigmaError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run of this --precision trains under bf16 autocast on this device (auto: on CUDA only)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


_slowdown: dict[torch.dtype, float] = {}


def cpu_matmul_slowdown(dtype: torch.dtype = torch.bfloat16, n: int = 256) -> float:
    """How many times longer this CPU takes for an [n, n] x [n, n] matmul in `dtype` than in fp32 (one thread, best
    of 5, measured once per process and dtype; one thread, because a busy machine stalls multi-threaded fp32 matmuls
    far more than the slow half-precision path, which is single-threaded anyway). CPUs with native bf16 (AVX512-BF16,
    AMX) are faster in bf16; AVX2-only x86 CPUs take a generic path, 60-130x slower than fp32 on a Zen 3
    (BENCHMARKS.md)."""
    if dtype not in _slowdown:
        def best(a, b):
            a @ b
            times = []
            for _ in range(5):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            return min(times)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            a, b = torch.randn(n, n), torch.randn(n, n)
            _slowdown[dtype] = best(a.to(dtype), b.to(dtype)) / max(best(a, b), 1e-9)
        finally:
            torch.set_num_threads(threads)
    return _slowdown[dtype]


def warn_slow_half(dtype: torch.dtype | None, device: torch.device | str, option: str = "--precision bf16") -> None:
    """One warning line when a half precision is asked for on a CPU that computes it far slower than fp32 (a run
    that would be ~10x faster in fp32, the CPU default). dtype None or fp32: nothing to check."""
    if dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu":
        if (slowdown := cpu_matmul_slowdown(dtype)) > 3:
            name = "bf16" if dtype == torch.bfloat16 else "fp16"
            say(f"warning: this CPU multiplies {name} matrices {slowdown:.0f}x slower than fp32 (no native {name} "
                f"arithmetic), so {option} runs far slower here than fp32", once=True)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global: split over ranks
    lr: float = 1e-3
    warmup: int = 100
    min_lr: float = 0.0  # cosine decays to this
    restart_at: int = 0  # > 0: a second stage from this step, with its own warm-up + cosine (e.g. fine-tuning)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema: float = 0.999  # 0 disables; the saved model holds EMA weights when on
    save_every: int = 500
    keep_every: int = 0  # > 0: also keep the sampling weights every N steps in snapshots/step-N (loadable as a run)
    sample_every: int = 500  # 0 disables periodic pictures
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16" (autocast on either)
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per block, then the root) instead of DDP
    compile: bool = False  # torch.compile the network (backend: $SIGMA_COMPILE_BACKEND, default inductor)


def with_progress(items, description: str | None):
    """`items`, behind a transient progress bar on stderr when `description` is given and stderr is a terminal
    (as the training bar: stdout holds a command's results only; off a terminal a transient bar would leave a blank
    line). For the passes before training that take a while, e.g. encoding thousands of items."""
    if description is None:
        return items
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    return track(items, description=description, transient=True, console=console) if console.is_terminal else items


class Task(Protocol):
    kind: str  # "tokenizer", "imm", "lm": written to sigma.json
    # optional: label, the progress bar's name where it is not kind (IMM's flow-matching baseline);
    # model_subfolder = "transformer" saves the weights there (a diffusers pipeline folder);
    # make_optimizer(model, cfg) replaces the default AdamW; after_step(model, step) runs after each update
    model: nn.Module
    samples_per_step: int  # global images (or tokens) per step, for throughput

    def trainable(self, model: nn.Module) -> None: ...  # set requires_grad for this stage
    # loss: this rank's loss and logs ({name: number or (number, weight)}, the same names on every rank). train()
    # logs the weighted mean over ranks: a plain number weighs 1; a figure that is a mean over a varying part of the
    # share (e.g. IMM's velocity groups) gives that part's size as its weight, so the run's figure is the mean over
    # the whole batch; NaN or weight 0: this rank's share has none of the figure
    def loss(self, net: nn.Module, model: nn.Module, step: int, generator: torch.Generator, rank: int, world: int) -> tuple[torch.Tensor, dict]: ...
    def pictures(self, model: nn.Module, step: int, run_dir: Path) -> Path | None: ...
    def metadata(self) -> dict: ...


class NonFiniteLoss(SigmaError):
    pass


class Interrupted(SigmaError):
    """Ctrl-C during training: the step finished and the run was saved. Exit code 130, as for any Ctrl-C, so a
    script tells it from a failure."""
    exit_code = 130


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SigmaError("--device cuda was asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise SigmaError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def rank_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun (RANK set) on CUDA, the GPU of its LOCAL_RANK; else `device`."""
    if device.type == "cuda" and "RANK" in os.environ:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    """The schedule's lr for every group, times the group's `lr_scale` (Muon's matrices run at a larger lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int):
    """e <- d e + (1 - d) p after optimiser step `step` (0-based), with d = min(decay, (1 + step) / (10 + step)):
    a short warm-up, so early EMA weights are not dominated by the random initialisation. Buffers (router
    biases) are copied, not averaged."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for (seed, step): every random draw of a step comes from it."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 29)) & (2**63 - 1)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr at the end of the stage. With `restart_at`, steps
    [0, restart_at) and [restart_at, steps) are two stages, each with its own warm-up and cosine."""
    start, end = 0, cfg.steps
    if 0 < cfg.restart_at < cfg.steps:
        start, end = (cfg.restart_at, cfg.steps) if step >= cfg.restart_at else (0, cfg.restart_at)
    step, length = step - start, end - start
    warmup = min(cfg.warmup, length)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, length - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def adamw_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Param groups for AdamW: no weight decay on vectors (norms, biases) and on learned tokens/positions."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (decay if p.dim() >= 2 and "pos" not in name and "token" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over adamw_groups."""
    return torch.optim.AdamW(adamw_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), fused=False)


class _Distributed:
    def __init__(self, device: torch.device):
        self.enabled = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", 0)) if self.enabled else 0
        self.world = int(os.environ.get("WORLD_SIZE", 1)) if self.enabled else 1
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(rank_device(device))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def close(self, clean: bool = True):
        if self.enabled and dist.is_initialized():
            if clean:  # every rank past its last collective (rank 0 may still be writing the checkpoint) before
                dist.barrier()  # the group goes: tearing down gloo under a peer's pending work aborts the process
            dist.destroy_process_group()
            global _GROUP_TORN_DOWN
            _GROUP_TORN_DOWN = True


_GROUP_TORN_DOWN = False  # this process ran a process group and destroyed it (see exit_process)


def exit_process(code: int):
    """End the process with `code`. After a process group, skip the interpreter's teardown (os._exit, with stdout
    and stderr flushed first; every file of the run is written and closed by then). Gloo's C++ threads outlive
    destroy_process_group (6 a process under DDP, 14 under FSDP2, measured) and are torn down only as the
    interpreter finalises, where a thread that reaches for it is ended mid-call: a rank that had saved its run
    then died of SIGABRT ("terminate called without an active exception"), twice in about fifteen CI runs."""
    if _GROUP_TORN_DOWN:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach the reader anyway
                pass
        os._exit(code)
    sys.exit(code)


# ---- FSDP2 ---------------------------------------------------------------------------------------------------
def shard_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (every element of a ModuleList named `blocks`): FSDP2's units of sharding."""
    return [block for name, mod in model.named_modules() if name.split(".")[-1] == "blocks"
            and isinstance(mod, nn.ModuleList) for block in mod]


def apply_fsdp(model: nn.Module, device: torch.device, world: int):
    """fully_shard each block, then the root, on an explicit 1D mesh (the default mesh would move a gloo model
    to CUDA). Parameters, their all-gathers and the gradient reduction stay fp32, and bf16 comes from the autocast
    every run computes under, as with DDP: FSDP2's bf16 MixedPrecisionPolicy would also cast the forward's inputs,
    IMM's times among them (t near 1 rounded to steps of 2^-8, coarser than r's step back from t), and run IMM's
    fp32 target in bf16."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns when the root returns a view (a Linear's 3-D output is one), since an in-place op on it would skip
    # the pre-backward all-gather. No trainer here writes into a model's output (tests/test_distributed.py: FSDP2
    # weights equal one process's), so the warning would only alarm.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world,))
    for block in shard_units(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(state: dict) -> dict:
    """Gather sharded (DTensor) entries into whole tensors on CPU. Collective: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


class _GatheredOptimizer:
    """What save_training_state needs from an optimiser (state_dict), with sharded states made whole."""

    def __init__(self, optimizer):
        sd = optimizer.state_dict()
        self._sd = {"state": {i: full_state(st) for i, st in sd["state"].items()}, "param_groups": sd["param_groups"]}

    def state_dict(self):
        return self._sd


def shard_optimizer_state(optimizer):
    """After loading whole tensors into an optimiser over sharded parameters: cut each state to the parameter's
    placement (same index order on every rank, so every rank keeps its own shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def evaluable(model: nn.Module, run_dir: Path | str, kind: str) -> nn.Module:
    """The trained model for rank 0 to evaluate after train() has returned: the weights train() has just saved (the
    EMA's when the run keeps one), loaded whole on the model's device. One rule for every run: after an FSDP2 run
    the live model is sharded, and its forward would all-gather from the other ranks, which have left (it would
    fail, or hang); after any run with an EMA the live weights are not the ones saved."""
    from torch.distributed.tensor import DTensor

    from checkpoints.io import load_model

    first = next(model.parameters())
    return load_model(run_dir, kind, (first.to_local() if isinstance(first, DTensor) else first).device)


def write_run_meta(run_dir: Path, task: Task, cfg: TrainConfig, step: int, extra: dict | None = None):
    meta = {"kind": task.kind, "step": step, "train": asdict(cfg), **task.metadata(), **(extra or {})}
    atomic_write_text(run_dir / RUN_META, json.dumps(meta, indent=2))


def _not_a_profiler_range_note(record) -> bool:
    return not str(record.msg).startswith("Profiler record function")


def compile_backend() -> str:
    """$SIGMA_COMPILE_BACKEND (default inductor), checked against torch's registry: a typo is one line, not a
    traceback from the first compiled call."""
    import logging

    import torch._dynamo

    # inductor's C++ build looks for CUDA once and logs "No CUDA runtime is found" on CPU-only machines: not ours to act on
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # DDP's forward opens a profiler range, which dynamo skips with a warning on every rank: nothing is lost but the range
    logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(_not_a_profiler_range_note)
    backend = os.environ.get("SIGMA_COMPILE_BACKEND", "inductor")
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise SigmaError(f"SIGMA_COMPILE_BACKEND={backend!r} is not a torch.compile backend (e.g. inductor, aot_eager, eager)")
    return backend


def check_new_run(run_dir: Path | str):
    """A new run must not start in a folder that holds one (its checkpoint would be overwritten)."""
    if checkpoint_dir(run_dir) is not None:
        raise SigmaError(f"'{run_dir}' already holds a run; pass --resume to continue it or choose another --out")


def check_train_config(cfg: TrainConfig):
    """Values the optimiser or the EMA would otherwise take silently (or fail on with a traceback)."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise SigmaError("--steps and --batch-size must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):  # (0 is allowed: a run that only evaluates or re-saves)
        raise SigmaError(f"--lr must be a finite number >= 0, not {cfg.lr}")
    if cfg.save_every < 0 or cfg.keep_every < 0:
        raise SigmaError("--save-every and --keep-every must be >= 0 (0: off)")
    if cfg.sample_every < 0:
        raise SigmaError(f"--sample-every must be >= 0 (0: only at the end), not {cfg.sample_every}")
    if not 0 <= cfg.ema < 1:
        raise SigmaError(f"--ema must be in [0, 1) (0: no EMA), not {cfg.ema}")
    if cfg.log_every < 1:  # (no CLI option sets it; a script could, and `step % 0` is a ZeroDivisionError)
        raise SigmaError(f"log_every must be at least 1, not {cfg.log_every}")


def _log_weight(value) -> tuple[float, float] | None:
    """A numeric log (a number, or (number, weight)) as (value, weight), with (0, 0) for NaN or weight 0: a share
    that has none of the figure; None for anything else (kept as rank 0 logged it)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if isinstance(value, tuple) and len(value) == 2 and number(value[0]) and number(value[1]):
        v, w = float(value[0]), float(value[1])
    elif number(value):
        v, w = float(value), 1.0
    else:
        return None
    return (0.0, 0.0) if math.isnan(v) or w <= 0 else (v, w)


def train(task: Task, cfg: TrainConfig, run_dir: Path | str, resume: bool = False, quiet: bool = False) -> dict:
    """Train `task.model` for cfg.steps (global) steps into run_dir. Returns a summary dict.

    Raises NonFiniteLoss (nothing saved past the last good checkpoint) and Interrupted (after saving).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    ddp = _Distributed(device)
    try:  # a setup error (every rank: a bad checkpoint, a --compile backend) still ends the process group
        if cfg.batch_size % ddp.world:
            raise SigmaError(f"batch size {cfg.batch_size} is not divisible by {ddp.world} processes")
        check_train_config(cfg)
        if device.type == "cuda" and ddp.enabled:
            device = torch.device("cuda", torch.cuda.current_device())
        check_precision(cfg.precision)
        use_bf16 = uses_bf16(cfg.precision, device)
        warn_slow_half(torch.bfloat16 if use_bf16 else None, device)

        model = task.model.to(device)
        task.trainable(model)
        ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None
        sharded = cfg.fsdp and ddp.enabled  # one process holds everything anyway: --fsdp alone changes nothing
        if resume and checkpoint_dir(run_dir) is None:
            raise SigmaError(f"--resume: no checkpoint in '{run_dir}'")
        if not resume:
            check_new_run(run_dir)
        if sharded:
            if resume:  # whole weights into the whole model first; fully_shard then cuts them
                from checkpoints.io import load_state_checked

                ckpt = checkpoint_dir(run_dir)
                load_state_checked(model, ckpt / "model.safetensors")
                if ema is not None:
                    load_state_checked(ema, ckpt / ("ema.safetensors" if (ckpt / "ema.safetensors").exists() else "model.safetensors"))
            apply_fsdp(model, device, ddp.world)
            if ema is not None:  # sharded alike, so the EMA update runs on local shards
                apply_fsdp(ema, device, ddp.world)
        optimizer = task.make_optimizer(model, cfg) if hasattr(task, "make_optimizer") else make_optimizer(model, cfg)
        start = 0
        if resume:
            if sharded:
                start = load_training_state(run_dir, None, None, optimizer, weights=False)["step"]
                shard_optimizer_state(optimizer)
            else:
                start = load_training_state(run_dir, model, ema, optimizer)["step"]
            if start >= cfg.steps:
                raise SigmaError(f"'{run_dir}' is already at step {start}; pass --steps above {start} to continue")
        net = model
        if ddp.enabled and not sharded:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                      find_unused_parameters=getattr(task, "ddp_find_unused_parameters", False))
        if cfg.compile:
            net = torch.compile(net, backend=compile_backend())

        def save(step: int):
            # under FSDP2 gathering the whole tensors is collective: every rank takes part, rank 0 writes
            model_state = full_state(model.state_dict()) if sharded else model.state_dict()
            ema_state = (full_state(ema.state_dict()) if sharded else ema.state_dict()) if ema is not None else None
            opt = _GatheredOptimizer(optimizer) if sharded else optimizer
            if ddp.rank != 0:
                return
            save_training_state(run_dir, model_state=model_state, ema_state=ema_state, optimizer=opt,
                                counters={"step": step, "world": ddp.world})
            save_model(model, run_dir / getattr(task, "model_subfolder", ""), state_dict=ema_state or model_state)
            write_run_meta(run_dir, task, cfg, step)
            if cfg.keep_every and step % cfg.keep_every == 0:
                keep_snapshot(run_dir, step)

        # Ctrl-C: finish the current step, save, then stop (a second Ctrl-C stops at once).
        stop = {"asked": False}
        previous_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if stop["asked"]:
                raise KeyboardInterrupt
            stop["asked"] = True

        signal.signal(signal.SIGINT, on_sigint)
        run_dir.mkdir(parents=True, exist_ok=True)
        if ddp.rank == 0 and resume and (run_dir / RUN_LOG).exists():
            # drop lines logged after the checkpoint we resume from: the log reads as one uninterrupted run
            kept = [line for line in (run_dir / RUN_LOG).read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start]
            atomic_write_text(run_dir / RUN_LOG, "".join(line + "\n" for line in kept))
        metrics_file = open(run_dir / RUN_LOG, "a") if ddp.rank == 0 else None
        release_notes()  # every check has passed: the notes held back so far (small data folder, ignored options) show now
        progress = None
        if ddp.rank == 0 and not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=Console(stderr=True))
            bar = progress.add_task(getattr(task, "label", task.kind), total=cfg.steps, completed=start, info="")
            progress.start()
    except BaseException:  # (no rank is inside a collective of this run yet, or it fails there too)
        ddp.close(clean=False)
        raise
    step, last = start, {}
    finished = False
    t_start = time.time()
    try:
        model.train()
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            set_lr(optimizer, lr)
            generator = torch.Generator().manual_seed(step_seed(cfg.seed, step))
            with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
                loss, logs = task.loss(net, model, step, generator, ddp.rank, ddp.world)
            # one all-reduce carries the loss (for logs and the finite check), any rank's stop request and the
            # task's numeric logs: each rank's are of its share of the batch, the run's their weighted mean over the
            # ranks (Task.loss; NaN or weight 0: none in this share, e.g. no velocity groups; a figure no rank has
            # is left out)
            weighted = {k: vw for k in sorted(logs) if (vw := _log_weight(logs[k])) is not None}
            numeric = list(weighted)
            shared = ddp.mean(torch.tensor([loss.item(), float(stop["asked"]), *(v * w for v, w in weighted.values()),
                                            *(w for _, w in weighted.values())], dtype=torch.float64, device=device))
            weight = {k: shared[2 + len(numeric) + i].item() for i, k in enumerate(numeric)}
            mean = {k: shared[2 + i].item() / weight[k] for i, k in enumerate(numeric) if weight[k] > 0}
            logs = {k: mean[k] if k in weight else v for k, v in logs.items() if k in mean or k not in weight}
            if not math.isfinite(shared[0].item()):
                kept = (f"last good checkpoint kept in '{run_dir}'" if checkpoint_dir(run_dir) is not None
                        else "no checkpoint was written yet (try a lower --lr)")
                raise NonFiniteLoss(f"loss is not finite at step {step}; training stopped, {kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            optimizer.step()
            if hasattr(task, "after_step"):  # e.g. the MoE router's aux-loss-free bias update
                task.after_step(model, step)
            if ema is not None:
                update_ema(ema, model, cfg.ema, step)
            done = step + 1
            last = {"step": done, "loss": shared[0].item(), "lr": lr, **logs}
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if metrics_file and (done % cfg.log_every == 0 or done == cfg.steps):
                last["samples_per_s"] = (done - start) * task.samples_per_step / (time.time() - t_start)
                # null for a non-finite figure (an overflowing grad norm): NaN / Infinity are not JSON, and strict
                # readers (jq, JSON.parse) would reject the line
                metrics_file.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                               for k, v in last.items()}) + "\n")
                metrics_file.flush()
            if progress:
                progress.update(bar, completed=done, info=f"loss {last['loss']:.4f}")
            saved = done != cfg.steps and any(every and done % every == 0 for every in (cfg.save_every, cfg.keep_every))
            if saved:
                save(done)
            if cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.steps and ddp.rank == 0 and not sharded:
                task.pictures(ema or model, done, run_dir)
            if shared[1].item() > 0:
                if not saved:
                    save(done)
                raise Interrupted(f"interrupted at step {done}; saved, continue with --resume")
        step = cfg.steps
        save(step)
        # sharded weights cannot sample on one rank: pictures of FSDP runs come from the saved folder (sigma sample)
        pictures = task.pictures(ema or model, step, run_dir) if ddp.rank == 0 and not sharded else None
        finished = True
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if progress:
            progress.stop()
        if metrics_file:
            metrics_file.close()
        # a stop every rank agreed on (finished, Ctrl-C, non-finite loss) ends cleanly; anything else may have left a
        # peer inside a collective, where a barrier would hang
        ddp.close(clean=finished or isinstance(sys.exc_info()[1], (Interrupted, NonFiniteLoss)))
    elapsed = time.time() - t_start
    return {"run_dir": str(run_dir), "steps": step, "resumed_from": start, "final_loss": last.get("loss"),
            "seconds": round(elapsed, 2), "samples_per_s": round((step - start) * task.samples_per_step / max(elapsed, 1e-9), 2),
            "pictures": str(pictures) if pictures else None, "rank": ddp.rank}
