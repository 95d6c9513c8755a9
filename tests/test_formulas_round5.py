"""Round-5 mutation-audit tests: the shared training loop (pipelines/train.py), weight I/O and folder checks
(checkpoints/), the LM's router, dense FFN, RoPE and trainer, the IMM and MAETok trainers and the MAETok VAE, the
reconstruction and generative metrics, the procedural shapes, bench-attn's arithmetic and compile_check's
launch keys. Expected values come from the docstrings and notes, worked out by hand."""
from __future__ import annotations

import json
import math
import os
import struct
from types import SimpleNamespace

import pytest
import torch

from pipelines.errors import CheckpointError, SigmaError


# ---- the shared training loop -----------------------------------------------------------------------------------
class _Scalar(torch.nn.Module):
    """The smallest model the loop can save: one parameter w and a plain config."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = {}


class _SlopeTask:
    """loss = w (gradient 1 at every step) under plain SGD, so every weight is known by hand."""
    kind, samples_per_step = "tokenizer", 1

    def __init__(self):
        self.model = _Scalar()

    def trainable(self, model):
        model.requires_grad_(True)

    def make_optimizer(self, model, cfg):
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)

    def loss(self, net, model, step, generator, rank, world):
        return net.w.sum(), {}

    def pictures(self, model, step, run_dir):
        return None

    def metadata(self):
        return {}


def _slope_config(**kw):
    from pipelines.train import TrainConfig

    base = dict(steps=1, batch_size=1, lr=0.1, warmup=0, grad_clip=0.0, ema=0.0, save_every=0, sample_every=0,
                log_every=1, device="cpu", precision="fp32")
    return TrainConfig(**{**base, **kw})


def test_the_ema_after_the_first_step_uses_the_warm_up_decay_of_step_0(tmp_path):
    """update_ema runs after optimiser step 0 with d = min(0.9, 1/10) = 0.1: w goes 0 -> -0.1 (SGD, lr 0.1,
    gradient 1), so the EMA (the saved model) is 0.1 * 0 + 0.9 * (-0.1) = -0.09."""
    from safetensors.torch import load_file

    from checkpoints.io import WEIGHTS
    from pipelines.train import train

    train(_SlopeTask(), _slope_config(ema=0.9), tmp_path / "run", quiet=True)
    assert load_file(str(tmp_path / "run" / WEIGHTS))["w"].item() == pytest.approx(-0.09, abs=1e-7)
    raw = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))["w"].item()
    assert raw == pytest.approx(-0.1, abs=1e-7)


def test_the_last_step_is_logged_even_off_the_log_interval(tmp_path):
    """log_every 2 over 3 steps: steps 2 and 3 (the last one always) are logged, with the loss of each."""
    from pipelines.train import train

    train(_SlopeTask(), _slope_config(steps=3, log_every=2), tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    # the loss logged at step k is w before update k-1. Cosine over 3 steps, no warm-up: lr 0.1 at step 0 and
    # 0.05 * (1 + cos(pi / 3)) = 0.075 at step 1, so w = -0.1 after one update and -0.175 after two
    assert [r["loss"] for r in rows] == pytest.approx([-0.1, -0.175], abs=1e-7)


def test_weighted_logs_are_logged_as_their_value_and_empty_shares_left_out(tmp_path):
    """A task's log may be (value, weight) (a mean over a varying part of the share): logged as the value in one
    process; NaN or weight 0 (this share has none of the figure) leaves the figure out, in the task's order."""
    from pipelines.train import train

    task = _SlopeTask()
    task.loss = lambda net, *rest: (net.w.sum(), {"a": (2.5, 3), "none": (float("nan"), 0), "zero": (1.0, 0),
                                                  "nan": float("nan"), "b": 4, "note": "text"})
    train(task, _slope_config(), tmp_path / "run", quiet=True)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert [k for k in row if k in ("a", "none", "zero", "nan", "b", "note")] == ["a", "b", "note"]
    assert row["a"] == pytest.approx(2.5, rel=1e-12) and row["b"] == 4 and row["note"] == "text"


def test_metrics_lines_are_strict_json_with_null_for_a_non_finite_figure(tmp_path):
    from pipelines.train import train

    task = _SlopeTask()
    task.loss = lambda net, *rest: (net.w.sum(), {"big": float("inf")})
    train(task, _slope_config(), tmp_path / "run", quiet=True)

    def refuse(constant):
        raise ValueError(constant)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert row["big"] is None


def test_check_train_config_allows_lr_0_and_refuses_ema_1():
    from pipelines.train import TrainConfig, check_train_config

    check_train_config(TrainConfig(lr=0.0))  # a run that only evaluates or re-saves
    for bad in (dict(lr=-1e-3), dict(lr=float("nan")), dict(ema=1.0), dict(ema=-0.1), dict(log_every=0)):
        with pytest.raises(SigmaError):
            check_train_config(TrainConfig(**bad))


def test_adamw_groups_decay_matrices_but_not_vectors_positions_or_tokens():
    from pipelines.train import adamw_groups

    p = {"blocks.0.fc.weight": torch.zeros(3, 2), "blocks.0.fc.bias": torch.zeros(3), "enc_pos": torch.zeros(4, 2),
         "latent_tokens": torch.zeros(4, 2), "mask_token": torch.zeros(2), "ffn.w_in": torch.zeros(2, 3, 4),
         "norm.weight": torch.zeros(2)}
    params = {k: torch.nn.Parameter(v) for k, v in p.items()}
    decay, no_decay = adamw_groups(params.items(), 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert {id(t) for t in decay["params"]} == {id(params["blocks.0.fc.weight"]), id(params["ffn.w_in"])}
    assert len(no_decay["params"]) == 5


# ---- weight I/O ---------------------------------------------------------------------------------------------------
def test_new_files_get_0644_under_umask_022(tmp_path):
    from checkpoints.io import atomic_write_text, new_file_mode

    old = os.umask(0o022)
    try:
        assert new_file_mode() == 0o644
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        assert new_file_mode() == 0o600
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o644


def test_an_unexpected_tensor_is_a_checkpoint_error(tmp_path):
    from checkpoints.io import atomic_save_tensors, load_state_checked

    model = torch.nn.Linear(2, 1)
    atomic_save_tensors({**model.state_dict(), "stray": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="unexpected.*stray"):
        load_state_checked(torch.nn.Linear(2, 1), tmp_path / "w.safetensors")


def _save_state(run, step):
    from checkpoints.io import save_training_state

    model = torch.nn.Linear(2, 1)
    save_training_state(run, model_state=model.state_dict(), ema_state=None, optimizer=torch.optim.SGD(model.parameters()),
                        counters={"step": step})


def test_a_finished_checkpoint_swap_leaves_no_old_folder(tmp_path):
    _save_state(tmp_path, 1)
    _save_state(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_checkpoint_old_is_only_a_fallback(tmp_path):
    """Killed after the new folder is in place but before the old one is removed: both exist, and the new one
    (checkpoint/) is what --resume reads."""
    from checkpoints.io import checkpoint_dir, load_training_state

    _save_state(tmp_path / "both", 4)
    (tmp_path / "both" / "checkpoint").rename(tmp_path / "both" / "checkpoint.old")
    _save_state(tmp_path / "new", 6)
    (tmp_path / "new" / "checkpoint").rename(tmp_path / "both" / "checkpoint")
    assert checkpoint_dir(tmp_path / "both") == tmp_path / "both" / "checkpoint"
    model = torch.nn.Linear(2, 1)
    assert load_training_state(tmp_path / "both", model, None, torch.optim.SGD(model.parameters()))["step"] == 6


@pytest.mark.parametrize("cut", [1, 4, 8])
def test_a_safetensors_file_short_by_a_few_bytes_is_truncated(tmp_path, cut):
    """8-byte length + n-byte header + data: a file shorter than 8 + n + the last tensor's end is truncated."""
    from checkpoints.meta import read_safetensors_header
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(16)}, str(path))
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert len(data) == 8 + n + 64  # 16 float32
    path.write_bytes(data[:-cut])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(path)


# ---- the LM ---------------------------------------------------------------------------------------------------------
def test_lm_rope_frequencies_are_theta_to_the_minus_2i_over_head_dim():
    """RoPE: the pair i of a head of dimension K turns by position * 10000^(-2i / K); K = 8: 1, 0.1, 0.01, 0.001."""
    from pipelines.lm.model import rope_1d

    cos, sin = rope_1d(torch.tensor([0, 1, 2]), 8)
    angles = torch.tensor([[0.0] * 4, [1.0, 0.1, 0.01, 0.001], [2.0, 0.2, 0.02, 0.002]])
    assert torch.allclose(cos, angles.cos(), atol=1e-6) and torch.allclose(sin, angles.sin(), atol=1e-6)


def test_dense_ffn_has_the_active_size_of_top_k_plus_shared_experts():
    from pipelines.lm.model import MoELM

    m = MoELM(width=16, depth=1, heads=2, context=8, ffn="dense", experts=4, expert_hidden=8, top_k=2, shared_experts=1)
    ffn = m.blocks[0].ffn
    assert (ffn.gate.out_features, ffn.up.out_features, ffn.down.in_features) == (24, 24, 24)  # (2 + 1) * 8


def test_indexer_loss_is_the_mean_over_the_dsa_layers():
    from kernels.dsa.module import DSA
    from pipelines.lm.model import MoELM

    m = MoELM(width=16, depth=2, heads=2, context=8, experts=4, expert_hidden=8, top_k=2, attn="dsa",
              attn_config={"top_k": 4, "index_heads": 2, "index_dim": 4})
    layers = [mod for mod in m.modules() if isinstance(mod, DSA)]
    assert len(layers) == 2
    layers[0].indexer_loss, layers[1].indexer_loss = torch.tensor(1.0), torch.tensor(3.0)
    assert m.indexer_loss().item() == pytest.approx(2.0)


def test_lm_training_loss_adds_the_sequence_balance_loss(tmp_path):
    from pipelines.lm.data import ByteCorpus
    from pipelines.lm.model import MoELM
    from pipelines.lm.trainer import LMStage, LMTask
    from pipelines.train import TrainConfig

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    torch.manual_seed(0)
    model = MoELM(width=16, depth=1, heads=2, context=8, experts=4, expert_hidden=8, top_k=2, balance_loss=0.5)
    task = LMTask(model, ByteCorpus(str(tmp_path / "t.txt"), 8), LMStage(), 4, None, TrainConfig())
    loss, logs = task.loss(model, model, 0, torch.Generator().manual_seed(0), 0, 1)
    assert logs["balance_loss"] > 0.1  # alpha 0.5 times sum_e f_e P_e (about 1 for a near-uniform router)
    assert loss.item() == pytest.approx(logs["ce"] + logs["balance_loss"], rel=1e-6)


def test_muon_orthogonalises_the_gate_and_up_halves_of_w_in_separately():
    """w_in [E, D, 2F] holds gate | up side by side: two matrices. A gradient whose up half is 100 x its gate
    half gives both halves the same orthogonalised step (Newton-Schulz is scale-free); one [D, 2F] matrix would
    not (its polar factor splits 1 : 100 between the halves)."""
    from pipelines.lm.model import MoELM
    from pipelines.lm.trainer import LMStage, make_lm_optimizer
    from pipelines.train import TrainConfig

    torch.manual_seed(0)
    m = MoELM(width=16, depth=1, heads=2, context=8, experts=2, expert_hidden=4, top_k=1, shared_experts=0)
    opt = make_lm_optimizer(m, TrainConfig(weight_decay=0.0, precision="fp32"), LMStage(optimizer="muon"))
    w_in = m.blocks[0].ffn.w_in
    g = torch.randn(2, 16, 4)
    w_in.grad = torch.cat([g, 100 * g], -1)
    before = w_in.detach().clone()
    opt.step()
    step = w_in.detach() - before
    assert step.abs().max() > 0
    assert torch.allclose(step[..., :4], step[..., 4:], rtol=1e-3, atol=1e-6)


# ---- the IMM trainer ------------------------------------------------------------------------------------------------
class _Sized:
    name = "folder"

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_latents_are_cached_automatically_only_for_two_passes_or_more():
    """Automatic: a finite set the run passes over at least twice (steps x batch >= 2 N), small enough."""
    from pipelines.imm.trainer import should_cache_latents

    tok = SimpleNamespace(config=SimpleNamespace(num_latents=4, latent_dim=4))
    data = _Sized(100)
    assert should_cache_latents(None, data, tok, steps=15, batch_size=10) is False  # 1.5 passes
    assert should_cache_latents(None, data, tok, steps=19, batch_size=10) is False
    assert should_cache_latents(None, data, tok, steps=20, batch_size=10) is True  # exactly 2 passes
    assert should_cache_latents(None, data, None, steps=20, batch_size=10) is False  # pixels: nothing to encode
    assert should_cache_latents(False, data, tok, steps=20, batch_size=10) is False


def test_flow_matching_draws_one_time_per_sample_whatever_the_group_size(monkeypatch):
    """Flow matching has no particle groups (groups of 1): a batch of 6 with the default group_size 4 trains,
    and every one of the 6 samples gets its own time."""
    import pipelines.imm.trainer as trainer
    from pipelines.data import make_dataset
    from pipelines.imm.model import DiT
    from pipelines.imm.schedule import IMMSchedule
    from pipelines.imm.trainer import IMMStage, IMMTask

    seen = []
    monkeypatch.setattr(trainer, "flow_matching_loss", lambda net, model, sched, x, labels, draws: (
        seen.append((x, labels, draws)) or (x.sum() * 0, {})))
    data = make_dataset("shapes", image_size=16)
    model = DiT(space="pixels", num_tokens=16, token_dim=48, grid=(1, 4, 4), cube=(1, 2, 2), image_size=16, patch_size=4,
                width=32, depth=1, heads=2, num_classes=6)
    stage = IMMStage(objective="flow-matching")
    assert stage.group_size == 4
    task = IMMTask(model, IMMSchedule(), stage, data, data, None, 6, 0, "shapes")
    task.loss(model, model, 0, torch.Generator().manual_seed(0), 0, 1)
    x, labels, draws = seen[0]
    assert x.shape[0] == 6 and labels.shape == (6,) and draws["t"].shape == (6,) and draws["noise"].shape[0] == 6
    assert len(set(draws["t"].tolist())) == 6


# ---- the MAETok trainer and model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, tubelet", [(1, 1), (2, 2), (4, 2), (3, 1), (5, 1)])
def test_default_tubelet_is_2_for_an_even_clip_else_1(frames, tubelet):
    from pipelines.maetok.trainer import build_config

    assert build_config("tiny", 32, frames, None, None, "ae")["tubelet"] == tubelet


class _ShiftTokenizer:
    """encode -> x itself, decode -> x + shift[b]: reconstruction errors known per sample."""

    def __init__(self, shift):
        self.shift = shift

    def encode(self, x):
        return x, None

    def decode(self, z):
        return z + self.shift.view(-1, 1, 1, 1, 1)


def test_evaluate_reconstruction_reports_the_mean_and_the_worst_psnr():
    """Errors 0.2 and 0.02 on the [-1, 1] scale are 0.1 and 0.01 on [0, 1]: MSE 1e-2 and 1e-4, PSNR 20 and 40 dB."""
    from pipelines.maetok.trainer import evaluate_reconstruction

    x = torch.zeros(2, 3, 1, 4, 4)
    heldout = type("H", (), {"__len__": lambda self: 2, "get_batch": lambda self, idx: (x[idx], None)})()
    metrics, _, _ = evaluate_reconstruction(_ShiftTokenizer(torch.tensor([0.2, 0.02])), heldout, 5, "cpu")
    assert metrics["num"] == 2
    assert metrics["psnr"] == pytest.approx(30.0, abs=1e-3)
    assert metrics["psnr_min"] == pytest.approx(20.0, abs=1e-3)


def test_principal_component_stds_are_the_sample_stds_along_each_direction():
    """The std of component i is the (unbiased, as torch.std) std of the samples' coordinates along direction i:
    for the 1-D samples 1 and 3 that is sqrt(((1 - 2)^2 + (3 - 2)^2) / (2 - 1)) = sqrt(2)."""
    from pipelines.maetok.trainer import principal_components

    mean, std, directions = principal_components(torch.tensor([[1.0], [3.0]]))
    assert mean.tolist() == [2.0] and std.tolist() == pytest.approx([math.sqrt(2)])
    z = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 1.0, 0.2])
    mean, std, directions = principal_components(z)
    coords = (z.double() - mean) @ directions.T
    assert torch.allclose(std, coords.std(0), rtol=1e-9)


def _vae(mean_value, logvar_value):
    """A VAE tokenizer whose bottleneck outputs constants: mean and log-variance of every latent channel."""
    from pipelines.maetok.model import MAETok

    torch.manual_seed(0)
    m = MAETok(image_size=8, patch_size=4, width=16, enc_depth=1, dec_depth=1, heads=2, num_latents=2, latent_dim=4,
               bottleneck="vae")
    with torch.no_grad():
        m.to_latent.weight.zero_()
        m.to_latent.bias.copy_(torch.tensor([mean_value] * 4 + [logvar_value] * 4))
    return m


def test_vae_kl_sums_over_the_latent_channels():
    """KL(N(m, e^lv) || N(0, 1)) per channel is (m^2 + e^lv - 1 - lv) / 2; a latent token's KL is the sum over
    its 4 channels: m = 1, lv = 0 give 4 x 0.5 = 2 (averaged over tokens and samples: still 2)."""
    m = _vae(1.0, 0.0)
    _, kl = m.encode(torch.zeros(3, 3, 1, 8, 8))
    assert kl.item() == pytest.approx(2.0, rel=1e-6)
    m = _vae(0.0, math.log(4.0))
    _, kl = m.encode(torch.zeros(3, 3, 1, 8, 8))
    assert kl.item() == pytest.approx(4 * 0.5 * (4 - 1 - math.log(4.0)), rel=1e-5)


def test_vae_sample_is_mean_plus_std_times_noise():
    """log-variance log 4: std 2, so a sample is mean + 2 eps with eps the generator's standard normal draw."""
    m = _vae(0.5, math.log(4.0))
    z, _ = m.encode(torch.zeros(3, 3, 1, 8, 8), generator=torch.Generator().manual_seed(5), sample=True)
    eps = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(z, 0.5 + 2 * eps, atol=1e-5)


def test_latent_tokens_sit_at_the_patches_half_a_stride_in():
    """latent j sits at the position of patch floor((j + 1/2) N / L): N = 16 patches, L = 4 latents -> 2, 6, 10, 14."""
    from pipelines.maetok.model import MAETok

    m = MAETok(image_size=16, patch_size=4, width=16, enc_depth=1, dec_depth=1, heads=2, num_latents=4, latent_dim=4)
    assert m.num_patches == 16
    assert torch.equal(m.rope_cos[16:], m.rope_cos[[2, 6, 10, 14]])
    assert torch.equal(m.rope_sin[16:], m.rope_sin[[2, 6, 10, 14]])


def test_decoder_finetuning_loss_is_the_pixel_mse_only():
    """keep=None (decoder fine-tuning): no HOG, no KL, even for a VAE; the loss is the pixel MSE alone."""
    from pipelines.maetok.model import maetok_loss

    m = _vae(1.0, 0.0)
    x = torch.rand(2, 3, 1, 8, 8) * 2 - 1
    loss, logs = maetok_loss(m, m, x, None, kl_weight=0.1)
    assert set(logs) == {"mse"} and loss.item() == pytest.approx(logs["mse"], rel=1e-7)


# ---- metrics --------------------------------------------------------------------------------------------------------
def test_psnr_of_identical_inputs_is_exactly_100_db():
    from pipelines.metrics import psnr

    x = torch.rand(2, 3, 1, 4, 4) * 2 - 1
    assert psnr(x, x).tolist() == pytest.approx([100.0, 100.0], abs=1e-6)


# ---- procedural shapes ----------------------------------------------------------------------------------------------
def test_shape_colour_keeps_the_contrast_to_every_background_colour_of_the_ramp():
    """The guarantee of _shape_colour: mean |s - c| >= MIN_CONTRAST for EVERY colour c on the segment bg0 -> bg1
    (the ramp's colours), not only for its middle; here over 20,000 random backgrounds, half with a gradient."""
    import numpy as np

    from pipelines.data.shapes import GRADIENT, MIN_CONTRAST, _shape_colour

    rng = np.random.default_rng(0)
    n = 20000
    bg0 = rng.random((n, 3))
    bg1 = np.clip(bg0 + (rng.random((n, 1)) < 0.5) * GRADIENT * (2 * rng.random((n, 3)) - 1), 0.0, 1.0)
    s = _shape_colour(rng.random((n, 3)), bg0, bg1)
    worst = min(np.abs(s - (bg0 + t * (bg1 - bg0))).mean(1).min() for t in np.linspace(0, 1, 41))
    assert worst >= MIN_CONTRAST - 1e-12


def test_shape_radius_is_a_fifth_to_two_fifths_of_the_side():
    import numpy as np

    from pipelines.data.shapes import N_PARAMS, P_SIZE, _clip_params

    u = np.full((3, N_PARAMS), 0.5)
    u[:, P_SIZE] = [0.0, 0.5, 1 - 2.0**-24]
    radius = _clip_params(u, 40, 1)["radius"]
    assert radius.tolist() == pytest.approx([8.0, 12.0, 16.0], abs=1e-5)  # 0.2, 0.3, 0.4 of 40


def test_moving_shapes_bounce_without_jumps():
    """Motion is a triangle wave between R and size - R: the centre never moves more than |velocity| per frame
    and never leaves those limits."""
    import numpy as np

    from pipelines.data.shapes import N_PARAMS, P_DIR, P_SPEED, _clip_params

    u = np.random.default_rng(1).random((64, N_PARAMS))
    size = 32
    p = _clip_params(u, size, 120)
    speed = size * (0.02 + 0.04 * u[:, P_SPEED])
    direction = 2 * math.pi * u[:, P_DIR]
    for c, v in ((p["cx"], speed * np.cos(direction)), (p["cy"], speed * np.sin(direction))):
        assert (np.abs(np.diff(c, axis=1)) <= np.abs(v)[:, None] + 1e-9).all()
        r = p["radius"][:, None]
        assert (c >= r - 1e-9).all() and (c <= size - r + 1e-9).all()
    # and they do reach the walls: over 120 frames at >= 0.64 px per frame most clips turn at least once
    turned = (np.diff(np.sign(np.diff(p["cx"], axis=1)), axis=1) != 0).any(1)
    assert turned.mean() > 0.5


# ---- bench-attn's arithmetic ----------------------------------------------------------------------------------------
def _rows(*points):
    return [{"tokens": n, "methods": {"nsa-cpu": {"forward_speedup": s}}} for n, s in points]


def test_break_even_interpolates_in_log_log_and_counts_as_fast_as_equal():
    from kernels.bench_attn import break_even

    # log-log halfway between 1000 (0.5x) and 4000 (2x): sqrt(1000 * 4000) = 2000
    assert break_even(_rows((1000, 0.5), (4000, 2.0)), "nsa-cpu", "forward_speedup") == 2000
    # 0.25x at 1000, 1x at 16000: the speedup 1 is the second point itself
    assert break_even(_rows((1000, 0.25), (16000, 1.0)), "nsa-cpu", "forward_speedup") == 16000
    assert break_even(_rows((1000, 1.0), (4000, 3.0)), "nsa-cpu", "forward_speedup") == "<= 1000"  # as fast already
    assert break_even(_rows((1000, 0.5), (4000, 0.9)), "nsa-cpu", "forward_speedup") == "> 4000"


def test_best_time_is_the_fastest_of_the_repeats_after_a_warm_up(monkeypatch):
    import kernels.bench_attn as bench

    clock = [0.0]
    durations = [50.0, 3.0, 1.0, 2.0]  # the warm-up (compilation) is slow and not counted

    def fn():
        clock[0] += durations.pop(0)

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert bench.best_time(fn, "cpu", 3) == 1.0 and durations == []


def test_speedup_is_the_sdpa_time_over_the_methods_time(monkeypatch):
    import kernels.bench_attn as bench

    times = {"sdpa": 2.0, "nsa-cpu": 0.5}  # nsa 4x faster than sdpa
    monkeypatch.setattr(bench, "methods", lambda cfg, grid: {name: ((lambda x, q, k, v, t=t: t), [])
                                                             for name, t in times.items()})
    monkeypatch.setattr(bench, "best_time", lambda fn, device, repeats: fn())
    monkeypatch.setattr(bench, "peak_memory_mb", lambda fn, device: 0.0)
    cfg = bench.BenchConfig(heads=1, head_dim=2, backward=False, repeats=1)
    row = bench.bench_grid(cfg, (1, 2, 2))
    assert row["tokens"] == 4
    assert row["methods"]["nsa-cpu"]["forward_speedup"] == 4.0 and row["methods"]["sdpa"]["forward_speedup"] == 1.0


# ---- compile_check's launch keys ------------------------------------------------------------------------------------
def test_divisibility_spec_is_by_16():
    from kernels.compile_check import _spec

    assert [_spec(n) for n in (0, 8, 16, 24, 32, 48, 4096 + 8)] == ["D", "", "D", "", "D", "D", ""]
    assert _spec(SimpleNamespace(data_ptr=lambda: 1024 + 8)) == "" and _spec(SimpleNamespace(data_ptr=lambda: 1024)) == "D"


def test_runtime_ints_are_i32_exactly_within_the_int32_range():
    from kernels.compile_check import _scalar_type

    assert [_scalar_type(v) for v in (0, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1)] == ["i32", "i32", "i64", "i32", "i64"]


def test_shared_memory_exactly_at_the_limit_is_not_a_problem(monkeypatch):
    import kernels.compile_check as cc

    limit = cc.SHARED_LIMIT[90]
    monkeypatch.setattr(cc, "compile_launch", lambda launch, arch: {"kernel": launch["name"], "case": launch["case"],
                                                                    "shared": launch["shared"], "registers": 32})
    launches = [{"name": "at", "case": "a", "shared": limit}, {"name": "over", "case": "b", "shared": limit + 1}]
    results, problems = cc.compile_all(launches, [90])
    assert len(results) == 2 and len(problems) == 1 and "over" in problems[0] and str(limit + 1) in problems[0]
