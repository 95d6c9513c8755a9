"""`sigma train-lm`, `sigma generate`, `sigma eval-lm`, `sigma bench-moe`: the DeepSeekMoE text LM."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from sigmacli.app import app
from sigmacli.common import (CompileOpt, DeviceOpt, FsdpOpt, JsonOpt, KeepEveryOpt, PrecisionOpt, SeedOpt,
                             check_precision, command, emit, fresh_run_folder, resume_device, resumed_train_config, run_part,
                             run_to_resume, steps_done)


def recorded_file_needed(spec, what: str, hint: str = ""):
    """A run's recorded text file (sigma.json's data_spec) that is gone: one line naming it, not '--data ...'."""
    from pipelines.errors import SigmaError
    from pipelines.lm.data import DEFAULT

    if spec not in (None, "", DEFAULT) and not Path(spec).is_file():
        raise SigmaError(f"{what}, which is not a file any more: move it back{hint}")


@app.command("train-lm")
@command
def train_lm(
    ctx: typer.Context = None,  # (injected by Typer; None when called from Python)
    data: Annotated[Optional[str], typer.Option(help="A text file (default: CPython's pydoc_data.topics, read at run time).")] = None,
    ffn: Annotated[str, typer.Option(help="moe (DeepSeekMoE) | dense (SwiGLU of the same active size).")] = "moe",
    dense: Annotated[bool, typer.Option("--dense", help="Shorthand for --ffn dense.")] = False,
    attn: Annotated[str, typer.Option(help="Attention: dense | nsa (causal 1D) | mta (causal) | dsa (lightning indexer + top-k).")] = "dense",
    dsa_stage: Annotated[str, typer.Option(help="DSA: warmup (dense attention, only the indexer learns) | sparse.")] = "sparse",
    dsa_top_k: Annotated[int, typer.Option(help="DSA: tokens each query attends to.")] = 32,
    init: Annotated[Optional[Path], typer.Option(help="Start from this LM's weights (e.g. a dense run before DSA's warm-up; missing indexer weights start fresh).")] = None,
    router: Annotated[str, typer.Option(help="sigmoid (DeepSeek-V3, with the aux-loss-free bias) | softmax.")] = "sigmoid",
    bias_update: Annotated[float, typer.Option(help="gamma of the aux-loss-free bias update (0 = off).")] = 1e-3,
    balance_loss: Annotated[float, typer.Option(help="alpha of the sequence-wise balance loss (0 = off).")] = 0.0,
    optimizer: Annotated[str, typer.Option(help="adamw | muon (matrices incl. each expert's; AdamW for the rest).")] = "adamw",
    width: Annotated[Optional[int], typer.Option(help="Model width (default: the preset's).")] = None,
    depth: Annotated[Optional[int], typer.Option(help="Blocks (default: the preset's).")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Attention heads.")] = None,
    context: Annotated[Optional[int], typer.Option(help="Context length in bytes.")] = None,
    experts: Annotated[Optional[int], typer.Option(help="Routed experts.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Experts per token.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the preset's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per step (global).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW; Muon runs at 10x).")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 500,
    keep_every: KeepEveryOpt = None,
    sample_every: Annotated[int, typer.Option(help="Write samples.txt every N steps (0 = only at the end).")] = 500,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/lm, or runs/lm-dense).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    fsdp: FsdpOpt = False,
    compile_: CompileOpt = False,
    precision: PrecisionOpt = None,
    preset: Annotated[str, typer.Option(help="Size preset: tiny.")] = "tiny",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Train the byte-level DeepSeekMoE language model (through the shared loop: checkpoints, resume, torchrun)."""
    check_precision(precision)
    import torch

    from checkpoints.io import load_model
    from pipelines.errors import SigmaError
    from pipelines.lm.data import ByteCorpus
    from pipelines.lm.model import LM_ATTN_KINDS, MoELM
    from pipelines.lm.trainer import LM_PRESETS, LM_TRAIN, LMStage, LMTask, evaluate
    from pipelines.train import TrainConfig, check_train_config, evaluable, train

    ffn = "dense" if dense else ffn
    out = out or Path("runs/lm-dense" if ffn == "dense" else "runs/lm")
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    if resume:
        meta = run_to_resume(out, "lm", ctx, folder_options=("ffn", "dense"))
        cfg = resumed_train_config(meta, steps, keep_every, resume_device(ctx, device))
        stage = run_part(LMStage, meta, "stage")
        model = load_model(out, "lm")
        data = meta["data_spec"]
        recorded_file_needed(data, f"--resume continues on the run's text file '{data}'")
    else:
        fresh_run_folder(out)
        if preset not in LM_PRESETS:
            raise SigmaError(f"unknown preset {preset!r} (have: {', '.join(LM_PRESETS)})")
        if ffn not in ("moe", "dense"):
            raise SigmaError(f"--ffn must be moe or dense, not {ffn!r}")
        if attn not in LM_ATTN_KINDS:
            raise SigmaError(f"--attn {attn!r} is not available for the LM (have: {', '.join(LM_ATTN_KINDS)})")
        if dsa_stage not in ("warmup", "sparse"):
            raise SigmaError(f"--dsa-stage must be warmup or sparse, not {dsa_stage!r}")
        if dsa_stage == "warmup" and attn != "dsa":
            raise SigmaError(f"--dsa-stage warmup fits DSA's indexers; it needs --attn dsa, not --attn {attn}")
        if dsa_stage == "warmup" and init is None:  # the frozen model would be a random one
            raise SigmaError("--dsa-stage warmup fits the indexers to a trained model's attention: give it --init RUN")
        if not (bias_update >= 0 and balance_loss >= 0):  # (nan fails too)
            raise SigmaError(f"--bias-update and --balance-loss must be >= 0 (0 = off), not {bias_update} / {balance_loss}")
        if optimizer not in ("adamw", "muon"):
            raise SigmaError(f"--optimizer must be adamw or muon, not {optimizer!r}")
        arch = dict(LM_PRESETS[preset])
        given = [k for k, v in (("width", width), ("depth", depth), ("heads", heads), ("context", context),
                                ("experts", experts), ("top_k", top_k)) if v is not None]
        if init is not None and given:
            raise SigmaError(f"--init takes the architecture from '{init}'; leave out "
                             + ", ".join(f"--{k.replace('_', '-')}" for k in given))
        for k, v in (("width", width), ("depth", depth), ("heads", heads), ("context", context), ("experts", experts), ("top_k", top_k)):
            if v is not None:
                if v < 1:
                    raise SigmaError(f"--{k.replace('_', '-')} must be at least 1, not {v}")
                arch[k] = v
        cfg = TrainConfig(**{**LM_TRAIN[preset], "seed": seed, "device": device, "save_every": save_every,
                             "keep_every": keep_every or 0, "sample_every": sample_every})
        for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
            if v is not None:
                setattr(cfg, k, v)
        stage = LMStage(optimizer=optimizer)
        attn_config = {"stage": dsa_stage, "top_k": dsa_top_k} if attn == "dsa" else None
        if init is not None:  # the architecture comes from the run we start from
            src = load_model(init, "lm")
            arch = {k: src.config[k] for k in ("width", "depth", "heads", "kv_heads", "context", "experts", "expert_hidden",
                                               "top_k", "shared_experts")}
            ffn = src.config.ffn
        torch.manual_seed(seed)  # the initial weights follow --seed too
        try:
            model = MoELM(**arch, ffn=ffn, router=router, bias_update=bias_update, balance_loss=balance_loss, attn=attn,
                          attn_config=attn_config)
        except ValueError as e:
            raise SigmaError(str(e)) from None
        if init is not None:
            missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
            indexer = {n for n, _ in model.named_parameters() if ".index_" in n}
            if unexpected or set(missing) - indexer:
                raise SigmaError(f"--init '{init}' does not fit this model (missing {sorted(set(missing) - indexer)[:3]}, "
                                 f"unexpected {sorted(unexpected)[:3]})")
    if fsdp and world > 1 and LMTask.dsa_warmup(model):  # (checked before any work: FSDP2 would train nothing)
        raise SigmaError("--fsdp cannot train DSA's warm-up: the frozen model's output carries no gradient, so FSDP2 "
                         "never reduces the indexers' gradients to their shards and they would not learn; run it without --fsdp (DDP)")
    check_train_config(cfg)
    if cfg.batch_size % world:
        raise SigmaError(f"--batch-size {cfg.batch_size} must be divisible by {world} processes")
    torch.manual_seed(cfg.seed)
    corpus = ByteCorpus(data, model.config.context)
    if resume and meta.get("data_sha256") not in (None, corpus.digest):
        from pipelines.errors import say

        say(f"note: the run's text file '{data}' has changed since the run last saved; training goes on on the new text")
    task = LMTask(model, corpus, stage, cfg.batch_size, data, cfg)
    cfg.fsdp, cfg.compile = fsdp, compile_
    cfg.precision = precision or cfg.precision
    result = train(task, cfg, out, resume=resume, quiet=as_json)
    if result["rank"] == 0:
        result.update(evaluate(evaluable(model, out, "lm").eval(), corpus))
    result["parameters"] = sum(p.numel() for p in model.parameters())
    cfgm = model.config
    active = result["parameters"] - (0 if cfgm.ffn == "dense" else cfgm.depth * (cfgm.experts - cfgm.top_k) * 3 * cfgm.width * cfgm.expert_hidden)
    result["active_parameters"] = active
    emit(result, as_json, [
        f"{steps_done(result)} in {result['seconds']:.0f} s ({result['samples_per_s']:.0f} tokens/s), "
        f"validation {result.get('bits_per_byte', float('nan')):.3f} bits/byte",
        f"weights: {out}/" + (f"    sample: {result['pictures']}" if result["pictures"] else ""),  # (none under FSDP)
        f"generate: sigma generate --model {out} --prompt 'The '",
    ])


@app.command()
@command
def generate(
    model: Annotated[Path, typer.Option(help="An LM folder (sigma train-lm).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "The ",
    max_new_tokens: Annotated[int, typer.Option(help="Bytes to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely bytes (0 = all).")] = 40,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole window every step.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Continue a prompt with a trained LM (KV cache for every attention kind)."""
    import torch

    from checkpoints.io import load_model
    from pipelines.errors import SigmaError
    from pipelines.lm.data import decode, encode, visible
    from pipelines.train import resolve_device

    if max_new_tokens < 1:
        raise SigmaError("--max-new-tokens must be at least 1")
    if not 0 <= temperature <= 1e4 or top_k < 0:  # (nan and inf fail the range too)
        raise SigmaError("--temperature must be in [0, 10000] and --top-k must not be negative")
    if not prompt:
        raise SigmaError("--prompt must not be empty")
    dev = resolve_device(device)
    lm = load_model(model, "lm", dev)
    ids = encode(prompt)[None].to(dev)  # a prompt's bytes as given, UTF-8 or not
    prompt = decode(ids[0].tolist())  # shown (and in --json) as text: bytes that are not UTF-8 as U+FFFD
    out = lm.generate(ids, max_new_tokens, temperature, top_k or None, torch.Generator(device=dev).manual_seed(seed),
                      use_cache=not no_cache)
    text = decode(out[0, ids.shape[1]:].tolist())
    # the plain output shows control characters as symbols (a terminal would act on them); --json keeps them exact
    emit({"prompt": prompt, "text": text, "tokens": max_new_tokens}, as_json, [visible(prompt + text)])


@app.command("eval-lm")
@command
def eval_lm(
    model: Annotated[Path, typer.Option(help="An LM folder (sigma train-lm).")],
    data: Annotated[Optional[str], typer.Option(help="Text file (default: the run's own data).")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
):
    """Validation loss and bits per byte on the held-out tail of the text."""
    from checkpoints.io import RUN_META, load_model, read_json
    from pipelines.lm.data import ByteCorpus
    from pipelines.lm.trainer import evaluate
    from pipelines.train import resolve_device

    lm = load_model(model, "lm", resolve_device(device))
    if data is None and (model / RUN_META).exists():
        data = read_json(model / RUN_META).get("data_spec")
        recorded_file_needed(data, f"the run '{model}' was trained on '{data}'", " (or give --data FILE)")
    corpus = ByteCorpus(data, lm.config.context)
    r = {"model": str(model), "data": corpus.name, **evaluate(lm, corpus)}
    emit(r, as_json, [f"{corpus.name}: validation loss {r['val_loss']:.4f} nats/byte, {r['bits_per_byte']:.4f} bits/byte "
                      f"over {r['val_bytes']:,} held-out bytes"])


@app.command("bench-moe")
@command
def bench_moe(
    tokens: Annotated[int, typer.Option(help="Tokens per call.")] = 4096,
    dim: Annotated[int, typer.Option(help="Model width d.")] = 256,
    experts: Annotated[int, typer.Option(help="Routed experts.")] = 16,
    hidden: Annotated[int, typer.Option(help="Hidden size of each expert.")] = 128,
    top_k: Annotated[int, typer.Option(help="Experts per token.")] = 4,
    dtype: Annotated[str, typer.Option(help="fp32 | bf16")] = "fp32",
    repeats: Annotated[int, typer.Option(help="Timed rounds, the methods taking turns (the minimum is reported).")] = 10,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
):
    """Grouped dispatch vs the per-expert loop (and our sorted matmul-loop fallback) vs the dense FFN of the same active size: tokens/s, forward and forward + backward."""
    import torch

    from kernels.moe import HAS_GROUPED_MM, grouped_mm_fits
    from kernels.moe.bench import run_bench
    from pipelines.errors import SigmaError, release_notes
    from pipelines.train import resolve_device, warn_slow_half

    if min(tokens, dim, experts, hidden, top_k, repeats) < 1 or top_k > experts:
        raise SigmaError("sizes must be positive and --top-k at most --experts")
    if dtype not in ("fp32", "bf16"):
        raise SigmaError(f"--dtype must be fp32 or bf16, not {dtype!r}")
    size = {"fp32": 4, "bf16": 2}[dtype]
    if HAS_GROUPED_MM and not grouped_mm_fits(dim, hidden, size):  # the grouped path is what it measures
        raise SigmaError(f"--dim and --hidden must be multiples of {16 // size} in {dtype} (torch._grouped_mm takes "
                         f"rows of whole 16-byte units), not {dim} / {hidden}")
    dev = resolve_device(device)
    warn_slow_half(torch.bfloat16 if dtype == "bf16" else None, dev, "--dtype bf16")
    release_notes()  # the timings begin: a slow-dtype warning held until the end would come after the wait it explains
    r = run_bench(tokens, dim, experts, hidden, top_k, dtype, dev.type, repeats)
    lines = [f"{tokens} tokens, d {dim}, {experts} experts of {hidden}, top-{top_k}, {dtype} on {r['device']} "
             f"(max |grouped - reference| = {r['check_max_abs']:.1e})"]
    for name, e in r["methods"].items():
        lines.append(f"  {name:<12} fwd {e['forward_tokens_per_s']:>10,.0f} tok/s   fwd+bwd {e['forward_backward_tokens_per_s']:>10,.0f} tok/s")
    lines.append(f"grouped / dense (fwd+bwd): {r['grouped_vs_dense']:.2f}; grouped / loop: {r['grouped_vs_loop']:.2f}")
    if "grouped_vs_loop_ceiling" in r:
        lines.append(f"loop / grouped matmuls alone (the most any dispatch could gain over the loop here): "
                     f"{r['grouped_vs_loop_ceiling']:.2f}")
    if "triton_vs_grouped" in r:
        lines.append(f"triton / grouped (fwd+bwd): {r['triton_vs_grouped']:.2f}; triton / loop: {r['triton_vs_loop']:.2f} "
                     f"(max |triton - reference| = {r['triton_check_max_abs']:.1e})")
    emit(r, as_json, lines)
