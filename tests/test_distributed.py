"""Two gloo processes (DDP and FSDP2) give the weights of one process on the combined batch, for the tokenizer,
IMM and the LM (with AdamW and Muon, and DSA's sparse stage); a checkpoint saved under FSDP2 loads in a single process and resumes under FSDP2."""
import faulthandler
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from checkpoints.io import load_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_task(kind: str):
    """A tiny model + task of each trainer, identical in every process (fixed seeds); "imm-muon" and "lm-muon" train
    with Muon, "imm-fm" with velocity groups (4 groups: 2 a rank); "tokenizer-tail" switches to decoder fine-tuning at
    its second step (the encoder's gradients stop); "lm-dsa" is DSA's sparse stage, whose indexers learn only from
    their KL loss on a detached input (a path to the loss that bypasses the block's input, where FSDP2's post-backward
    hook sits: their gradients still arrive before it reduce-scatters)."""
    from pipelines.train import TrainConfig

    kind, _, variant = kind.partition("-")
    optimizer = "muon" if variant == "muon" else "adamw"

    torch.manual_seed(0)
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup=1, ema=0.9, save_every=0, sample_every=0, log_every=1, device="cpu",
                      grad_clip=1.0)
    if kind == "tokenizer":
        from pipelines.data import make_dataset
        from pipelines.maetok.model import MAETok
        from pipelines.maetok.trainer import TokenizerStage, TokenizerTask

        model = MAETok(image_size=16, width=32, enc_depth=1, dec_depth=1, heads=2, num_latents=4, latent_dim=4)
        data = make_dataset("shapes", image_size=16, frames=1, split="train", seed=0)
        held = make_dataset("shapes", image_size=16, frames=1, split="heldout", seed=0)
        stage = TokenizerStage(finetune_tail=0.5 if variant == "tail" else 0.0)
        task = TokenizerTask(model, data, held, stage, cfg.batch_size, cfg.seed, "shapes", steps=cfg.steps)
    elif kind == "imm":
        from pipelines.data import make_dataset
        from pipelines.imm.model import DiT
        from pipelines.imm.schedule import IMMSchedule
        from pipelines.imm.trainer import IMMStage, IMMTask

        model = DiT(space="pixels", num_tokens=16, token_dim=48, grid=(1, 4, 4), cube=(1, 2, 2), image_size=16,
                    width=32, depth=2, heads=2)
        data = make_dataset("shapes", image_size=16, frames=1, split="train", seed=0)
        held = make_dataset("shapes", image_size=16, frames=1, split="heldout", seed=0)
        # "imm-fm": velocity groups, so that a step gives one rank velocity groups and the other none (the same log
        # names all the same), and one gives the ranks different numbers of them (the logged means are of the batch's
        # groups, not means of the ranks' means)
        stage = IMMStage(group_size=4, optimizer=optimizer, fm_fraction=0.5 if variant == "fm" else 0.0)
        if variant == "fm":
            cfg.batch_size = 16
        task = IMMTask(model, IMMSchedule(), stage, data, held, None, cfg.batch_size, cfg.seed, "shapes")
    else:
        from pipelines.lm.data import ByteCorpus
        from pipelines.lm.model import MoELM
        from pipelines.lm.trainer import LMStage, LMTask

        arch = dict(width=32, depth=2, heads=2, context=16, experts=4, expert_hidden=8, top_k=2)
        model = MoELM(**arch)
        if variant == "dsa":  # DSA's sparse stage from a (here untrained) dense model, as `train-lm --init` builds it
            dense = model
            model = MoELM(**arch, attn="dsa", attn_config={"stage": "sparse", "top_k": 4})
            missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
            assert not unexpected and all(".index_" in n for n in missing)
        task = LMTask(model, ByteCorpus(None, 16), LMStage(optimizer=optimizer), cfg.batch_size, None, cfg)
    return task, cfg


def join_group(rank: int, world: int, port: int, **env):
    """What every spawned worker does first: the torchrun environment of its rank, one thread, and a crash printing
    every thread's Python stack."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", **env)
    torch.set_num_threads(1)
    faulthandler.enable(all_threads=True)


def worker(rank: int, world: int, port: int, kind: str, out: str, fsdp: bool, steps: int, resume: bool):
    join_group(rank, world, port)
    from pipelines.train import exit_process, train

    task, cfg = make_task(kind)
    cfg.fsdp, cfg.steps = fsdp, steps
    train(task, cfg, out, resume=resume, quiet=True)
    if rank == 0:  # what actually ran: FSDP2 turns the model's class into FSDP<Name>
        with open(os.path.join(out, "ran_as.txt"), "w") as f:
            f.write(type(task.model).__name__)
    exit_process(0)  # as `sigma` ends a torchrun rank: without the interpreter's teardown (see exit_process)


def run(kind, out, world=1, fsdp=False, steps=2, resume=False):
    if world == 1:
        _single(kind, out, steps, resume)
    else:
        mp.spawn(worker, args=(world, free_port(), kind, str(out), fsdp, steps, resume), nprocs=world, join=True)
    kind = kind.partition("-")[0]
    return load_model(out / ("transformer" if kind == "imm" else ""), {"tokenizer": "tokenizer", "imm": "imm", "lm": "lm"}[kind])


def _single(kind, out, steps, resume):
    from pipelines.train import train

    for k in ("RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    task, cfg = make_task(kind)
    cfg.steps = steps
    train(task, cfg, out, resume=resume, quiet=True)


def assert_same_weights(a, b, atol=2e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=atol, rtol=1e-4), (k, (sa[k] - sb[k]).abs().max().item())


@pytest.mark.parametrize("kind", ["tokenizer", "tokenizer-tail", "imm", "imm-fm", "lm", "imm-muon", "lm-muon", "lm-dsa"])
def test_ddp_and_fsdp2_match_one_process(kind, tmp_path):
    one = run(kind, tmp_path / "one")
    ddp = run(kind, tmp_path / "ddp", world=2)
    fsdp = run(kind, tmp_path / "fsdp", world=2, fsdp=True)
    assert (tmp_path / "fsdp" / "ran_as.txt").read_text().startswith("FSDP")
    assert not (tmp_path / "ddp" / "ran_as.txt").read_text().startswith("FSDP")
    assert_same_weights(ddp, one)
    assert_same_weights(fsdp, one)
    # and the same logs: each rank's figures (ce, mse, mmd, ...) are of its half of the batch, their mean is the run's
    assert_same_logs(tmp_path / "ddp", tmp_path / "one")
    assert_same_logs(tmp_path / "fsdp", tmp_path / "one")


def assert_same_logs(a, b):
    logs_a, logs_b = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b))
    assert len(logs_a) == len(logs_b)
    for la, lb in zip(logs_a, logs_b):
        assert la.keys() - {"samples_per_s"} == lb.keys() - {"samples_per_s"}, (la, lb)
        for k in la.keys() - {"samples_per_s"}:
            assert la[k] == pytest.approx(lb[k], rel=1e-4, abs=1e-6), (k, la[k], lb[k])


def setup_error_worker(rank: int, world: int, port: int, out: str):
    join_group(rank, world, port, SIGMA_COMPILE_BACKEND="no-such-backend")
    import torch.distributed as dist

    from pipelines import train as training
    from pipelines.errors import SigmaError

    task, cfg = make_task("lm")
    cfg.compile = True  # train() checks the backend after the process group is up (and DDP has wrapped the model)
    with pytest.raises(SigmaError, match="SIGMA_COMPILE_BACKEND"):
        training.train(task, cfg, out, quiet=True)
    assert not dist.is_initialized() and training._GROUP_TORN_DOWN  # so `sigma` leaves through os._exit
    training.exit_process(0)


def test_a_setup_error_ends_the_process_group(tmp_path):
    mp.spawn(setup_error_worker, args=(2, free_port(), str(tmp_path / "run")), nprocs=2, join=True)


def test_fsdp2_checkpoint_resumes_sharded_and_matches(tmp_path):
    # 2 steps under FSDP2, then 2 more resumed under FSDP2 == 4 steps in one process
    run("lm", tmp_path / "fsdp", world=2, fsdp=True, steps=2)
    state = json.loads((tmp_path / "fsdp" / "checkpoint" / "state.json").read_text())
    assert state["counters"] == {"step": 2, "world": 2}
    resumed = run("lm", tmp_path / "fsdp", world=2, fsdp=True, steps=4, resume=True)
    one = run("lm", tmp_path / "one", steps=4)
    assert_same_weights(resumed, one)


def test_compile_trains_and_samples(cli, tmp_path, monkeypatch):
    # aot_eager traces the whole graph (custom ops included) without waiting for inductor's C++ build
    monkeypatch.setenv("SIGMA_COMPILE_BACKEND", "aot_eager")
    from tests.test_cli_imm import TINY_DIT, last_json

    last_json(cli("train-imm", "--space", "pixels", "--image-size", "16", *TINY_DIT, "--attn", "nsa", "--top-n", "1",
                  "--steps", "2", "--compile", "--out", tmp_path / "imm", "--json"))
    s = last_json(cli("sample", "--model", tmp_path / "imm", "--num", "4", "--compile", "--out", tmp_path / "s.png", "--json"))
    assert s["num"] == 4
    r = cli("train-lm", "--width", "32", "--depth", "1", "--heads", "2", "--context", "16", "--experts", "4",
            "--batch-size", "4", "--steps", "2", "--sample-every", "0", "--compile", "--out", tmp_path / "lm", "--json")
    assert r.exit_code == 0, r.stderr


def cli_worker(rank: int, world: int, port: int, args: list[str], result: str):
    """`sigma ARGS` in one of `world` gloo processes, as torchrun would start it, through the console entry (which
    ends the process with the command's exit code: not 0 raises in mp.spawn); rank 0's stdout goes to `result`."""
    import sys

    join_group(rank, world, port)
    from sigmacli.app import main

    if rank == 0:
        sys.stdout = open(result, "w")  # (left to main, which flushes it before os._exit)
    sys.argv = ["sigma", *args]
    main()
    raise AssertionError("main() returned")  # it ends the process


@pytest.mark.parametrize("command", [
    ["train-lm", "--width", "32", "--depth", "1", "--heads", "2", "--context", "16", "--experts", "4", "--sample-every", "0"],
    ["train-classifier", "--image-size", "16"],
])
def test_cli_fsdp_evaluates_after_training(command, cli, tmp_path):
    # train-lm and train-classifier evaluate on rank 0 once training ends; under FSDP2 the model's forward
    # all-gathers from ranks that have left, so rank 0 evaluates the weights it saved instead
    out, result = tmp_path / "run", tmp_path / "result.json"
    args = [*command, "--steps", "2", "--batch-size", "4", "--device", "cpu", "--fsdp", "--json", "--out", str(out)]
    mp.spawn(cli_worker, args=(2, free_port(), args, str(result)), nprocs=2, join=True)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["counters"] == {"step": 2, "world": 2}
    r = json.loads(result.read_text())  # rank 0's --json line, evaluation included
    if command[0] == "train-lm":  # of the saved weights: what eval-lm reports for them in one process
        ev = cli("eval-lm", "--model", out, "--device", "cpu", "--json")
        assert ev.exit_code == 0, ev.stderr
        assert r["bits_per_byte"] == pytest.approx(json.loads(ev.stdout)["bits_per_byte"], rel=1e-5)
    else:
        assert 0 <= r["accuracy"] <= 1 and r["num"] > 0


def test_fsdp_refuses_dsa_warmup(cli, tmp_path, monkeypatch):
    # DSA's warm-up freezes the model: its output carries no gradient, FSDP2's backward hooks never fire and the
    # indexers' gradients never reach their shards (grad norm 0, nothing learns), where DDP trains them
    arch = ["--width", "32", "--depth", "1", "--heads", "2", "--context", "16", "--experts", "4"]
    r = cli("train-lm", *arch, "--batch-size", "4", "--steps", "1", "--sample-every", "0", "--out", tmp_path / "base")
    assert r.exit_code == 0, r.stderr
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli("train-lm", "--attn", "dsa", "--dsa-stage", "warmup", "--init", tmp_path / "base", "--batch-size", "4",
            "--steps", "1", "--fsdp", "--device", "cpu", "--out", tmp_path / "warm")
    assert r.exit_code == 1 and r.stderr.startswith("error: --fsdp cannot train DSA's warm-up"), r.stderr
    assert not (tmp_path / "warm").exists()
