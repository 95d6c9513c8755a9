"""`sigma train-tokenizer` and `sigma reconstruct`: the MAETok tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sigmacli.app import app
from sigmacli.common import (CompileOpt, DeviceOpt, FsdpOpt, JsonOpt, KeepEveryOpt, PrecisionOpt, SeedOpt,
                             check_precision, check_sizes, command, emit, fresh_run_folder, output_picture, picture_file, resume_device,
                             resumed_train_config, run_part, run_to_resume, steps_done, trained_or_shipped)

DATA_HELP = ("shapes | moving-shapes | an image folder (a video folder for clips) | cifar10:PATH, cifar100:PATH, "
             "mnist:PATH, fashion-mnist:PATH")
DataOpt = Annotated[Optional[str], typer.Option("--data", help=DATA_HELP + " (default: shapes; moving-shapes with --frames above 1).")]


@app.command("train-tokenizer")
@command
def train_tokenizer(
    ctx: typer.Context = None,  # (injected by Typer; None when called from Python)
    preset: Annotated[str, typer.Option(help="Model and schedule size: tiny (2-core CPU, minutes) | small | base (GPU).")] = "tiny",
    data: DataOpt = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image side in pixels (resize + centre-crop; default 32, or --init's).")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames per clip (1 = images; default 1, or --init's).")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="Patch side (default: the preset's).")] = None,
    tubelet: Annotated[Optional[int], typer.Option(help="Frames per tubelet (default 2 for even clips, else 1).")] = None,
    bottleneck: Annotated[Optional[str], typer.Option(help="ae (plain, the paper's choice; the default) | vae")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the preset's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (default: the preset's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: the preset's).")] = None,
    hog_weight: Annotated[float, typer.Option(help="Weight of the auxiliary HOG loss on masked patches.")] = 1.0,
    finetune_tail: Annotated[Optional[float], typer.Option(help="Fraction of the steps, at the end, spent on decoder fine-tuning (encoder frozen, no masking; default: the preset's).")] = None,
    finetune_decoder: Annotated[bool, typer.Option("--finetune-decoder", help="Last stage: freeze the encoder of --init (default runs/tokenizer), no masking, train the pixel decoder.")] = False,
    init: Annotated[Optional[Path], typer.Option(help="Tokenizer folder to start from: the encoder to freeze with --finetune-decoder, else a warm start (its config, its weights; a new feature decoder if --feature-teacher).")] = None,
    feature_teacher: Annotated[Optional[Path], typer.Option(help="A classifier folder (sigma train-classifier) whose feature maps an auxiliary decoder predicts on the masked patches (MAETok's DINOv2 / SigLIP target).")] = None,
    feature_weight: Annotated[float, typer.Option(help="Weight of the teacher-feature loss (1 - cosine) on masked patches.")] = 1.0,
    latent_noise: Annotated[float, typer.Option(help="Pre-training adds noise of up to this many latent stds (per token and channel, uniform per sample) to the latents the decoders read, so that what decides the image sits in high-variance directions a diffusion model learns first (0 = off).")] = 0.0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).")] = 500,
    keep_every: KeepEveryOpt = None,
    sample_every: Annotated[int, typer.Option(help="Write a reconstruction grid every N steps (0 = only at the end).")] = 500,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/tokenizer, or runs/tokenizer-ft).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    fsdp: FsdpOpt = False,
    compile_: CompileOpt = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Train a MAETok tokenizer (masked ViT autoencoder with 1D latent tokens) on images or clips."""
    check_precision(precision)
    import torch

    from checkpoints.io import CONFIG, load_model
    from pipelines.data import make_dataset
    from pipelines.errors import SigmaError
    from pipelines.maetok.model import MAETok
    from pipelines.maetok.trainer import TRAIN_PRESETS, TokenizerStage, TokenizerTask, build_config
    from pipelines.train import TrainConfig, check_train_config, train

    if out is None:
        out = Path("runs/tokenizer-ft" if finetune_decoder else "runs/tokenizer")
    if resume:  # everything but --steps comes from the run itself
        meta = run_to_resume(out, "tokenizer", ctx, folder_options=("finetune_decoder",))
        cfg = resumed_train_config(meta, steps, keep_every, resume_device(ctx, device))
        stage = run_part(TokenizerStage, meta, "stage")
        model = load_model(out, "tokenizer")  # its config checked, in one line (the weights come from the checkpoint)
        data, image_size, frames = meta["data_spec"], model.config.image_size, model.config.frames
    else:
        fresh_run_folder(out)
        check_sizes(image_size, frames)
        if preset not in TRAIN_PRESETS:
            raise SigmaError(f"unknown preset {preset!r} (have: {', '.join(TRAIN_PRESETS)})")
        schedule = dict(TRAIN_PRESETS[preset])
        tail = schedule.pop("finetune_tail")
        tail = tail if finetune_tail is None else finetune_tail
        if not 0 <= tail < 1:
            raise SigmaError(f"--finetune-tail must be in [0, 1), not {tail}")
        cfg = TrainConfig(**{**schedule, "seed": seed, "device": device,
                             "save_every": save_every, "keep_every": keep_every or 0,
                             "sample_every": sample_every})
        for name, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
            if value is not None:
                setattr(cfg, name, value)
        source = None  # the tokenizer we start from, which fixes the architecture
        if finetune_decoder or init is not None:
            if init is None and not (Path("runs/tokenizer") / CONFIG).exists():
                raise SigmaError("--finetune-decoder trains the decoder of --init (default runs/tokenizer, which holds "
                                 "no tokenizer): pass --init TOKENIZER_FOLDER")
            init = init or Path("runs/tokenizer")
            source = load_model(init, "tokenizer")
            mc = source.config
            clash = [f"--{name.replace('_', '-')} {value}" for name, value in
                     (("image_size", image_size), ("frames", frames), ("patch_size", patch_size), ("tubelet", tubelet),
                      ("bottleneck", bottleneck)) if value is not None and value != mc[name]]
            if clash:
                raise SigmaError(f"--init takes the architecture from '{init}' ({mc.image_size} px, {mc.frames} frame(s), "
                                 f"patch {mc.patch_size}, tubelet {mc.tubelet}, {mc.bottleneck}); leave out {', '.join(clash)}")
            image_size, frames = mc.image_size, mc.frames
        image_size, frames, bottleneck = image_size or 32, frames or 1, bottleneck or "ae"
        data = data or ("moving-shapes" if frames > 1 else "shapes")
        stage = TokenizerStage(finetune_decoder=finetune_decoder, hog_weight=hog_weight,
                               finetune_tail=0.0 if finetune_decoder else tail, feature_weight=feature_weight,
                               latent_noise=latent_noise)
        if not (hog_weight >= 0 and feature_weight >= 0):
            raise SigmaError(f"--hog-weight and --feature-weight must be >= 0, not {hog_weight} / {feature_weight}")
        if not 0 <= latent_noise <= 10:
            raise SigmaError(f"--latent-noise must be in [0, 10], not {latent_noise}")
        teacher_dim = 0
        if feature_teacher is not None and not finetune_decoder:
            from pipelines.maetok.teacher import FeatureTeacher

            teacher = FeatureTeacher(feature_teacher)  # fails here, with one line, if it is not a classifier
            if teacher.net.config.image_size != image_size:  # (with --init, image_size is the init's)
                raise SigmaError(f"--feature-teacher was trained at {teacher.net.config.image_size} px, the tokenizer "
                                 f"at {image_size}: frames would be resized (pass a teacher of the same size)")
            stage.feature_teacher, teacher_dim = str(feature_teacher.resolve()), teacher.dim
        torch.manual_seed(seed)  # the initial weights (or a warm start's new feature decoder) follow --seed too
        if source is not None:
            model = source
            stage.init_from = str(init)
            if not finetune_decoder and model.config.feature_dim != teacher_dim:  # a warm start with a new feature decoder
                # (without diffusers' private keys: its `_use_default_values` would reset feature_dim)
                config = {k: v for k, v in model.config.items() if not k.startswith("_")}
                warm = MAETok.from_config({**config, "feature_dim": teacher_dim})
                missing, unexpected = warm.load_state_dict(model.state_dict(), strict=False)
                assert not unexpected and all("feature" in k.split(".")[0] for k in missing), (missing, unexpected)
                model = warm
        else:
            model = MAETok.from_config(build_config(preset, image_size, frames, patch_size, tubelet, bottleneck)
                                       | {"feature_dim": teacher_dim})
    check_train_config(cfg)
    torch.manual_seed(cfg.seed)
    train_set = make_dataset(data, image_size=image_size, frames=frames, split="train", seed=cfg.seed)
    heldout = make_dataset(data, image_size=image_size, frames=frames, split="heldout", seed=cfg.seed)
    task = TokenizerTask(model, train_set, heldout, stage, cfg.batch_size, cfg.seed, data_spec=data, steps=cfg.steps)
    if 0 < task.finetune_from < cfg.steps:  # decoder fine-tuning is a stage of its own: fresh warm-up + cosine
        cfg.restart_at = task.finetune_from
    cfg.fsdp, cfg.compile = fsdp, compile_
    cfg.precision = precision or cfg.precision
    result = train(task, cfg, out, resume=resume, quiet=as_json)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    emit(result, as_json, [
        f"{steps_done(result)} in {result['seconds']:.0f} s ({result['samples_per_s']:.0f} samples/s), "
        f"final loss {result['final_loss']:.4f}",
        f"weights: {out}/" + (f"    reconstructions: {result['pictures']}" if result["pictures"] else ""),  # (none under FSDP)
        f"evaluate: sigma reconstruct --model {out}",
    ])


@app.command()
@command
def reconstruct(
    model: Annotated[Optional[Path], typer.Option(help="A tokenizer folder (from sigma train-tokenizer; default: runs/tokenizer if present, else the shipped one).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help=DATA_HELP + " (default: the data the tokenizer was trained on).")] = None,
    num: Annotated[int, typer.Option(help="Held-out samples to evaluate (the first `--grid` are drawn).")] = 256,
    grid: Annotated[int, typer.Option(help="Pairs (original, reconstruction) in the picture.")] = 16,
    out: Annotated[Path, typer.Option(parser=picture_file, metavar="<path>", help="Picture of originals beside reconstructions (PNG; GIF for clips).")] = Path("recon.png"),
    probe: Annotated[bool, typer.Option("--probe", help="Also fit a linear probe of the class on the latents of 4,000 training samples and report its held-out accuracy (labelled data).")] = False,
    spectrum: Annotated[bool, typer.Option("--spectrum", help="Also report a classifier's accuracy on held-out images decoded from only the top K principal components of their latents (K = 32 ... 256; labelled data): where the latent keeps the class, and the ceiling of `sigma train-imm --latent-norm pca --pca-dims K`.")] = False,
    classifier: Annotated[Optional[Path], typer.Option(help="Classifier folder for --spectrum (default: runs/classifier if present, else the shipped one).")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
):
    """Reconstruct held-out samples with a tokenizer; report PSNR and SSIM and write a picture."""
    from checkpoints.io import RUN_META, load_model, read_json
    from pipelines.data import make_dataset
    from pipelines.errors import SigmaError
    from pipelines.maetok.trainer import evaluate_reconstruction, linear_probe
    from pipelines.train import resolve_device
    from pipelines.visual import save_media, side_by_side

    if num < 1 or grid < 0:
        raise SigmaError("--num must be at least 1 and --grid at least 0")
    dev = resolve_device(device)
    defaulted, model = model is None, model or trained_or_shipped("tokenizer")
    tokenizer = load_model(model, "tokenizer", dev)
    if data is None:
        data = read_json(model / RUN_META).get("data_spec", "shapes") if (model / RUN_META).exists() else "shapes"
    c = tokenizer.config
    if grid:
        out = output_picture(out, c.frames > 1)
    heldout = make_dataset(data, image_size=c.image_size, frames=c.frames, split="heldout", seed=seed)
    metrics, x, recon = evaluate_reconstruction(tokenizer, heldout, num, dev)
    written = None
    if grid:
        n = min(grid, num)
        written = save_media(side_by_side(x[:n], recon[:n]), out, nrow=8)
    result = {"model": str(model), "data": heldout.name, **metrics, "picture": str(written) if written else None}
    lines = [f"{metrics['num']} held-out samples of {heldout.name.removeprefix('folder:')}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}",
             *([f"picture: {written} (originals left, reconstructions right)"] if written else []),
             *([f"tokenizer: {model} (the default; --model chooses another)"] if defaulted else [])]
    if probe:
        train_set = make_dataset(data, image_size=c.image_size, frames=c.frames, split="train", seed=seed)
        if train_set.num_classes < 2:
            raise SigmaError(f"--probe needs labelled data with at least 2 classes; {train_set.name} has {train_set.num_classes}")
        result.update(linear_probe(tokenizer, train_set, heldout, 4000, num, dev, show_progress=not as_json))
        lines.append(f"linear probe of the class on the latents: {result['probe_accuracy']:.1%} held-out "
                     f"({result['num_classes']} classes, {result['probe_num_train']} training samples)")
    if spectrum:
        from pipelines.evaluation.classifier import class_order
        from pipelines.maetok.trainer import spectrum_probe

        clf_dir = classifier or trained_or_shipped("classifier")
        clf = load_model(clf_dir, "classifier", dev)
        if clf.config.image_size != c.image_size:
            raise SigmaError(f"the classifier in '{clf_dir}' reads {clf.config.image_size} px images, the tokenizer "
                             f"makes {c.image_size} px")
        train_set = make_dataset(data, image_size=c.image_size, frames=c.frames, split="train", seed=seed)
        to_data = class_order(clf, train_set.class_names)  # the same classes in any order are matched by name
        if to_data is None:  # else its accuracy means nothing
            raise SigmaError(f"the classifier in '{clf_dir}' knows classes {clf.config.class_names}, the data "
                             f"{train_set.class_names}: pass --classifier trained on this data (sigma train-classifier --data ...)")
        result.update(spectrum_probe(tokenizer, clf, train_set, heldout, 4000, num, dev, show_progress=not as_json,
                                     to_data=to_data))
        cut = ", ".join(f"{k.split('_')[1]}: {v:.1%}" for k, v in result.items()
                        if k.startswith("spectrum_") and k.split("_")[1].isdigit())
        lines.append(f"classifier on decoded latents: all {c.num_latents * c.latent_dim} components "
                     f"{result['spectrum_all']:.1%}; top {cut}")
    emit(result, as_json, lines)
