"""`sigma train-imm` and `sigma sample`: the few-step diffusion transformer (Inductive Moment Matching)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sigmacli.app import app
from sigmacli.common import (RESUME_CLASSES_HINT, CompileOpt, DeviceOpt, FsdpOpt, JsonOpt, KeepEveryOpt, PrecisionOpt,
                             SeedOpt, check_classes, check_precision, check_sizes, command, emit, fresh_run_folder, is_main_rank, output_folder, output_picture, picture_file,
                             parse_grid, resume_device, resumed_train_config, run_part, run_to_resume, steps_done,
                             trained_or_shipped)
from sigmacli.tokenizer import DataOpt


@app.command("train-imm")
@command
def train_imm(
    ctx: typer.Context = None,  # (injected by Typer; None when called from Python)
    preset: Annotated[str, typer.Option(help="Transformer and schedule size: tiny (2-core CPU) | small | base (GPU).")] = "tiny",
    space: Annotated[str, typer.Option(help="latent (the tokenizer's latents) | pixels (tubelet patches).")] = "latent",
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer folder for --space latent (default: runs/tokenizer if present, else the shipped one).")] = None,
    data: DataOpt = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image side (default 32; latent space: the tokenizer's).")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames per clip (default 1; latent space: the tokenizer's).")] = None,
    patch_size: Annotated[int, typer.Option(help="Patch side (--space pixels).")] = 4,
    tubelet: Annotated[Optional[int], typer.Option(help="Frames per tubelet (--space pixels; default 2 for even clips).")] = None,
    cube: Annotated[Optional[str], typer.Option(help="Token cube TxHxW for cube-major order (--space pixels; default: largest <= 4 per axis).")] = None,
    objective: Annotated[str, typer.Option(help="imm | flow-matching (the baseline: same network, Euler sampler).")] = "imm",
    group_size: Annotated[int, typer.Option(help="IMM particles per (s, r, t) group (M).")] = 4,
    groups: Annotated[str, typer.Option(help="IMM: how a step's batch forms one-class groups: sorted (its samples by class; a class's remainder goes to null-class groups) | complete (the first batch / M groups to fill up in a window of the data stream of twice the batch, or 2 M per class if more: no leftovers, the null class from --label-dropout alone; runs saved before the option resume sorted).")] = "complete",
    label_dropout: Annotated[float, typer.Option(help="Fraction of groups trained with the null class (for guidance). IMM with --groups sorted: at least this; the groups left over when a batch is sorted into one-class groups are null too.")] = 0.1,
    fm_fraction: Annotated[float, typer.Option(help="IMM: the fraction of groups that train the velocity G(x, t, t) by flow matching instead (euler_fm, fm schedule; 0 = pure IMM).")] = 0.0,
    fm_weight: Annotated[float, typer.Option(help="--fm-fraction: the weight of that velocity loss (its gradients are ~25x IMM's at weight 1).")] = 0.05,
    latent_norm: Annotated[str, typer.Option(help="Latent normalisation: channel (mean and std per channel) | token (per latent token and channel) | pca (the top --pca-dims principal components of the whole latent, scaled by --pca-whiten).")] = "channel",
    pca_whiten: Annotated[float, typer.Option(help="--latent-norm pca: scale each component by std^P (0 = the latent's own proportions, a rotation cut to --pca-dims; 1 = whitened, every direction the same variance, which on shapes learns nothing).")] = 0.0,
    pca_dims: Annotated[int, typer.Option(help="--latent-norm pca: principal components kept (a multiple of the latent width; the tokens are pca-dims / width of them).")] = 128,
    cache_latents: Annotated[Optional[bool], typer.Option("--cache-latents/--no-cache-latents", help="Encode a finite data set once instead of every step. Default: when the run passes over the data at least twice and the latents fit in 2 GiB (per process); decided at the start and kept on --resume unless given again.")] = None,
    schedule: Annotated[str, typer.Option(help="fm (alpha = 1 - t, sigma = t) | cosine")] = "fm",
    parameterization: Annotated[str, typer.Option(help="euler_fm | simple_edm")] = "euler_fm",
    time_sampler: Annotated[str, typer.Option(help="uniform (t ~ U, s ~ U(eps, t)) | lognormal (log eta_t ~ N(-1.1, 2))")] = "uniform",
    second_time: Annotated[str, typer.Option(help="The transformer's second time input: stride (t - s) | s")] = "stride",
    weight_a: Annotated[int, typer.Option(help="a in w(s,t)'s alpha_t^a (1 or 2).")] = 2,
    s_grid: Annotated[int, typer.Option(help="IMM: 0 draws s ~ U(eps, t); N > 0 draws s from the N-step sampling grid's times at or below t (trains only the jumps of 1..N-step sampling on nested uniform grids; N = 2: s in {eps, 0.5}).")] = 0,
    decrement_k: Annotated[int, typer.Option(help="k of r's decrement in eta, (eta_max - eta_min) / 2^k: smaller k, larger steps back from t.")] = 12,
    attn: Annotated[str, typer.Option(help="Attention kind: dense | nsa (3D Native Sparse Attention over --cube blocks) | mta (Multi-Token Attention).")] = "dense",
    kq_every: Annotated[int, typer.Option(help="MTA: key-query convolutions (6x11) in every N-th block (0 = none; head mixing runs in all).")] = 4,
    top_n: Annotated[int, typer.Option(help="NSA: KV cubes each query cube selects beyond its forced neighbourhood.")] = 2,
    radius: Annotated[str, typer.Option(help="NSA: forced neighbourhood TxHxW in cubes (0x0x0 = the query's own cube).")] = "0x0x0",
    align_teacher: Annotated[Optional[Path], typer.Option(help="A classifier folder (sigma train-classifier) whose pooled features of the clean image an auxiliary head predicts from early tokens (REPA).")] = None,
    align_weight: Annotated[float, typer.Option(help="Weight of the --align-teacher loss (1 - cosine); 0.1 balances IMM's small loss.")] = 0.1,
    align_depth: Annotated[int, typer.Option(help="The --align-teacher head reads the tokens after this many blocks.")] = 2,
    width: Annotated[Optional[int], typer.Option(help="Transformer width (default: the preset's).")] = None,
    depth: Annotated[Optional[int], typer.Option(help="Transformer blocks (default: the preset's).")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Attention heads (default: the preset's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the preset's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (default: the preset's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: the preset's).")] = None,
    ema: Annotated[Optional[float], typer.Option(help="EMA decay of the sampling weights (default: the preset's).")] = None,
    optimizer: Annotated[str, typer.Option(help="muon (Muon for the hidden matrices: attention, MLP, adaLN; AdamW for the rest) | adamw (everything).")] = "muon",
    muon_lr_scale: Annotated[float, typer.Option(help="--optimizer muon: the matrices' learning rate as a multiple of --lr (5 beat 10 and 20 on shapes).")] = 5.0,
    sample_steps: Annotated[int, typer.Option(help="Sampling steps for the training pictures (and sigma sample's default).")] = 2,
    cfg_scale: Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale for the pictures and sigma sample's default (default: 3 for IMM, 1.5 for flow matching: the best FD of each on shapes).")] = None,
    cfg_one_step: Annotated[Optional[float], typer.Option("--cfg-one-step", help="sigma sample's default guidance at --steps 1 (default: --cfg). The shipped 14,000-step model says 1.5: its 1-step samples are better there than at 3 (BENCHMARKS.md, fifteenth session).")] = None,
    start_time: Annotated[Optional[float], typer.Option(help="sigma sample's default start time (default: 0.95 for IMM, T = 0.994 for flow matching). IMM's loss weight vanishes as t -> T, and a 14,000-step run's jumps from T came apart; from 0.95 it sampled well, and shorter runs lost nothing (BENCHMARKS.md).")] = None,
    midpoint: Annotated[Optional[float], typer.Option(help="sigma sample's default middle time of 2-step sampling (default: 0.6 for IMM, uniform for flow matching; 0.6 lowered the FD on 7 of 8 shapes runs).")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).")] = 500,
    keep_every: KeepEveryOpt = None,
    sample_every: Annotated[int, typer.Option(help="Write a sample grid every N steps (0 = only at the end).")] = 500,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/imm, or runs/fm for flow matching).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    init: Annotated[Optional[Path], typer.Option(help="Start from the weights of this IMM or flow-matching run (its architecture, space, tokenizer and latent statistics); a new run with its own steps and schedule.")] = None,
    fsdp: FsdpOpt = False,
    compile_: CompileOpt = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Train a class-conditional diffusion transformer with Inductive Moment Matching (1-8 step sampling)."""
    check_precision(precision)
    import math
    import os

    import torch

    from checkpoints.io import RUN_META, load_model, read_json
    from pipelines.data import absolute_spec, make_dataset
    from pipelines.errors import SigmaError, release_notes, say
    from pipelines.imm.model import PRESETS, DiT
    from pipelines.imm.pipeline import IMMPipeline
    from pipelines.imm.schedule import IMMSchedule
    from pipelines.imm.trainer import (GROUPINGS, OBJECTIVES, OPTIMIZERS, TRAIN_PRESETS, IMMStage, IMMTask,
                                       encode_dataset, latent_statistics, pipeline_defaults, run_scheduler,
                                       should_cache_latents)
    from pipelines.nn.layers import ATTN_KINDS, auto_cube
    from pipelines.train import (TrainConfig, check_train_config, rank_device, resolve_device, train, uses_bf16,
                                 warn_slow_half)

    out = out or Path("runs/fm" if objective == "flow-matching" else "runs/imm")
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    show_progress = not as_json and is_main_rank()  # bars for the encoding passes before training (stderr)
    if resume and init is not None:
        raise SigmaError("--init starts a new run and --resume continues one: pass one of them")
    init_model = None
    if resume:  # everything but --steps comes from the run itself
        meta = run_to_resume(out, "imm", ctx, folder_options=("objective",))
        cfg = resumed_train_config(meta, steps, keep_every, resume_device(ctx, device))
        stage, sched = run_part(IMMStage, meta, "stage"), run_part(IMMSchedule, meta, "schedule")
        model = load_model(out, "imm")  # the architecture (and latent statistics) from transformer/config.json
        tok = load_model(out / "tokenizer", "tokenizer") if model.config.space == "latent" else None
        data, image_size, frames = meta["data_spec"], meta["image_size"], meta["frames"]
    else:
        fresh_run_folder(out)
        check_sizes(image_size, frames)
        if preset not in TRAIN_PRESETS:
            raise SigmaError(f"unknown preset {preset!r} (have: {', '.join(TRAIN_PRESETS)})")
        if objective not in OBJECTIVES:
            raise SigmaError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
        if groups not in GROUPINGS:
            raise SigmaError(f"--groups must be one of {', '.join(GROUPINGS)}, not {groups!r}")
        if optimizer not in OPTIMIZERS:
            raise SigmaError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
        if muon_lr_scale <= 0:
            raise SigmaError(f"--muon-lr-scale must be > 0, not {muon_lr_scale}")
        if space not in ("latent", "pixels"):
            raise SigmaError(f"--space must be latent or pixels, not {space!r}")
        if attn not in ATTN_KINDS:
            raise SigmaError(f"--attn {attn!r} is not available (have: {', '.join(ATTN_KINDS)})")
        if objective == "flow-matching" and (schedule != "fm" or parameterization != "euler_fm"):
            raise SigmaError("--objective flow-matching uses the fm schedule and the euler_fm parameterization")
        if not 0 <= fm_fraction < 1 or fm_weight < 0:
            raise SigmaError(f"--fm-fraction must be in [0, 1) and --fm-weight >= 0, not {fm_fraction} / {fm_weight}")
        if fm_fraction and (objective != "imm" or schedule != "fm" or parameterization != "euler_fm"):
            raise SigmaError("--fm-fraction needs --objective imm with the fm schedule and the euler_fm parameterization")
        if s_grid and objective != "imm":
            raise SigmaError("--s-grid picks IMM's s; flow matching has none")
        if group_size < 2 and objective == "imm":
            raise SigmaError("--group-size must be at least 2 (the MMD compares particles)")
        if not 0 <= label_dropout < 1:
            raise SigmaError(f"--label-dropout must be in [0, 1), not {label_dropout}")
        if sample_steps < 1:
            raise SigmaError("--sample-steps must be at least 1")
        for flag, value in (("--cfg", cfg_scale), ("--cfg-one-step", cfg_one_step)):
            if value is not None and not -100 <= value <= 100:  # as sigma sample checks it; also nan and inf
                raise SigmaError(f"{flag} must be a number in [-100, 100] (1: no guidance), not {value}")
        try:
            sched = IMMSchedule(schedule=schedule, parameterization=parameterization, time_sampler=time_sampler, weight_a=weight_a,
                                 k=decrement_k, s_grid=s_grid)
        except ValueError as e:  # the message names the field; say the option instead
            flags = {"schedule": "--schedule", "parameterization": "--parameterization", "time sampler": "--time-sampler",
                     "s_grid": "--s-grid", "weight_a": "--weight-a", "k ": "--decrement-k "}
            message = str(e)
            for field, flag in flags.items():
                if message.startswith(field):
                    message = flag + message[len(field):]
                    break
            raise SigmaError(message) from None
        cfg = TrainConfig(**{**TRAIN_PRESETS[preset], "seed": seed, "device": device, "save_every": save_every,
                             "keep_every": keep_every or 0, "sample_every": sample_every})
        for name, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr), ("ema", ema)):
            if value is not None:
                setattr(cfg, name, value)
        if latent_norm not in ("token", "channel", "pca"):
            raise SigmaError(f"--latent-norm must be token, channel or pca, not {latent_norm!r}")
        start_given = start_time is not None
        if objective == "imm":  # the sampling defaults an IMM run saves (flow matching: from T, uniform)
            start_time = 0.95 if start_time is None else start_time
            midpoint = 0.6 if midpoint is None and start_time > 0.6 else midpoint
        try:  # on every rank, before any work
            sched.sampling_times(2, midpoint, start_time)  # eps < midpoint < start <= T
        except ValueError as e:
            raise SigmaError(f"--{e}" + ("" if start_given else " (IMM's default start; see --start-time)")) from None
        stage = IMMStage(objective=objective, group_size=group_size, groups=groups, label_dropout=label_dropout, latent_norm=latent_norm,
                         latent_pca=pca_dims if latent_norm == "pca" else 0, pca_whiten=pca_whiten,
                         sample_steps=sample_steps, cfg_scale=cfg_scale, cfg_one_step=cfg_one_step, cache_latents=cache_latents, optimizer=optimizer,
                         start_time=start_time, midpoint=midpoint,
                         muon_lr_scale=muon_lr_scale, fm_fraction=fm_fraction, fm_weight=fm_weight)
        align_dim = 0
        if align_teacher is not None:
            teacher = load_model(align_teacher, "classifier")  # one line if it is not a classifier folder
            if align_weight <= 0:
                raise SigmaError(f"--align-weight must be > 0, not {align_weight}")
            stage.align_teacher, stage.align_weight, align_dim = str(align_teacher.resolve()), align_weight, teacher.config.feature_dim
        tok = None
        if init is not None:  # the network, its space, tokenizer and latent statistics come from the run we start from
            if tokenizer is not None:
                raise SigmaError(f"--init brings its own tokenizer ('{init}/tokenizer'); leave out --tokenizer")
            if any(v is not None for v in (width, depth, heads)):
                raise SigmaError(f"--init takes the architecture from '{init}'; leave out --width, --depth and --heads")
            init_model = load_model(init, "imm")
            stage.init = str(init)
            init_stage = read_json(init / RUN_META).get("stage", {}) if (init / RUN_META).exists() else {}
            for name in ("latent_norm", "latent_pca", "pca_whiten"):
                setattr(stage, name, init_stage.get(name, getattr(stage, name)))
            ic = init_model.config
            if (image_size not in (None, ic.image_size)) or (frames not in (None, ic.frames)):
                raise SigmaError(f"--init '{init}' generates {ic.frames}-frame {ic.image_size}px data, not "
                                 f"{frames or 1}-frame {image_size or 32}px")
            space, image_size, frames = ic.space, ic.image_size, ic.frames
            if space == "latent":
                tok = load_model(init / "tokenizer", "tokenizer")
                stage.tokenizer = init_stage.get("tokenizer", str(init / "tokenizer"))
            data = data or ("moving-shapes" if frames > 1 else "shapes")
        if space == "latent" and init is None:
            tok_dir = tokenizer or trained_or_shipped("tokenizer")
            tok = load_model(tok_dir, "tokenizer")
            stage.tokenizer = str(tok_dir)
            tc = tok.config
            if (image_size not in (None, tc.image_size)) or (frames not in (None, tc.frames)):
                raise SigmaError(f"the tokenizer '{tok_dir}' encodes {tc.frames}-frame {tc.image_size}px data; train one for "
                                 f"--frames {frames or 1} --image-size {image_size or 32} (sigma train-tokenizer) or use --space pixels")
            image_size, frames = tc.image_size, tc.frames
        image_size, frames = image_size or 32, frames or 1
        data = data or ("moving-shapes" if frames > 1 else "shapes")
        if tok is not None and init is None:  # easy to miss: --data defaults to shapes, whatever the tokenizer saw
            tok_data = read_json(tok_dir / RUN_META).get("data_spec") if (tok_dir / RUN_META).is_file() else None
            if tok_data and absolute_spec(tok_data) != absolute_spec(data):
                say(f"note: the tokenizer '{tok_dir}' was trained on '{tok_data}'; this run trains on '{data}' (--data)")
    check_train_config(cfg)
    group = stage.group_size if stage.objective == "imm" else 1
    if cfg.batch_size % (world * group):
        raise SigmaError(f"--batch-size {cfg.batch_size} must be divisible by {world} process(es) x group size {group}")
    torch.manual_seed(cfg.seed)
    train_set = make_dataset(data, image_size=image_size, frames=frames, split="train", seed=cfg.seed)
    heldout = make_dataset(data, image_size=image_size, frames=frames, split="heldout", seed=cfg.seed)
    dev = rank_device(resolve_device(cfg.device))  # under torchrun on CUDA: this rank's GPU (the statistics below run on it)
    if resume:
        check_classes(model.config, train_set, f"the run in '{out}'", RESUME_CLASSES_HINT)
    if resume and cache_latents is not None:  # the one data-path choice a resumed run may change (e.g. memory)
        stage.cache_latents = cache_latents
    # decided once and saved with the run, so a resume with more --steps does not switch paths mid-run
    stage.cache_latents = should_cache_latents(stage.cache_latents, train_set, tok, cfg.steps, cfg.batch_size)
    if init_model is not None:
        if align_dim and init_model.config.align_dim != align_dim:
            raise SigmaError(f"--align-teacher needs a head of {align_dim} features; '{init}' has "
                             f"{init_model.config.align_dim or 'none'}: start it without --init")
        ic, data_names = init_model.config, list(train_set.class_names)
        if ic.num_classes != len(data_names):
            raise SigmaError(f"--init '{init}' knows {ic.num_classes} classes [{', '.join(ic.class_names or [])}]; the "
                             f"data '{train_set.name}' has {len(data_names)} [{', '.join(data_names)}]")
        if ic.class_names and list(ic.class_names) != data_names:  # fine-tuning onto other classes: the labels keep
            # their indices, the names become the data's (sigma sample --class-label then takes the new ones)
            say(f"note: --init '{init}' knows classes [{', '.join(ic.class_names)}]; this run's label i is the data's "
                f"class i: [{', '.join(data_names)}]")
            init_model.register_to_config(class_names=data_names)
        model = init_model.float()
    elif not resume:
        arch = {**PRESETS[preset], **{k: v for k, v in (("width", width), ("depth", depth), ("heads", heads)) if v is not None}}
        small = [f"--{k} {arch[k]}" for k in ("width", "depth", "heads") if arch[k] < 1]
        if small:
            raise SigmaError(f"{', '.join(small)}: must be at least 1")
        if arch["width"] % arch["heads"] or (arch["width"] // arch["heads"]) % 2:
            raise SigmaError(f"--width {arch['width']} must split into --heads {arch['heads']} heads of even size")
        if align_dim and not 1 <= align_depth <= arch["depth"]:
            raise SigmaError(f"--align-depth must be between 1 and --depth {arch['depth']}, not {align_depth}")
        attn_config = None
        if attn == "nsa":
            if top_n < 0:
                raise SigmaError(f"--top-n must be >= 0, not {top_n}")
            attn_config = {"top_n": top_n, "radius": list(parse_grid(radius, "--radius", minimum=0))}
        elif attn == "mta":
            if kq_every < 0:
                raise SigmaError(f"--kq-every must be >= 0, not {kq_every}")
            attn_config = {"kq_every": kq_every}
        common = dict(arch, num_classes=train_set.num_classes, class_names=list(train_set.class_names),
                      second_time=second_time, attn=attn, attn_config=attn_config, image_size=image_size,
                      frames=frames, data_std=sched.sigma_d, align_dim=align_dim, align_depth=align_depth)
        if second_time not in ("stride", "s"):
            raise SigmaError(f"--second-time must be stride or s, not {second_time!r}")

        def make_dit(**kw) -> DiT:
            try:
                return DiT(**kw)
            except ValueError as e:  # an attention kind's own constraint, e.g. MTA's pairs of heads
                raise SigmaError(str(e)) from None

        if space == "latent":
            tc = tok.config
            grid = (tc.frames // tc.tubelet, tc.image_size // tc.patch_size, tc.image_size // tc.patch_size)
            if stage.latent_norm == "pca":  # (not stage.latent_pca: --pca-dims 0 must fail the check below)
                k, size = stage.latent_pca, tc.num_latents * tc.latent_dim
                if k < 1 or k % tc.latent_dim or k > min(size, stage.latent_stats_samples):
                    raise SigmaError(f"--pca-dims must be a multiple of the latent width {tc.latent_dim} in "
                                     f"[{tc.latent_dim}, {min(size, stage.latent_stats_samples)}], not {k}")
                if not 0 <= stage.pca_whiten <= 1:
                    raise SigmaError(f"--pca-whiten must be in [0, 1], not {stage.pca_whiten}")
                mean, std, basis = latent_statistics(tok.to(dev), train_set, stage.latent_stats_samples, dev, pca=k,
                                                     whiten=stage.pca_whiten, show_progress=show_progress)
                model = make_dit(space="latent", num_tokens=k // tc.latent_dim, token_dim=tc.latent_dim, grid=grid,
                            latent_mean=mean, latent_std=std, latent_pca=k,
                            latent_shape=(tc.num_latents, tc.latent_dim), **common)
                model.set_latent_basis(basis)
            else:
                mean, std = latent_statistics(tok.to(dev), train_set, stage.latent_stats_samples, dev,
                                              per_token=stage.latent_norm == "token", show_progress=show_progress)
                model = make_dit(space="latent", num_tokens=tc.num_latents, token_dim=tc.latent_dim, grid=grid,
                            latent_mean=mean, latent_std=std, **common)
        else:
            tubelet = tubelet if tubelet is not None else (2 if frames > 1 and frames % 2 == 0 else 1)
            if patch_size < 1 or tubelet < 1:
                raise SigmaError(f"--patch-size and --tubelet must be at least 1, not {patch_size} / {tubelet}")
            if image_size % patch_size or frames % tubelet:
                raise SigmaError(f"--image-size {image_size} / --frames {frames} are not divisible by the patch "
                                 f"{patch_size} / tubelet {tubelet}")
            grid = (frames // tubelet, image_size // patch_size, image_size // patch_size)
            cube_t = parse_grid(cube, "--cube") if cube else auto_cube(grid)
            if any(g % c for g, c in zip(grid, cube_t)):
                raise SigmaError(f"the token grid {'x'.join(map(str, grid))} is not divisible by --cube {'x'.join(map(str, cube_t))}")
            model = make_dit(space="pixels", num_tokens=math.prod(grid), token_dim=3 * tubelet * patch_size**2, grid=grid,
                        cube=cube_t, patch_size=patch_size, tubelet=tubelet, **common)
    if not resume and is_main_rank():  # the run folder is a diffusers pipeline folder from the start
        IMMPipeline(model, run_scheduler(sched, stage), tok, **pipeline_defaults(stage)).save_pretrained(out)
    cfg.fsdp, cfg.compile = fsdp, compile_
    cfg.precision = precision or cfg.precision
    latents = None
    if stage.cache_latents:  # every process encodes the whole set (and holds it): simple, and cheap next to training
        bf16 = uses_bf16(cfg.precision, dev)  # (dev: this rank's device)
        warn_slow_half(torch.bfloat16 if bf16 else None, dev)
        release_notes()  # the encoding takes a while: a slow-bf16 warning held until training starts would come after it
        latents = encode_dataset(tok.to(dev), train_set, dev, bf16=bf16,
                                 show_progress=show_progress)
    task = IMMTask(model, sched, stage, train_set, heldout, tok, cfg.batch_size, cfg.seed, data_spec=data, latents=latents,
                   compile_encoder=cfg.compile)
    result = train(task, cfg, out, resume=resume, quiet=as_json)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["objective"] = stage.objective
    result["latents_cached"] = stage.cache_latents
    emit(result, as_json, [
        f"{steps_done(result)} in {result['seconds']:.0f} s ({result['samples_per_s']:.0f} samples/s), "
        f"final loss {result['final_loss']:.4g}",
        f"weights: {out}/" + (f"    samples: {result['pictures']}" if result["pictures"] else ""),  # (none under FSDP)
        f"sample: sigma sample --model {out}",
    ])



def load_pipeline(folder: Path, device):
    """(transformer, scheduler, tokenizer, run metadata) of an IMM run/pipeline folder, with one-line errors."""
    from checkpoints.io import RUN_META, load_model, read_json
    from checkpoints.meta import PIPELINE_INDEX
    from pipelines.errors import CheckpointError
    from pipelines.imm.scheduler import IMMScheduler
    from pipelines.imm.trainer import stage_from_pipeline

    model = load_model(folder, "imm", device)
    if model.config.space == "latent" and not (folder / "tokenizer").is_dir():
        if (folder.parent / "model_index.json").exists():
            raise CheckpointError(f"'{folder}' is the transformer of an IMM run; pass the run folder '{folder.parent}'")
        raise CheckpointError(f"'{folder}' has no tokenizer/ folder, which a latent-space IMM model needs")
    tok = load_model(folder / "tokenizer", "tokenizer", device) if model.config.space == "latent" else None
    sched_config = {k: v for k, v in read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config").items()
                    if not k.startswith("_")}
    try:
        scheduler = IMMScheduler(**sched_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"'{folder}/scheduler' is not a valid IMM scheduler config ({e})") from None
    if (folder / RUN_META).exists():
        meta = read_json(folder / RUN_META)
    else:  # a folder IMMPipeline.save_pretrained wrote: the run's sampling defaults are in its model_index.json
        index = read_json(folder / PIPELINE_INDEX, "pipeline index") if (folder / PIPELINE_INDEX).exists() else {}
        meta = {"stage": stage_from_pipeline(index)}
    return model, scheduler, tok, meta


def sampling_options(meta: dict, steps, cfg, sampler, scheduler=None, midpoint=None, start_time=None) -> tuple[int, float]:
    """Steps and guidance scale (defaults: the run's), with the sampler name checked; a --midpoint or
    --start-time is checked and set on the scheduler (the run's scheduler config holds the defaults)."""
    from pipelines.errors import SigmaError
    from pipelines.imm.scheduler import SAMPLERS
    from pipelines.imm.trainer import default_guidance

    stage = meta.get("stage", {})
    steps = steps if steps is not None else stage.get("sample_steps", 2)
    cfg = cfg if cfg is not None else default_guidance(stage, steps)  # the run's (a run may keep another for 1 step)
    if not 1 <= steps <= 1000:
        raise SigmaError(f"--steps must be between 1 and 1000, not {steps}")
    if not -100 <= cfg <= 100:  # also catches nan and inf, which would sample blank pictures
        raise SigmaError(f"--cfg must be a number in [-100, 100] (1: no guidance), not {cfg}")
    if sampler is not None and sampler not in SAMPLERS:
        raise SigmaError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    if midpoint is not None and steps != 2:
        raise SigmaError(f"--midpoint is the middle time of 2-step sampling; it needs --steps 2, not {steps}")
    if scheduler is not None:
        # a value given here replaces the run's; the scheduler drops a run's midpoint at or after the start
        start_time = start_time if start_time is not None else scheduler.config.start_time
        try:
            scheduler.schedule.sampling_times(steps, midpoint, start_time)  # eps < midpoint < start <= T
        except ValueError as e:
            raise SigmaError(f"--{e}") from None
        scheduler.register_to_config(start_time=start_time, **({} if midpoint is None else {"midpoint": midpoint}))
    return steps, cfg


def parse_labels(values: list[str], class_names: list[str], num: int) -> "torch.Tensor":  # noqa: F821
    """Class labels from names or indices (cycled to `num`); none given: every class in turn."""
    import torch

    from pipelines.errors import SigmaError

    if not values:
        return torch.arange(num) % len(class_names)
    labels = []
    for v in values:
        # a class named "tench, Tinca tinca" (a folder's name) is one label, not two
        for item in [v] if v in class_names else [part.strip() for part in v.split(",")]:
            if item in class_names:
                labels.append(class_names.index(item))
            elif item.isdecimal() and int(item) < len(class_names):  # (not isdigit: int("²") fails)
                labels.append(int(item))
            else:
                raise SigmaError(f"unknown class label {item!r}; this model knows: {', '.join(class_names)}")
    return torch.tensor(labels)[torch.arange(num) % len(labels)]


@app.command()
@command
def sample(
    model: Annotated[Optional[Path], typer.Option(help="An IMM run folder (default: the shipped shapes model).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps: 1-8 for IMM (more work too, but gain little), tens for flow matching's Euler (default: the run's, 2).")] = None,
    num: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    class_label: Annotated[Optional[list[str]], typer.Option("--class-label", help="Class name or index (repeat or comma-separate; default: all classes in turn).")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Classifier-free guidance scale (default: the run's).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="pushforward | restart (IMM) | euler (flow matching); default: the run's.")] = None,
    midpoint: Annotated[Optional[float], typer.Option(help="2 steps: the middle time (default: the run's, 0.6 for IMM runs; else uniform). A run's midpoint at or after --start-time gives way to uniform times.")] = None,
    start_time: Annotated[Optional[float], typer.Option(help="The time the first step starts from (default: the run's, else T = 0.994): the start noise is scaled to x's std at that time and read as x there. 0.9-0.97 rescued a long run whose jumps from T had come apart (README).")] = None,
    out: Annotated[Optional[Path], typer.Option(parser=picture_file, metavar="<path>", help="Picture grid: PNG for images, animated GIF for clips (default samples.png / samples.gif).")] = None,
    save_individual: Annotated[Optional[Path], typer.Option(help="Also write every sample to this folder.")] = None,
    nrow: Annotated[int, typer.Option(help="Samples per row of the grid.")] = 8,
    compile_: CompileOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Generate images (PNG grid) or clips (GIF grid) with a trained IMM model."""
    import time

    import torch

    from checkpoints import SHIPPED
    from pipelines.errors import SigmaError
    from pipelines.imm.sampling import generate
    from pipelines.train import resolve_device
    from pipelines.visual import save_individual as write_each
    from pipelines.visual import save_media

    folder = model or SHIPPED["imm"]
    if model is None and not (folder / "model_index.json").exists():
        raise SigmaError(f"no shipped model at '{folder}'; train one with `sigma train-imm` and pass --model runs/imm")
    dev = resolve_device(device)
    net, scheduler, tok, meta = load_pipeline(folder, dev)
    steps, cfg = sampling_options(meta, steps, cfg, sampler, scheduler, midpoint, start_time)
    if num < 1 or nrow < 1:
        raise SigmaError("--num and --nrow must be at least 1")
    class_names = net.config.class_names or [str(i) for i in range(net.config.num_classes)]
    labels = parse_labels(class_label or [], class_names, num)
    clips = net.config.frames > 1
    out = output_picture(out or Path("samples.gif" if clips else "samples.png"), clips)
    if save_individual is not None:
        output_folder(save_individual, "--save-individual")
    if compile_:  # the transformer only: the sampler loop is a few Python steps
        from pipelines.train import compile_backend

        net.forward = torch.compile(net.forward, backend=compile_backend())
    start = time.perf_counter()
    x = generate(net, scheduler, labels, steps, torch.Generator().manual_seed(seed), tok, cfg, sampler)
    seconds = time.perf_counter() - start
    written = save_media(x, out, nrow=nrow)
    if save_individual is not None:
        write_each(x, save_individual)
    result = {"model": str(folder), "num": num, "steps": steps, "cfg": cfg, "sampler": scheduler.sampler, "seed": seed,
              "times": [round(float(t), 4) for t in scheduler.times],
              "seconds": round(seconds, 3), "picture": str(written), "labels": labels.tolist(),
              "individual": str(save_individual) if save_individual else None}
    emit(result, as_json, [f"{num} samples, {steps} step(s), cfg {cfg}, in {seconds:.2f} s: {written}"])


@app.command("eval")
@command
def eval_(
    model: Annotated[Optional[Path], typer.Option(help="An IMM run folder (default: the shipped shapes model).")] = None,
    num: Annotated[int, typer.Option(help="Generated samples (and held-out samples per reference set).")] = 1000,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: the run's).")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale (default: the run's).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="pushforward | restart | euler (default: the run's).")] = None,
    midpoint: Annotated[Optional[float], typer.Option(help="2 steps: the middle time (default: the run's, 0.6 for IMM runs; else uniform). A run's midpoint at or after --start-time gives way to uniform times.")] = None,
    start_time: Annotated[Optional[float], typer.Option(help="The time the first step starts from (default: the run's, else T = 0.994): the start noise is scaled to x's std at that time and read as x there. 0.9-0.97 rescued a long run whose jumps from T had come apart (README).")] = None,
    classifier: Annotated[Optional[Path], typer.Option(help="Classifier folder for the features (default: runs/classifier if present, else the shipped one).")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Fréchet distance (shapes-classifier features) to held-out data, and class accuracy of conditional samples."""
    import shlex
    import time

    import torch

    from checkpoints import SHIPPED
    from checkpoints.io import load_model
    from pipelines.data import make_dataset
    from pipelines.errors import SigmaError
    from pipelines.evaluation.classifier import class_order, extract_features, predict
    from pipelines.imm.sampling import generate
    from pipelines.metrics import class_accuracy, confusion_matrix, frechet_distance
    from pipelines.train import resolve_device

    folder = model or SHIPPED["imm"]
    dev = resolve_device(device)
    net, scheduler, tok, meta = load_pipeline(folder, dev)
    steps, cfg = sampling_options(meta, steps, cfg, sampler, scheduler, midpoint, start_time)
    if num < 2:
        raise SigmaError("--num must be at least 2")
    c = net.config
    heldout = make_dataset(meta.get("data_spec", "shapes"), image_size=c.image_size, frames=c.frames, split="heldout", seed=seed)
    n_ref = min(num, len(heldout) // 2)
    if n_ref < 2:
        raise SigmaError(f"the held-out split of '{meta.get('data_spec')}' has {len(heldout)} item(s); the FD needs "
                         "two reference sets of at least 2 (a folder of at least ~40 images)")
    clf_dir = classifier or trained_or_shipped("classifier")
    clf = load_model(clf_dir, "classifier", dev)
    to_model = class_order(clf, c.class_names)  # the same classes in any order are matched by name
    if to_model is None:
        mismatch = f"the classifier in '{clf_dir}' knows classes {clf.config.class_names}, the model {c.class_names}"
        if c.num_classes < 2:  # train-classifier refuses one class: pointing there would lead to a second error
            raise SigmaError(f"{mismatch}: sigma eval needs a classifier of the model's classes, and a classifier needs "
                             "at least 2 (a data folder without class sub-folders has one, 'all')")
        spec = shlex.quote(meta.get("data_spec", "shapes"))  # (a folder with a space must survive a copy and paste)
        raise SigmaError(f"{mismatch}: train one on the model's data (sigma train-classifier --data {spec} "
                         f"--image-size {c.image_size} --out DIR) and pass --classifier DIR")
    real_a, _ = heldout.get_batch(torch.arange(n_ref))
    real_b, _ = heldout.get_batch(torch.arange(n_ref, 2 * n_ref))
    labels = torch.arange(num) % c.num_classes
    start = time.perf_counter()
    x = generate(net, scheduler, labels, steps, torch.Generator().manual_seed(seed), tok, cfg, sampler)
    seconds = time.perf_counter() - start
    feats = {name: extract_features(clf, v.to(dev)) for name, v in (("gen", x), ("a", real_a), ("b", real_b))}
    fd = frechet_distance(feats["gen"], feats["a"])
    floor = frechet_distance(feats["b"], feats["a"])
    pred = to_model[predict(clf, x.to(dev)).cpu()]  # per frame, in the model's class numbering
    asked = labels.repeat_interleave(x.shape[2])
    accuracy = class_accuracy(pred, asked)
    # which classes the model draws well and what it draws instead: rows = asked for, columns = classified as
    confusion = confusion_matrix(pred, asked, c.num_classes)
    names = c.class_names or [str(i) for i in range(c.num_classes)]
    # (None for a class --num left unsampled, not a 0 % it never had the chance to earn)
    per_class = {n: round(float(row[i] / row.sum()), 4) if row.sum() else None for i, (n, row) in enumerate(zip(names, confusion))}
    result = {"model": str(folder), "num": num, "steps": steps, "cfg": cfg, "sampler": sampler or scheduler.sampler,
              "times": [round(float(t), 4) for t in scheduler.times],
              "fd": fd, "fd_real_floor": floor, "class_accuracy": accuracy, "per_class_accuracy": per_class,
              "confusion": confusion.tolist(), "reference": n_ref,
              "sampling_seconds": round(seconds, 2), "classifier": str(clf_dir)}
    emit(result, as_json, [
        f"FD {fd:.3f} (real vs real floor {floor:.3f}, {n_ref} held-out each), class accuracy {100 * accuracy:.1f} %",
        "per class: " + ", ".join(f"{n} {100 * a:.0f} %" if a is not None else f"{n} not sampled" for n, a in per_class.items()),
        f"{num} samples, {steps} step(s), cfg {cfg}, sampled in {seconds:.1f} s",
    ])
