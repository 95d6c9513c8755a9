"""IMM: schedule maths at closed-form points, the MMD, the objective, samplers, pipeline round trip."""
import math

import pytest
import torch

from pipelines.imm.model import DiT
from pipelines.imm.objective import draw_global, flow_matching_loss, imm_loss, laplace_kernel, mmd, model_map
from pipelines.imm.schedule import IMMSchedule
from pipelines.imm.scheduler import IMMScheduler
from pipelines.imm.sampling import generate

SIGMOID_4 = 1 / (1 + math.exp(-4))


def tiny_dit(space="pixels", **kw):
    if space == "pixels":
        args = dict(space="pixels", num_tokens=16, token_dim=48, grid=(1, 4, 4), cube=(1, 2, 2), image_size=16,
                    patch_size=4, width=32, depth=2, heads=2, num_classes=3)
    else:
        args = dict(space="latent", num_tokens=8, token_dim=4, grid=(1, 4, 4), latent_mean=[0.0] * 4,
                    latent_std=[1.0] * 4, width=32, depth=2, heads=2, num_classes=3)
    model = DiT(**{**args, **kw})
    with torch.no_grad():  # leave the zero-initialised output head, so G is not trivially 0
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 0:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("parameterization", ["euler_fm", "simple_edm"])
@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_map_is_identity_from_t_to_t(parameterization, schedule):
    sched = IMMSchedule(schedule=schedule, parameterization=parameterization)
    model = tiny_dit()
    x = torch.randn(5, 16, 48)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.994])
    labels = torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(model_map(model, sched, x, t, t, labels), x, atol=1e-6)
    s = t * 0.5  # and a real jump does move x (the test could not pass with G = 0)
    assert (model_map(model, sched, x, s, t, labels) - x).abs().max() > 1e-3


def test_loss_weight_closed_form():
    t = torch.tensor([0.5], dtype=torch.float64)
    # fm at t = 1/2: alpha = sigma = 1/2, lambda = 0, dlambda/dt = -2 / (t (1 - t)) = -8
    for a, expected in ((1, 0.5 * SIGMOID_4 * 8 * 0.5 / 0.5), (2, 0.5 * SIGMOID_4 * 8 * 0.25 / 0.5)):
        assert IMMSchedule(weight_a=a).loss_weight(t).item() == pytest.approx(expected, rel=1e-9)
    # cosine at t = 1/2: alpha = sigma = sqrt(2)/2, lambda = 0, dlambda/dt = -pi / (sin cos) = -2 pi
    assert IMMSchedule(schedule="cosine", weight_a=2).loss_weight(t).item() == pytest.approx(0.5 * SIGMOID_4 * 2 * math.pi * 0.5, rel=1e-9)
    # fm at t = 0.2: lambda = 2 log 4, dlambda/dt = -2 / 0.16
    lam, alpha, sigma = 2 * math.log(4), 0.8, 0.2
    expected = 0.5 / (1 + math.exp(-(4 - lam))) * (2 / 0.16) * alpha**2 / (alpha**2 + sigma**2)
    assert IMMSchedule().loss_weight(torch.tensor([0.2], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-9)


def test_r_closed_form_and_r_at_least_s():
    sched = IMMSchedule()
    eta_max, eta_min = 0.994 / 0.006, 0.006 / 0.994
    eta_r = 1.0 - (eta_max - eta_min) / 2**12  # eta(1/2) = 1 minus one decrement
    r = sched.r_of(torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    assert r.item() == pytest.approx(eta_r / (1 + eta_r), rel=1e-9)
    r = sched.r_of(torch.tensor([0.495], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    assert r.item() == pytest.approx(0.495)  # clipped to s
    for sampler in ("uniform", "lognormal"):
        s, r, t = IMMSchedule(time_sampler=sampler).sample_times(4096, torch.Generator().manual_seed(0))
        assert (s <= r).all() and (r <= t).all() and (s >= 0.006 - 1e-7).all() and (t <= 0.994 + 1e-7).all()
        assert (r < t).float().mean() > 0.5  # r is a real step back from t for most draws
    eta_r = 1.0 - (eta_max - eta_min) / 2**8  # --decrement-k 8: a 16x larger step back
    r = IMMSchedule(k=8).r_of(torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    assert r.item() == pytest.approx(eta_r / (1 + eta_r), rel=1e-9)
    with pytest.raises(ValueError, match="k"):
        IMMSchedule(k=0)


def test_s_on_the_sampling_grid():
    """--s-grid N: s is one of the N-step grid's times at or below t, each equally likely; t and r as before."""
    n = 40_000
    base = IMMSchedule().sample_times(n, torch.Generator().manual_seed(0))
    s, r, t = IMMSchedule(s_grid=2).sample_times(n, torch.Generator().manual_seed(0))
    assert torch.equal(t, base[2])  # the same t (and stream) as s ~ U(eps, t)
    assert (s <= r).all() and (r <= t).all()
    low, mid = (s - 0.006).abs() < 1e-6, (s - 0.5).abs() < 1e-6
    assert (low | mid).all() and not mid[t < 0.5].any()  # only grid points, never above t
    assert mid[t > 0.5].float().mean().item() == pytest.approx(0.5, abs=0.02)  # both points equally likely above 0.5
    s4, _, t4 = IMMSchedule(s_grid=4).sample_times(n, torch.Generator().manual_seed(1))
    grid = torch.tensor([0.006, 0.253, 0.5, 0.747])
    hits = (s4[:, None] - grid).abs() < 1e-6
    assert hits.any(1).all() and (s4 <= t4).all()
    top = t4 > 0.747  # all four below t: a quarter each
    assert hits[top].float().mean(0).tolist() == pytest.approx([0.25] * 4, abs=0.02)
    with pytest.raises(ValueError, match="s_grid"):
        IMMSchedule(s_grid=-1)


def test_laplace_kernel_and_mmd():
    a = torch.zeros(1, 2, 4)
    b = torch.zeros(1, 2, 4)
    b[0, 1] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # distance 5, D = 4
    k = laplace_kernel(a, b, torch.tensor([2.0]))
    assert k[0, 0, 1].item() == pytest.approx(math.exp(-2 * 5 / 4))  # normalised by ALL elements, not the last dim
    assert k[0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(3, 4, 10)
    w = torch.tensor([1.0, 5.0, 20.0])
    assert mmd(x, x.clone(), w).abs().max() < 1e-6
    y = x + 0.5 * torch.randn_like(x)
    value = mmd(x, y, w)
    assert (value > 1e-4).all()
    # one bandwidth for all three terms: the value is the textbook V-statistic with that single w
    manual = torch.stack([laplace_kernel(x, x, w).mean((1, 2)), laplace_kernel(y, y, w).mean((1, 2)),
                          laplace_kernel(x, y, w).mean((1, 2))])
    assert torch.allclose(value, manual[0] + manual[1] - 2 * manual[2])
    x.requires_grad_(True)
    mmd(x, x.detach().clone(), w).sum().backward()  # zero distances: finite gradients
    assert torch.isfinite(x.grad).all()


def test_imm_loss_falls_on_a_tiny_run():
    torch.manual_seed(0)
    sched = IMMSchedule()
    model = DiT(space="pixels", num_tokens=16, token_dim=48, grid=(1, 4, 4), cube=(1, 2, 2), image_size=16, patch_size=4,
                width=64, depth=2, heads=2, num_classes=3)
    labels = torch.arange(32) % 3
    prototypes = torch.randn(3, 16, 48).sign() * 0.5  # a learnable distribution: one pattern per class
    data = prototypes[labels] + 0.05 * torch.randn(32, 16, 48)

    def loss_at(gen_seed):
        draws = draw_global(sched, 32, 4, (16, 48), 0.0, torch.Generator().manual_seed(gen_seed))
        return imm_loss(model, model, sched, data, labels, draws, 4)[0]

    with torch.no_grad():
        before = sum(loss_at(k).item() for k in range(8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(80):
        loss = loss_at(1000 + step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(k).item() for k in range(8))
    assert after < 0.9 * before, (before, after)


def test_target_has_no_gradient_and_groups_share_times():
    sched = IMMSchedule()
    model = tiny_dit()
    x = torch.randn(8, 16, 48) * 0.5
    draws = draw_global(sched, 8, 4, (16, 48), 0.0, torch.Generator().manual_seed(0))
    assert draws["t"].shape == (2,) and draws["noise"].shape == (8, 16, 48)
    loss, _ = imm_loss(model, model, sched, x, torch.zeros(8, dtype=torch.long), draws, 4)
    loss.backward()
    assert all(p.grad is not None for p in model.out.parameters())
    fm_draws = draw_global(sched, 8, 1, (16, 48), 0.1, torch.Generator().manual_seed(0), objective="flow-matching")
    assert fm_draws["t"].shape == (8,)
    assert flow_matching_loss(model, model, sched, x, torch.zeros(8, dtype=torch.long), fm_draws)[0].item() > 0


def test_velocity_groups_train_flow_matching_on_the_same_pass():
    """--fm-fraction: groups marked fm train G(x, t, t) with the flow-matching loss; the other draws do not change;
    all-fm equals the flow-matching baseline's loss, none-fm the plain IMM loss, and a mix is their weighted sum."""
    torch.manual_seed(0)
    sched, model = IMMSchedule(), tiny_dit()
    x, labels = torch.randn(16, 16, 48) * 0.5, torch.arange(16) // 4 % 3
    plain = draw_global(sched, 16, 4, (16, 48), 0.0, torch.Generator().manual_seed(3))
    mixed = draw_global(sched, 16, 4, (16, 48), 0.0, torch.Generator().manual_seed(3), fm_fraction=0.5)
    assert not plain["fm"].any() and all(torch.equal(plain[k], mixed[k]) for k in ("s", "r", "t", "noise", "drop"))
    imm_only = imm_loss(model, model, sched, x, labels, plain, 4)[0]
    everything = {**plain, "fm": torch.ones(4, dtype=torch.bool)}
    per_sample = {"t": plain["t"].repeat_interleave(4), "drop": plain["drop"].repeat_interleave(4), "noise": plain["noise"]}
    fm_only = flow_matching_loss(model, model, sched, x, labels, per_sample)[0]
    torch.testing.assert_close(imm_loss(model, model, sched, x, labels, everything, 4, fm_weight=0.3)[0], 0.3 * fm_only)
    half = {**plain, "fm": torch.tensor([True, False, True, False])}
    loss, logs = imm_loss(model, model, sched, x, labels, half, 4, fm_weight=0.3)
    keep = torch.tensor([False, True, False, True]).repeat_interleave(4)
    sub = {k: v[[1, 3]] for k, v in plain.items() if k not in ("noise", "u")}
    sub["noise"] = plain["noise"][keep]
    imm_part = imm_loss(model, model, sched, x[keep], labels[keep], sub, 4)[0] / 2  # a mean over 2 of 4 groups
    fm_sub = {k: v[~keep] for k, v in per_sample.items()}
    fm_part = flow_matching_loss(model, model, sched, x[~keep], labels[~keep], fm_sub)[0]
    torch.testing.assert_close(loss, imm_part + 0.3 * fm_part * 0.5)
    assert logs["fm"] > 0 and "fm" not in imm_loss(model, model, sched, x, labels, plain, 4, fm_weight=0.3)[1]
    assert imm_only.item() > 0


@pytest.mark.parametrize("sampler", ["pushforward", "restart", "euler"])
def test_sampling_is_deterministic_per_seed(sampler):
    model = tiny_dit().eval()
    scheduler = IMMScheduler(sampler=sampler)
    labels = torch.tensor([0, 1, 2, 0])
    run = lambda seed: generate(model, scheduler, labels, 2, torch.Generator().manual_seed(seed), cfg_scale=1.5)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (4, 3, 1, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_step_pushforward_is_f_from_T_to_eps():
    model = tiny_dit().eval()
    sched = IMMSchedule()
    labels = torch.tensor([0, 1])
    tokens = generate(model, IMMScheduler(), labels, 1, torch.Generator().manual_seed(3), cfg_scale=1.0)
    x_T = 0.5 * torch.randn(2, 16, 48, generator=torch.Generator().manual_seed(3))
    expected = model_map(model, sched, x_T, torch.full((2,), sched.eps), torch.full((2,), sched.T), labels)
    assert torch.allclose(tokens, model.pixels_from_tokens(expected).clamp(-1, 1), atol=1e-5)


def test_cube_major_tokens_round_trip():
    model = tiny_dit()
    x = torch.randn(2, 3, 1, 16, 16)
    tokens = model.tokens_from_pixels(x)
    assert torch.equal(model.pixels_from_tokens(tokens), x)
    # the first cube (1x2x2 patches) is the first 4 tokens: patches (0,0), (0,1), (1,0), (1,1) of the 4x4 grid
    assert model.token_order[:4].tolist() == [0, 1, 4, 5]


def test_pipeline_save_load_round_trip(tmp_path):
    from pipelines.imm.pipeline import IMMPipeline

    pipe = IMMPipeline(tiny_dit().eval(), IMMScheduler(), None)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = IMMPipeline.from_pretrained(tmp_path / "pipe", low_cpu_mem_usage=False)
    kw = dict(class_labels=[0, 2], num_inference_steps=2, output_type="pt")
    a = pipe(**kw, generator=torch.Generator().manual_seed(5)).images
    b = loaded(**kw, generator=torch.Generator().manual_seed(5)).images
    assert torch.equal(a, b)
    pil = loaded(class_labels=[1], num_inference_steps=1).images
    assert pil[0].size == (16, 16)


def test_pipeline_samples_with_its_saved_defaults(tmp_path):
    """default_steps / guidance_scale / guidance_scale_one_step survive save/load and are what a call without
    num_inference_steps or guidance_scale uses (the 1-step value only for single jumps); none saved: 1 step, no
    guidance."""
    from pipelines.imm.pipeline import IMMPipeline

    torch.manual_seed(0)
    model = tiny_dit().eval()
    pipe = IMMPipeline(model, IMMScheduler(), None, default_steps=2, guidance_scale=2.5, guidance_scale_one_step=1.25)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = IMMPipeline.from_pretrained(tmp_path / "pipe", low_cpu_mem_usage=False)
    assert (loaded.config.default_steps, loaded.default_guidance(2), loaded.default_guidance(1)) == (2, 2.5, 1.25)

    def draw(p, **kw):
        return p(class_labels=[0, 2], output_type="pt", generator=torch.Generator().manual_seed(5), **kw).images

    assert torch.equal(draw(loaded), draw(pipe, num_inference_steps=2, guidance_scale=2.5))
    assert not torch.equal(draw(loaded), draw(pipe, num_inference_steps=2, guidance_scale=1.0))
    assert torch.equal(draw(loaded, num_inference_steps=1), draw(pipe, num_inference_steps=1, guidance_scale=1.25))
    plain = IMMPipeline(model, IMMScheduler(), None)
    assert torch.equal(draw(plain), draw(pipe, num_inference_steps=1, guidance_scale=1.0))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_imm_training_resumes_exactly(tmp_path, optimizer):
    """4 straight steps == a crash at step 3 (checkpoint at 2) + resume, with IMM's draws, EMA and latent-free pixels
    (and Muon's momentum buffers)."""
    import json

    from pipelines.data import make_dataset
    from pipelines.imm.trainer import IMMStage, IMMTask
    from pipelines.train import TrainConfig, train

    def task():
        torch.manual_seed(0)
        data = make_dataset("shapes", image_size=16)
        t = IMMTask(tiny_dit(num_classes=6), IMMSchedule(), IMMStage(optimizer=optimizer), data, data, None, 8, 0, "shapes")
        t.pictures = lambda *a: None
        return t

    cfg = TrainConfig(steps=4, batch_size=8, warmup=1, save_every=2, sample_every=0, log_every=1, ema=0.9)
    train(task(), cfg, tmp_path / "straight", quiet=True)
    crashing = task()
    real = crashing.loss

    def crash(net, model, step, *rest):
        if step == 3:
            raise RuntimeError("power cut")
        return real(net, model, step, *rest)

    crashing.loss = crash
    with pytest.raises(RuntimeError):
        train(crashing, cfg, tmp_path / "resumed", quiet=True)
    train(task(), cfg, tmp_path / "resumed", resume=True, quiet=True)
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731,E741
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") and len(losses(tmp_path / "straight")) == 4
    from checkpoints.io import load_model

    a = load_model(tmp_path / "straight" / "transformer", "imm").state_dict()
    b = load_model(tmp_path / "resumed" / "transformer", "imm").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_muon_takes_the_hidden_matrices_each_split_and_adamw_the_rest():
    from pipelines.imm.trainer import IMMStage, make_imm_optimizer
    from pipelines.nn.muon import MuonAdamW, orthogonalise_all
    from pipelines.train import TrainConfig

    torch.manual_seed(0)
    model = tiny_dit(space="latent")
    opt = make_imm_optimizer(model, TrainConfig(lr=1e-3), IMMStage(optimizer="muon", muon_lr_scale=10.0))
    assert isinstance(opt, MuonAdamW)
    split = {id(p): g["split_out"] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    b = model.blocks[0]
    assert split[id(b.attn.qkv.weight)] == 3 and split[id(b.ada[1].weight)] == 6 and split[id(model.final_ada[1].weight)] == 2
    assert split[id(b.mlp.fc1.weight)] == 1 and split[id(b.attn.proj.weight)] == 1 and split[id(model.t_embed.mlp[0].weight)] == 1
    for p in (model.embed.weight, model.out.weight, model.class_embed.weight, model.pos, b.attn.qkv.bias):
        assert id(p) not in split  # input/output projections, embeddings and vectors stay with AdamW
    assert all(g["lr_scale"] == 10.0 for g in opt.param_groups if g["use_muon"])
    assert not isinstance(make_imm_optimizer(model, TrainConfig(), IMMStage()), MuonAdamW)
    assert opt.ns_dtype == torch.float32  # an fp32 run orthogonalises in fp32, a bf16 run in bf16
    assert make_imm_optimizer(model, TrainConfig(precision="bf16"), IMMStage(optimizer="muon")).ns_dtype == torch.bfloat16
    # q, k and v orthogonalised one by one: each third of the update has near-unit singular values
    g = torch.randn(96, 32)
    o = orthogonalise_all([(g, {"split_out": 3})])[0]
    for part in o.chunk(3, 0):
        assert torch.allclose(torch.linalg.svdvals(part), torch.ones(32), atol=0.35)
    # batched over shapes: the same result as one matrix at a time
    a, c = torch.randn(32, 32), torch.randn(16, 64)
    together = orthogonalise_all([(a, {}), (c, {}), (a * 2, {})])
    assert torch.allclose(together[0], orthogonalise_all([(a, {})])[0]) and torch.allclose(together[0], together[2], atol=1e-2)
    before = b.attn.qkv.weight.detach().clone()
    x = torch.randn(2, 8, 4)
    model(x, torch.full((2,), 0.8), torch.full((2,), 0.3), torch.tensor([0, 1])).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, b.attn.qkv.weight)


def test_every_block_learns_from_the_first_step():
    """adaLN-zero: gates start at 0 but every block's modulation gets a gradient at once (zeroing the output
    projections as well would leave the blocks dead: both factors of the residual branch at zero)."""
    model = DiT(space="pixels", num_tokens=16, token_dim=48, grid=(1, 4, 4), cube=(1, 2, 2), image_size=16, patch_size=4,
                width=32, depth=3, heads=2, num_classes=3)
    x, t, labels = torch.randn(4, 16, 48), torch.rand(4), torch.tensor([0, 1, 2, 3])
    target = torch.randn(4, 16, 48)
    assert model(x, t, t * 0.5, labels).abs().max() == 0  # the network starts by predicting 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # step 1 moves only the zero-initialised output layer; step 2 reaches the blocks
        opt.zero_grad()
        (model(x, t, t * 0.5, labels) - target).pow(2).mean().backward()
        opt.step()
    for block in model.blocks:
        assert block.ada[1].weight.grad.abs().sum() > 0


def test_class_groups_share_one_label():
    from pipelines.imm.objective import class_groups

    labels = torch.tensor([2, 0, 1, 0, 0, 2, 0, 1, 2, 2, 1, 0])  # 5 zeros, 3 ones, 4 twos; M = 2
    order, group_labels = class_groups(labels, 2, null_class=3)
    assert sorted(order.tolist()) == list(range(12)) and group_labels.shape == (6,)
    grouped = labels[order].view(6, 2)
    for members, label in zip(grouped, group_labels.tolist()):
        if label != 3:
            assert (members == label).all()
    assert group_labels.tolist() == [0, 0, 1, 2, 2, 3]  # leftovers (one 0, one 1) form a null-class group


def test_complete_class_groups_take_the_first_groups_to_fill():
    from pipelines.imm.objective import complete_class_groups

    #                      0  1  2  3  4  5  6  7  8  9 10 11
    labels = torch.tensor([2, 0, 1, 0, 2, 0, 1, 0, 2, 1, 1, 2])  # M = 2: 0 fills at 3 and 7, 2 at 4 and 11, 1 at 6 and 10
    pos, group_labels = complete_class_groups(labels, 3, 2, null_class=3)
    assert group_labels.tolist() == [0, 1, 2]  # the first three to fill (at 3, 4, 6), class-major
    assert pos.tolist() == [1, 3, 2, 6, 0, 4]
    assert (labels[pos].view(3, 2) == group_labels[:, None]).all()
    # a window with too few full groups: the earliest unused samples make null-class groups
    pos, group_labels = complete_class_groups(torch.tensor([0, 1, 2, 0, 3, 4]), 2, 2, null_class=5)
    assert group_labels.tolist() == [0, 5] and pos.tolist() == [0, 3, 1, 2]
    # 100 classes (CIFAR-100's count), batch 64, M = 4: sorting leaves nearly all of it in null-class leftovers,
    # group_window's longer window none
    from pipelines.imm.objective import class_groups, group_window

    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 100, (group_window(64, 4, 100),), generator=gen)
    assert (class_groups(stream[:64], 4, 100)[1] == 100).float().mean() > 0.8
    assert (complete_class_groups(stream, 16, 4, 100)[1] < 100).all()
    # on shapes' stream a window of twice the batch always has enough: no null groups in 200 steps at M = 8
    from pipelines.data import make_dataset

    data = make_dataset("shapes", split="train")
    for step in range(200):
        window = data.indices_for_step(step, 128, 0)
        pos, group_labels = complete_class_groups(data.labels_of(window), 8, 8, null_class=6)
        assert pos.unique().numel() == 64 and (group_labels < 6).all()
        assert (data.labels_of(window[pos]).view(8, 8) == group_labels[:, None]).all()


def test_label_dropout_counts_the_leftover_groups():
    from pipelines.imm.objective import class_groups, unconditional_groups

    gen = torch.Generator().manual_seed(0)
    null, total, groups = 6, 0.0, 0
    for _ in range(400):  # 64-sample batches of 6 classes in groups of 4, as the tiny preset trains
        labels = torch.randint(0, 6, (64,), generator=gen)
        _, group_labels = class_groups(labels, 4, null)
        drop = unconditional_groups(torch.rand(16, generator=gen), group_labels, null, 0.25)
        assert not (drop & (group_labels == null)).any()  # only class groups are dropped
        total += float(((group_labels == null) | drop).sum())
        groups += 16
    assert abs(total / groups - 0.25) < 0.02  # leftovers alone are ~14 %; without the correction ~35 %
    few = torch.tensor([0, 1, 2, 6, 6, 6])  # more leftovers than the dropout asks for: drop no class group
    assert not unconditional_groups(torch.zeros(6), few, 6, 0.1).any()


@pytest.mark.parametrize("groups", ["sorted", "complete"])
def test_ranks_share_the_global_groups_and_dropout(monkeypatch, groups):
    """Two ranks see exactly the halves of what one process sees: the same samples, group labels after
    label dropout, times and noise (class groups and dropout are decided on the global batch)."""
    import pipelines.imm.trainer as trainer
    from pipelines.data import make_dataset
    from pipelines.imm.trainer import IMMStage, IMMTask

    seen = []
    monkeypatch.setattr(trainer, "imm_loss", lambda net, model, sched, x, labels, draws, M, fm_weight=0.0: (
        seen.append((x, labels, draws)) or (x.sum() * 0, {})))
    data = make_dataset("shapes", image_size=16)
    task = IMMTask(tiny_dit(num_classes=6), IMMSchedule(), IMMStage(label_dropout=0.4, groups=groups), data, data, None, 64, 0, "shapes")
    for world in (1, 2):
        for rank in range(world):
            task.loss(task.model, task.model, 3, torch.Generator().manual_seed(7), rank, world)
    (x1, l1, d1), (xa, la, da), (xb, lb, db) = seen
    assert torch.equal(torch.cat([xa, xb]), x1) and torch.equal(torch.cat([la, lb]), l1)
    for k in ("s", "r", "t", "drop", "noise"):
        assert torch.equal(torch.cat([da[k], db[k]]), d1[k]), k
    assert "u" not in d1 and d1["drop"].any()  # dropout at 0.4 exceeds the leftovers: some class groups dropped
    # sorted: a class's remainder lands in null-class groups; complete: none, the null class comes from dropout alone
    assert (l1 == 6).any() == (groups == "sorted")


def test_per_token_latent_statistics_normalise_each_token():
    from pipelines.imm.trainer import latent_statistics

    class Tok:  # a 1D tokenizer whose latent tokens have their own means and scales
        def encode(self, x):
            z = x.flatten(1)[:, :12].view(-1, 3, 4)
            return (z * torch.tensor([1.0, 5.0, 0.2])[:, None] + torch.tensor([0.0, 3.0, -2.0])[:, None],)

    class Data:  # endless, like the procedural sets
        def __len__(self):
            return 2**31 - 1

        def get_batch(self, idx):
            return torch.randn(len(idx), 3, 1, 4, 4, generator=torch.Generator().manual_seed(int(idx[0]))), None

    mean, std = latent_statistics(Tok(), Data(), 2048, "cpu", batch_size=512, per_token=True)
    assert torch.tensor(mean).shape == (3, 4) and torch.tensor(std).shape == (3, 4)
    model = tiny_dit("latent", num_tokens=3, latent_mean=mean, latent_std=std)
    z = Tok().encode(Data().get_batch(torch.arange(4096, 8192))[0])[0]
    tokens = model.tokens_from_latents(z)
    assert tokens.mean((0,)).abs().max() < 0.05 and (tokens.std(0) - model.config.data_std).abs().max() < 0.05
    assert torch.allclose(model.latents_from_tokens(tokens), z, atol=1e-5)
    channel_mean, _ = latent_statistics(Tok(), Data(), 2048, "cpu", batch_size=512)
    assert torch.tensor(channel_mean).shape == (4,)


def test_pca_latent_space_whitens_the_top_directions_and_round_trips_within_them():
    from pipelines.imm.trainer import latent_statistics

    # latents [B, 4, 2] that live in a 4-dimensional subspace of R^8, with variances 100, 4, 1, 0.01
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]
    scales = torch.tensor([10.0, 2.0, 1.0, 0.1, 0, 0, 0, 0])

    class Tok:
        def encode(self, x):
            return (((x.flatten(1)[:, :8] * scales) @ rotation.T + 3.0).view(-1, 4, 2),)

    class Data:
        def __len__(self):
            return 2**31 - 1

        def get_batch(self, idx):
            return torch.randn(len(idx), 3, 1, 4, 4, generator=torch.Generator().manual_seed(int(idx[0]))), None

    mean, std, basis = latent_statistics(Tok(), Data(), 4096, "cpu", batch_size=512, pca=4, whiten=1.0)
    assert torch.allclose(torch.tensor(std), scales[:4], rtol=0.05)
    model = tiny_dit("latent", num_tokens=2, token_dim=2, latent_mean=mean, latent_std=std, latent_pca=4,
                     latent_shape=(4, 2))
    model.set_latent_basis(basis)
    assert model.token_shape == (2, 2)
    z = Tok().encode(Data().get_batch(torch.arange(4096, 8192))[0])[0]
    tokens = model.tokens_from_latents(z)
    assert tokens.shape == (4096, 2, 2)
    # every kept direction has the same std, the smallest (0.1) as much as the largest (10)
    assert (tokens.flatten(1).std(0) - model.config.data_std).abs().max() < 0.03
    assert torch.allclose(model.latents_from_tokens(tokens), z, atol=1e-4)  # z lies in the kept subspace
    # the basis is a weight: it survives save and load
    import tempfile
    from checkpoints.io import load_model, save_model
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        again = load_model(d, "imm")
        assert torch.equal(again.z_basis, model.z_basis)
        assert torch.allclose(again.tokens_from_latents(z), tokens)
    # --pca-whiten 0 keeps the components' proportions (10 : 2 : 1 : 0.1) at a mean variance of 1
    _, scale, _ = latent_statistics(Tok(), Data(), 4096, "cpu", batch_size=512, pca=4, whiten=0.0)
    scaled = scales[:4] / torch.tensor(scale)
    assert torch.allclose(scaled / scaled[0], scales[:4] / scales[0], rtol=1e-6)
    assert scaled.pow(2).mean().item() == pytest.approx(1.0, rel=0.05)


def test_alignment_head_reads_early_tokens_only_in_training():
    """REPA: the align head's output exists after a training forward with gradients, is a function of the first
    `align_depth` blocks only, and the loss is 0 exactly when it points along the teacher's features."""
    from pipelines.evaluation.classifier import ShapesClassifier
    from pipelines.imm.trainer import alignment_loss

    model = tiny_dit(align_dim=16, align_depth=1)
    x, t, labels = torch.randn(4, 16, 48), torch.rand(4), torch.tensor([0, 1, 2, 3])
    model.train()
    model(x, t, t * 0.5, labels)
    pred = model.alignment
    assert pred.shape == (4, 16) and pred.requires_grad
    model.alignment = None
    with torch.no_grad():  # the stop-gradient target's forward and sampling leave it alone
        model(x, t, t * 0.5, labels)
    assert model.alignment is None
    model.blocks[1].ada[1].weight.data.add_(1.0)  # a block after align_depth does not change it
    model(x, t, t * 0.5, labels)
    assert torch.allclose(model.alignment, pred)

    teacher = ShapesClassifier(image_size=16, width=8, feature_dim=16).eval()
    pixels = torch.rand(4, 3, 1, 16, 16) * 2 - 1
    target = teacher.features(pixels).detach()
    assert alignment_loss(3.0 * target, teacher, pixels).abs() < 1e-6  # cosine ignores the scale
    assert alignment_loss(pred, teacher, pixels) > 0.01
    clips = torch.rand(2, 3, 4, 16, 16) * 2 - 1  # clips: the frames' features are averaged
    clip_target = teacher.features(clips).detach().view(2, 4, 16).mean(1)
    assert alignment_loss(clip_target, teacher, clips).abs() < 1e-6


def test_alignment_teacher_runs_on_the_pixels_device():
    """IMMTask loads the REPA teacher where the model is when the task is built (the CPU: train() moves the model
    later); on CUDA its first loss then met CUDA pixels. The meta device stands in for CUDA."""
    from pipelines.evaluation.classifier import ShapesClassifier
    from pipelines.imm.trainer import alignment_loss

    teacher = ShapesClassifier(image_size=16, width=8, feature_dim=16).eval()
    meta = torch.device("meta")
    loss = alignment_loss(torch.empty(2, 16, device=meta), teacher, torch.empty(2, 3, 1, 16, 16, device=meta))
    assert loss.device == meta and next(teacher.parameters()).device == meta


def test_two_step_midpoint_sets_the_middle_time_only():
    sched = IMMScheduler(midpoint=0.65)
    sched.set_timesteps(2)
    torch.testing.assert_close(sched.times, torch.tensor([0.994, 0.65, 0.006]))
    sched.set_timesteps(4)  # the midpoint is a 2-step setting; more steps stay uniform in t
    torch.testing.assert_close(sched.times, torch.linspace(0.994, 0.006, 5))
    with pytest.raises(ValueError, match="midpoint must lie between"):
        IMMSchedule().sampling_times(2, midpoint=0.999)


def test_scheduler_configs_without_start_time_and_midpoint_sample_from_t():
    """Runs saved before the two fields existed: from T with N(0, sigma_d^2), uniform; a start at or before a
    run's midpoint drops the midpoint (what `sigma sample --start-time` and diffusers users get alike)."""
    old = {k: v for k, v in IMMScheduler().config.items() if k not in ("start_time", "midpoint") and not k.startswith("_")}
    sched = IMMScheduler(**old)
    sched.set_timesteps(2)
    torch.testing.assert_close(sched.times, torch.tensor([0.994, 0.5, 0.006]))
    assert sched.init_noise_sigma == 0.5 and IMMScheduler(start_time=0.994).init_noise_sigma == 0.5
    late = IMMScheduler(start_time=0.5, midpoint=0.6)
    late.set_timesteps(2)
    torch.testing.assert_close(late.times, torch.tensor([0.5, 0.253, 0.006]))


def test_start_time_moves_the_first_time_only():
    sched = IMMScheduler(start_time=0.9)
    sched.set_timesteps(2)
    torch.testing.assert_close(sched.times, torch.tensor([0.9, 0.453, 0.006]))
    assert sched.init_noise_sigma == pytest.approx(0.5 * (0.1 ** 2 + 0.9 ** 2) ** 0.5)  # x_0.9's own std (fm schedule)
    assert IMMScheduler().init_noise_sigma == 0.5  # from T: the paper's N(0, sigma_d^2)
    torch.testing.assert_close(IMMSchedule().sampling_times(2, midpoint=0.6, start=0.9), torch.tensor([0.9, 0.6, 0.006]))
    torch.testing.assert_close(IMMSchedule().sampling_times(3, start=None), torch.linspace(0.994, 0.006, 4))
    for start in (0.999, 0.006):
        with pytest.raises(ValueError, match="start-time must lie in"):
            IMMSchedule().sampling_times(1, start=start)
    with pytest.raises(ValueError, match="midpoint must lie between"):  # the midpoint must be below the start
        IMMSchedule().sampling_times(2, midpoint=0.95, start=0.9)


def test_default_guidance_per_step_count():
    from pipelines.imm.trainer import default_guidance

    stage = {"cfg_scale": 3.0, "cfg_one_step": 1.5}
    assert default_guidance(stage, 1) == 1.5 and default_guidance(stage, 2) == 3.0
    assert default_guidance({"cfg_scale": 3.0, "cfg_one_step": None}, 1) == 3.0  # none of its own: the run's --cfg
    assert default_guidance({}, 1) == 1.0  # stages saved before either field: no guidance, as then


def test_encoding_passes_show_a_bar_only_on_a_terminal(monkeypatch):
    """The latent statistics and the latent cache encode thousands of items before the training bar starts (about a
    minute for 4,096 clips on a 2-core CPU): on a terminal they show a transient bar on stderr, elsewhere nothing."""
    import rich.console

    from pipelines.train import with_progress

    items = range(3)
    assert with_progress(items, None) is items
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: False))
    assert with_progress(items, "encoding") is items
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    wrapped = with_progress(items, "encoding")
    assert wrapped is not items and list(wrapped) == [0, 1, 2]
