"""The shared training loop and checkpoint I/O: exact resume, NaN stop, atomic saves, round trips."""
import json

import pytest
import torch

import pipelines.train
from checkpoints import io
from pipelines.errors import CheckpointError
from pipelines.maetok.model import MAETok
from pipelines.maetok.trainer import TokenizerStage, TokenizerTask
from pipelines.train import NonFiniteLoss, TrainConfig, lr_at, train


class Noise:
    """A tiny deterministic data set: sample i is a pure function of i."""
    name, image_size, frames = "noise", 16, 1

    def __len__(self):
        return 64

    def indices_for_step(self, step, batch_size, seed):
        return torch.arange(step * batch_size, (step + 1) * batch_size) % 64

    def get_batch(self, idx):
        g = torch.Generator().manual_seed(0)
        bank = torch.rand(64, 3, 1, 16, 16, generator=g) * 2 - 1
        return bank[idx], torch.zeros(len(idx), dtype=torch.long)


def make_task(hog_weight=1.0):
    torch.manual_seed(0)
    model = MAETok(image_size=16, patch_size=4, width=32, enc_depth=1, dec_depth=1, heads=2, num_latents=4, latent_dim=4)
    task = TokenizerTask(model, Noise(), Noise(), TokenizerStage(hog_weight=hog_weight), 8, 0, data_spec="noise")
    task.pictures = lambda *a: None
    return task


def config(**kw):
    return TrainConfig(**{**dict(steps=6, batch_size=8, lr=3e-3, warmup=2, save_every=0, sample_every=0, log_every=1), **kw})


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tmp_path):
    """6 straight steps == Ctrl-C during step 3 (it finishes the step, saves, stops) + --resume: same losses."""
    import os
    import signal

    from pipelines.train import Interrupted

    train(make_task(), config(), tmp_path / "straight", quiet=True)
    task = make_task()
    real_loss = task.loss

    def ctrl_c_at_step_2(net, model, step, *rest):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal: the loop's handler only sets a flag
        return real_loss(net, model, step, *rest)

    task.loss = ctrl_c_at_step_2
    with pytest.raises(Interrupted, match="interrupted at step 3"):
        train(task, config(), tmp_path / "resumed", quiet=True)
    train(make_task(), config(), tmp_path / "resumed", resume=True, quiet=True)
    assert len(losses(tmp_path / "straight")) == 6
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a = io.load_model(tmp_path / "straight", "tokenizer").state_dict()
    b = io.load_model(tmp_path / "resumed", "tokenizer").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once_unsaved(tmp_path):
    """The first Ctrl-C asks for a save at the end of the step; a second one before that stops at once."""
    import os
    import signal

    task = make_task()
    real_loss = task.loss

    def ctrl_c_twice_at_step_2(net, model, step, *rest):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # each handled on its own, before the next line runs
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(net, model, step, *rest)

    task.loss = ctrl_c_twice_at_step_2
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN under nohup, Python's default_int_handler otherwise)
    with pytest.raises(KeyboardInterrupt):
        train(task, config(), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert signal.getsignal(signal.SIGINT) == before  # the loop's handler is gone again


def test_resume_after_a_crash_drops_the_steps_logged_past_the_checkpoint(tmp_path):
    """A crash at step 4 (checkpoint at 2, steps 3-4 logged): --resume re-runs 3-4 and the log has each step once."""
    train(make_task(), config(), tmp_path / "straight", quiet=True)
    task = make_task()
    real_loss = task.loss

    def crash_at_step_4(net, model, step, *rest):
        if step == 4:
            raise RuntimeError("power cut")
        return real_loss(net, model, step, *rest)

    task.loss = crash_at_step_4
    with pytest.raises(RuntimeError, match="power cut"):
        train(task, config(save_every=2), tmp_path / "crashed", quiet=True)
    assert len(losses(tmp_path / "crashed")) == 4
    train(make_task(), config(save_every=2), tmp_path / "crashed", resume=True, quiet=True)
    assert losses(tmp_path / "straight") == losses(tmp_path / "crashed")


def test_resume_needs_a_checkpoint_and_refuses_to_overwrite(tmp_path):
    from pipelines.errors import SigmaError

    with pytest.raises(SigmaError, match="no checkpoint"):
        train(make_task(), config(), tmp_path / "none", resume=True, quiet=True)
    train(make_task(), config(steps=1), tmp_path / "run", quiet=True)
    with pytest.raises(SigmaError, match="already holds a run"):
        train(make_task(), config(steps=1), tmp_path / "run", quiet=True)
    with pytest.raises(SigmaError, match="already at step 1"):
        train(make_task(), config(steps=1), tmp_path / "run", resume=True, quiet=True)


def test_cosine_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.0)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.5)
    assert lr_at(cfg, 100) == pytest.approx(0.0)
    two = TrainConfig(steps=100, warmup=10, lr=1.0, restart_at=60)
    assert lr_at(two, 9) == pytest.approx(1.0) and lr_at(two, 59) < 0.01  # first stage ends at 60
    assert lr_at(two, 60) == pytest.approx(0.1) and lr_at(two, 69) == pytest.approx(1.0)  # second warms up again
    assert lr_at(two, 99) < 0.01


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(make_task(), config(steps=2, save_every=2), run, quiet=True)
    saved = (run / "checkpoint" / "model.safetensors").read_bytes()
    task = make_task()
    real_loss = task.loss

    def exploding(net, model, step, *rest):
        loss, logs = real_loss(net, model, step, *rest)
        return (loss * float("nan") if step >= 3 else loss), logs

    task.loss = exploding
    with pytest.raises(NonFiniteLoss, match="step 3"):
        train(task, config(steps=6, save_every=1), run, resume=True, quiet=True)
    # steps 2 and 3 were good and saved at step 3; nothing after the NaN was written
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["counters"]["step"] == 3
    assert (run / "checkpoint" / "model.safetensors").read_bytes() != saved
    io.load_model(run, "tokenizer")  # still loadable


def test_killed_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(make_task(), config(steps=2), run, quiet=True)
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    calls = {"n": 0}
    real = io.atomic_save_tensors

    def dies_on_second_file(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is killed while writing the checkpoint
        return real(*args, **kw)

    monkeypatch.setattr(io, "atomic_save_tensors", dies_on_second_file)
    model = make_task().model
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(KeyboardInterrupt):
        io.save_training_state(run, model_state=model.state_dict(), ema_state=model.state_dict(), optimizer=opt,
                               counters={"step": 99})
    monkeypatch.undo()
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before
    assert io.checkpoint_dir(run) == run / "checkpoint"
    # killed between the two renames of the swap: only checkpoint.old exists, and it is used
    (run / "checkpoint").rename(run / "checkpoint.old")
    assert io.checkpoint_dir(run) == run / "checkpoint.old"
    task = make_task()
    train(task, config(steps=3), run, resume=True, quiet=True)


def test_model_folder_round_trip_is_exact(tmp_path):
    model = make_task().model
    io.save_model(model, tmp_path / "m")
    loaded = io.load_model(tmp_path / "m", "tokenizer")
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # diffusers' own loader reads the same folder
    again = MAETok.from_pretrained(tmp_path / "m", low_cpu_mem_usage=False)
    assert torch.equal(again.to_pixels.weight, model.to_pixels.weight)
    assert io.parameter_count(tmp_path / "m", "tokenizer") == sum(p.numel() for p in model.parameters())


def test_bad_checkpoints_raise_one_clear_error(tmp_path):
    model = make_task().model
    io.save_model(model, tmp_path / "m")
    weights = tmp_path / "m" / io.WEIGHTS
    # truncated weights
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        io.load_model(tmp_path / "m", "tokenizer")
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights file .* is missing"):
        io.load_model(tmp_path / "m", "tokenizer")
    # mismatched shapes: a bigger model's config over these weights
    io.save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / io.CONFIG).read_text())
    cfg["width"] = 64
    (tmp_path / "m" / io.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        io.load_model(tmp_path / "m", "tokenizer")
    # an unknown class, and the wrong kind
    cfg["_class_name"] = "UNet2DModel"
    (tmp_path / "m" / io.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not know"):
        io.load_model(tmp_path / "m", "tokenizer")
    with pytest.raises(CheckpointError, match="does not exist"):
        io.load_model(tmp_path / "nothing", "tokenizer")
    (tmp_path / "m" / io.CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        io.load_model(tmp_path / "m", "tokenizer")


def test_finetune_tail_freezes_the_encoder_and_stops_masking(tmp_path):
    task = make_task()
    task.stage.finetune_tail = 0.5
    task.finetune_from = 4  # what TokenizerTask computes for steps=8, tail=0.5
    assert TokenizerTask(task.model, Noise(), Noise(), TokenizerStage(finetune_tail=0.5), 8, 0, "noise", steps=8).finetune_from == 4
    seen = []
    real_loss = task.loss

    def recording(net, model, step, *rest):
        seen.append((step, model.enc_pos.detach().clone(), model.to_pixels.weight.detach().clone()))
        loss, logs = real_loss(net, model, step, *rest)
        assert ("mask" in logs) == (step < 4) and ("hog" in logs) == (step < 4)
        return loss, logs

    task.loss = recording
    train(task, config(steps=8, ema=0), tmp_path / "run", quiet=True)
    final = io.load_model(tmp_path / "run", "tokenizer")
    enc = [s[1] for s in seen] + [final.enc_pos]
    dec = [s[2] for s in seen] + [final.to_pixels.weight]
    assert not torch.equal(enc[3], enc[4])  # step 3 (masked pre-training) moved the encoder
    assert all(torch.equal(enc[4], e) for e in enc[5:])  # the tail (steps 4-7) did not
    assert not torch.equal(dec[7], dec[8])  # but trained the decoder


def test_attention_runs_in_fp32_under_cpu_bf16_autocast():
    """`--precision bf16` on the CPU: the matmuls run in bf16 but SDPA in fp32 (its bf16 backward is 2-4x
    slower there), so the output equals fp32 attention on the bf16 inputs, rounded once; gradients flow."""
    import torch.nn.functional as F

    from pipelines.nn.layers import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", torch.bfloat16):
        out = sdpa(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16())
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))
    # without a backward to come (a frozen tokenizer or teacher) it stays bf16: that forward is 2x faster
    q, k, v = (t.detach() for t in (q, k, v))
    with torch.autocast("cpu", torch.bfloat16):
        fast = sdpa(q, k, v)
        with torch.no_grad():
            assert torch.equal(sdpa(q.requires_grad_(), k, v), fast)
        assert torch.equal(fast, F.scaled_dot_product_attention(q.detach(), k, v))
    assert not torch.equal(fast, out.detach())


def test_nsa_sliding_window_runs_in_fp32_under_cpu_bf16_autocast():
    """The causal NSA's window branch on the CPU goes through the same fp32 helper as dense attention."""
    from kernels.nsa.cpu import causal_window

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", torch.bfloat16):
        out = causal_window(q, k, v, window=5, chunk=8)
    ref = causal_window(q.float(), k.float(), v.float(), window=5, chunk=8).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_rmsnorm_computes_in_fp32_under_cpu_bf16_autocast():
    """bf16 in, bf16 out, computed in fp32 (torch warns and takes a slow unfused path for bf16 x with an fp32
    weight), and the weight still gets its gradient."""
    import warnings

    from pipelines.nn.layers import RMSNorm

    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.mul_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", torch.bfloat16):
            out = norm(x)
    ref = (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + norm.eps) * norm.weight).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.detach())
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_keep_every_leaves_loadable_snapshots(tmp_path):
    """--keep-every 2 over 5 steps: whole model folders at steps 2 and 4 (no optimiser state, no log), each
    loadable and holding that step's weights; the run folder itself ends at step 5."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "samples_000001.png").write_bytes(b"")  # pictures stay out of snapshots
    train(make_task(), config(steps=5, keep_every=2), run, quiet=True)
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["step-0000002", "step-0000004"]
    weights = []
    for name, step in zip(snaps, (2, 4)):
        snap = run / "snapshots" / name
        assert not (snap / "checkpoint").exists() and not (snap / "metrics.jsonl").exists() and not (snap / "samples").exists()
        assert json.loads((snap / "sigma.json").read_text())["step"] == step
        io.load_model(snap, "tokenizer")
        weights.append(load_file(str(snap / io.WEIGHTS)))
    final = load_file(str(run / io.WEIGHTS))
    assert json.loads((run / "sigma.json").read_text())["step"] == 5
    differ = lambda a, b: any(not torch.equal(a[n], b[n]) for n in b)  # noqa: E731
    assert differ(weights[0], weights[1]) and differ(weights[1], final)  # three points of one run
    with pytest.raises(Exception, match="keep-every"):
        train(make_task(), config(keep_every=-1), tmp_path / "bad", quiet=True)


def test_a_nested_command_failure_is_reported_once_without_the_held_notes(capsys):
    """A command body that calls another command's function: the inner failure reaches the outer wrapper, which
    prints the one error line and drops the notes held so far."""
    import typer

    from pipelines.errors import SigmaError, say
    from sigmacli.common import command

    @command
    def inner():
        raise SigmaError("inner failed")

    @command
    def outer():
        say("note: something held")
        inner()

    with pytest.raises(typer.Exit):
        outer()
    assert capsys.readouterr().err.splitlines() == ["error: inner failed"]


def test_ema_update_warms_up_then_holds_the_decay_and_copies_buffers():
    from pipelines.train import update_ema

    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    model.register_buffer("bias_buf", torch.tensor([3.0]))
    ema.register_buffer("bias_buf", torch.tensor([0.0]))
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    update_ema(ema, model, 0.999, step=0)  # d = 1 / 10: early weights follow the model
    assert ema.weight[0, 0].item() == pytest.approx(0.9)
    update_ema(ema, model, 0.999, step=10_000)  # d = the configured 0.999
    assert ema.weight[0, 0].item() == pytest.approx(0.9 + 0.001 * 0.1)
    assert ema.bias_buf.item() == 3.0  # copied, not averaged


def test_lr_scale_multiplies_the_schedule_per_group():
    from pipelines.train import set_lr

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 5.0}], lr=1.0)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.05])


def test_every_step_draws_from_its_own_seeded_generator(tmp_path):
    """Step k's generator is seeded by (seed, k): different steps and seeds get different seeds, the same
    (seed, step) the same one (which is what makes --resume exact)."""
    draws = {}

    def run(seed, name):
        task = make_task()
        real = task.loss

        def recording(net, model, step, generator, *rest):
            draws[(seed, name, step)] = generator.initial_seed()
            return real(net, model, step, generator, *rest)

        task.loss = recording
        train(task, config(steps=3, seed=seed), tmp_path / name, quiet=True)

    run(0, "a")
    run(0, "b")
    run(1, "c")
    a = [draws[(0, "a", k)] for k in range(3)]
    assert len(set(a)) == 3
    assert a == [draws[(0, "b", k)] for k in range(3)]
    assert all(x != y for x, y in zip(a, [draws[(1, "c", k)] for k in range(3)]))


def test_a_failed_tensor_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    io.atomic_save_tensors({"x": torch.ones(4)}, path)

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 7)  # a torn write
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_save_tensors({"x": torch.zeros(4)}, path)
    monkeypatch.undo()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["x"], torch.ones(4))


def test_killed_inside_the_checkpoint_swap_keeps_a_checkpoint(tmp_path, monkeypatch):
    """Killed after the old checkpoint moved aside and before the new one is in place: checkpoint.old is whole."""
    run = tmp_path / "run"
    train(make_task(), config(steps=2), run, quiet=True)
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    real_replace = io.os.replace

    def dies_on_the_folder_rename(src, dst):
        if str(src).endswith(f".tmp{io.os.getpid()}") and io.Path(src).is_dir():
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", dies_on_the_folder_rename)
    model = make_task().model
    with pytest.raises(KeyboardInterrupt):
        io.save_training_state(run, model_state=model.state_dict(), ema_state=None,
                               optimizer=torch.optim.AdamW(model.parameters()), counters={"step": 99})
    monkeypatch.undo()
    found = io.checkpoint_dir(run)
    assert found is not None and (found / "model.safetensors").read_bytes() == before


def test_the_saved_model_holds_the_ema_weights(tmp_path):
    """The run folder's model (what sample / reconstruct load) is the EMA; the checkpoint keeps both."""
    from safetensors.torch import load_file

    from pipelines.train import evaluable

    task = make_task()
    train(task, config(steps=3, ema=0.9), tmp_path / "run", quiet=True)
    saved = io.load_model(tmp_path / "run", "tokenizer").state_dict()
    ema = load_file(str(tmp_path / "run" / "checkpoint" / "ema.safetensors"))
    raw = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)
    # what a trainer evaluates after its run is what it saved, the EMA, not the live weights (as after an FSDP2 run)
    evaluated = evaluable(task.model, tmp_path / "run", "tokenizer").state_dict()
    assert all(torch.equal(evaluated[k], saved[k]) for k in saved)


def test_a_failed_text_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    import pathlib

    path = tmp_path / "config.json"
    io.atomic_write_text(path, '{"a": 1}')
    real = pathlib.Path.write_text

    def torn(self, text, *args, **kw):
        real(self, text[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_text(path, '{"a": 2}')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}


def test_a_closed_pipe_stops_quietly():
    """`sigma info RUN | head -1`: the reader left; exit 141 (as shell tools do), no error line."""
    import subprocess
    import sys

    code = ("import errno, typer\nfrom sigmacli.common import report\n"
            "try:\n    report(BrokenPipeError(errno.EPIPE, 'Broken pipe'))\nexcept typer.Exit as e:\n    raise SystemExit(e.exit_code)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 141 and r.stderr == "", r.stderr


def test_cpu_matmul_slowdown_is_measured_on_one_thread_and_restores_the_threads(monkeypatch):
    monkeypatch.setattr(pipelines.train, "_slowdown", {})
    threads = torch.get_num_threads()
    ratio = pipelines.train.cpu_matmul_slowdown(torch.bfloat16, n=64)
    assert 0 < ratio < float("inf") and torch.get_num_threads() == threads
    assert pipelines.train.cpu_matmul_slowdown(torch.bfloat16) == ratio  # measured once per process and dtype
    assert set(pipelines.train._slowdown) == {torch.bfloat16}


def test_benches_warn_about_a_slow_half_precision_on_the_cpu(cli, tmp_path, monkeypatch):
    import kernels.bench_attn
    import kernels.moe.bench
    from pipelines import errors

    monkeypatch.setitem(pipelines.train._slowdown, torch.bfloat16, 40.0)
    monkeypatch.setitem(pipelines.train._slowdown, torch.float16, 0.5)
    held = []  # whether the notes were still held back when the timings began

    def spy(run):
        def timed(*args, **kwargs):
            held.append(errors.holding_notes())
            return run(*args, **kwargs)
        return timed

    monkeypatch.setattr(kernels.moe.bench, "run_bench", spy(kernels.moe.bench.run_bench))
    monkeypatch.setattr(kernels.bench_attn, "run", spy(kernels.bench_attn.run))
    r = cli("bench-moe", "--tokens", "64", "--dim", "16", "--experts", "4", "--hidden", "16", "--top-k", "2",
            "--repeats", "1", "--dtype", "bf16", "--device", "cpu", "--json")
    assert r.exit_code == 0 and r.stderr.strip().splitlines() == [
        "warning: this CPU multiplies bf16 matrices 40x slower than fp32 (no native bf16 arithmetic), so --dtype bf16 "
        "runs far slower here than fp32"], r.stderr
    r = cli("bench-attn", "--grid", "1x4x4", "--cube", "1x2x2", "--top-n", "1", "--heads", "1", "--head-dim", "8",
            "--repeats", "1", "--dtype", "fp16", "--device", "cpu", "--out", tmp_path / "b.png", "--json")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr  # fp16 is fast on this (pretended) CPU
    assert held == [False, False]  # shown before the (slow) timings, not after them, or never on a Ctrl-C


def test_exit_process_flushes_then_skips_the_teardown_only_after_a_process_group():
    import subprocess
    import sys

    with pytest.raises(SystemExit) as e:  # no process group in this process: an ordinary exit
        pipelines.train.exit_process(3)
    assert e.value.code == 3
    # after one: os._exit, and what the command printed still reaches the reader (through a pipe: block-buffered)
    code = ("import atexit, pipelines.train as t; atexit.register(print, 'teardown'); t._GROUP_TORN_DOWN = True; "
            "print('result', end=''); t.exit_process(4)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 4 and r.stdout == "result", (r.returncode, r.stdout, r.stderr[-500:])


def test_sigma_ends_through_exit_process_with_the_commands_exit_code():
    # the console entry hands a training command's exit code to exit_process: after a process group, os._exit
    # (no teardown: the atexit line never prints), with the code of success and of a one-line error alike
    import subprocess
    import sys

    for args, code, out in ((["--version"], 0, "sigma "), (["info", "no-such-folder"], 1, "")):
        prog = ("import atexit, sys, pipelines.train as t; atexit.register(print, 'teardown'); t._GROUP_TORN_DOWN = True; "
                f"sys.argv = ['sigma', *{args!r}]; from sigmacli.app import main; main()")
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
        assert r.returncode == code and r.stdout.startswith(out) and "teardown" not in r.stdout, (args, r.returncode, r.stdout, r.stderr[-500:])
        assert (r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1) if code else not r.stderr, r.stderr


def test_compile_drops_dynamos_note_on_ddps_profiler_range_only(caplog, monkeypatch):
    """--compile under DDP: every rank printed dynamo's 'Profiler record function ... will be ignored'; other warnings
    of that logger still pass."""
    import logging

    from pipelines.train import compile_backend

    monkeypatch.delenv("SIGMA_COMPILE_BACKEND", raising=False)
    compile_backend()
    log = logging.getLogger("torch._dynamo.variables.ctx_manager")
    with caplog.at_level(logging.WARNING):
        log.warning("Profiler record function %s will be ignored", "record_function")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["something else"]
