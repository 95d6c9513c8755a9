"""The DeepSeekMoE LM: dispatch, router balancing, causality per attention kind, KV cache, Muon, save/load, CLI."""
import json
from pathlib import Path

import pytest
import torch

from kernels.moe import HAS_GROUPED_MM, moe_ffn, moe_reference
from pipelines.lm.model import MoE, MoELM

TINY = dict(width=32, depth=2, heads=2, context=32, experts=4, expert_hidden=8, top_k=2, shared_experts=1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", ["grouped", "sorted-loop", "loop"])
def test_dispatch_matches_reference_forward_and_gradients(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = [torch.randn(6, 16, 16, generator=g, requires_grad=True), torch.randn(6, 8, 16, generator=g, requires_grad=True)]
    scores = torch.rand(50, 6, generator=g)
    scores[:, 5] = -1  # an expert nobody picks: an empty group
    gate, idx = scores.topk(3, -1)
    gate = gate.requires_grad_()
    ref = moe_reference(x, *w, idx, gate)
    out = moe_ffn(x, *w, idx, gate, backend)
    assert rel(out, ref) < 1e-6
    dy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [x, *w, gate], dy), torch.autograd.grad(ref, [x, *w, gate], dy)):
        assert rel(a, b) < 1e-5


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(16, 8, 8, top_k=2, shared=0)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)  # token-dependent scores (identical ones could never be balanced)
        moe.router.weight[0] += 0.5  # expert 0 wins for most tokens
    x = torch.randn(4, 64, 16).abs()

    def spread():
        moe.load.zero_()
        moe(x)
        return moe.load.max().item() / moe.load.mean().item()

    moe.train()
    before = spread()
    for _ in range(300):
        moe(x)
        moe.update_bias(0.01)
    after = spread()
    assert before > 3 and after < 1.6, (before, after)
    assert moe.bias[0] < moe.bias[1:].min()  # the overloaded expert's bias went down


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_moe_layer_is_the_deepseek_v3_formula(router):
    """Token by token, from the notes: scores s = sigmoid(x R^T) (or softmax); the top-k of s + bias choose the
    experts; the gates are the chosen *unbiased* scores, renormalised for sigmoid, times route_scale; the output
    is the gated experts plus the shared experts."""
    torch.manual_seed(0)
    E, D, F, k, scale = 6, 8, 4, 2, 2.5
    moe = MoE(D, E, F, top_k=k, shared=1, router=router, route_scale=scale).eval()
    with torch.no_grad():
        moe.w_out.normal_()  # zero at init: every expert would be silent
        moe.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0]))  # expert 3 always chosen, its score unchanged
    x = torch.randn(1, 7, D)
    out = moe(x)[0]
    for t in range(7):
        xt = x[0, t]
        logits = moe.router.weight @ xt
        s = torch.sigmoid(logits) if router == "sigmoid" else torch.softmax(logits, -1)
        chosen = torch.topk(s + moe.bias, k).indices
        assert 3 in chosen.tolist()
        g = s[chosen] / s[chosen].sum() if router == "sigmoid" else s[chosen]
        want = moe.shared(xt)
        for e, ge in zip(chosen.tolist(), (g * scale).tolist()):
            h = xt @ moe.w_in[e]
            want = want + ge * ((torch.nn.functional.silu(h[:F]) * h[F:]) @ moe.w_out[e])
        assert torch.allclose(out[t], want, atol=1e-5, rtol=1e-5), t


def test_sequence_balance_loss_is_eq_17_to_20():
    """alpha * sum_e f_e P_e per sequence: f_e = E / (k T) * (tokens choosing e), P_e = mean over the
    sequence of the scores normalised per token; averaged over sequences."""
    torch.manual_seed(0)
    E, k, T, alpha = 4, 2, 5, 0.3
    moe = MoE(8, E, 4, top_k=k, shared=0, balance_loss=alpha)
    scores = torch.rand(2, T, E)
    choice = scores.topk(k, -1).indices
    want = 0.0
    for b in range(2):
        f = [E / (k * T) * (choice[b] == e).sum().item() for e in range(E)]
        p = [(scores[b, :, e] / scores[b].sum(-1)).mean().item() for e in range(E)]
        want += alpha * sum(fe * pe for fe, pe in zip(f, p)) / 2
    assert moe.sequence_balance_loss(scores, choice).item() == pytest.approx(want, rel=1e-6)


def test_rope_is_a_rotation_by_relative_position():
    """apply_rope keeps norms, and <rope(q, m), rope(k, n)> depends on m - n only; so the LM (dense
    attention, no cache) gives the same logits wherever the window starts."""
    from pipelines.lm.model import rope_1d
    from pipelines.nn.layers import apply_rope

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def at(x, pos):
        cos, sin = rope_1d(torch.tensor([pos]), 16)
        return apply_rope(x, cos, sin)

    assert torch.allclose(at(q, 9).norm(), q.norm(), atol=1e-5)
    dot = lambda m, n: (at(q, m) * at(k, n)).sum().item()  # noqa: E731
    assert dot(7, 3) == pytest.approx(dot(14, 10), abs=1e-4) and dot(7, 3) != pytest.approx(dot(7, 4), abs=1e-3)
    m = MoELM(**TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        idx = torch.randint(0, 256, (2, 9))
        assert torch.allclose(m(idx, start=0), m(idx, start=13), atol=1e-4)


def test_training_steps_move_the_router_bias_and_inference_counts_no_load():
    """The LM trainer's after_step applies gamma * sign(mean load - load) from the loads its training forwards
    counted; forwards in eval mode (generation, validation) count nothing."""
    from pipelines.lm.data import ByteCorpus
    from pipelines.lm.trainer import LMStage, LMTask
    from pipelines.train import TrainConfig

    torch.manual_seed(0)
    m = MoELM(**TINY, bias_update=0.01)
    task = LMTask(m, ByteCorpus(None, 32), LMStage(), 4, None, TrainConfig(batch_size=4))
    m.eval()
    m(torch.randint(0, 256, (2, 16)))
    assert all(layer.load.sum() == 0 for layer in m.moe_layers())
    m.train()
    task.loss(m, m, 0, torch.Generator().manual_seed(0), 0, 1)
    loads = [layer.load.clone() for layer in m.moe_layers()]
    assert all(load.sum() == 4 * 32 * TINY["top_k"] for load in loads)  # every token's k choices
    task.after_step(m, 0)
    for layer, load in zip(m.moe_layers(), loads):
        torch.testing.assert_close(layer.bias, 0.01 * torch.sign(load.mean() - load))
        assert layer.load.sum() == 0


@pytest.mark.parametrize("attn", ["dense", "nsa", "mta", "dsa", "dsa-warmup"])
def test_future_tokens_change_no_earlier_logit(attn):
    torch.manual_seed(0)
    cfg = {"nsa": {"block": 4, "top_n": 3, "window": 6}, "mta": {"kq_every": 1}, "dsa": {"top_k": 5},
           "dsa-warmup": {"top_k": 5, "stage": "warmup"}}.get(attn)
    attn = attn.split("-")[0]
    m = MoELM(**TINY, attn=attn, attn_config=cfg).eval()
    with torch.no_grad():  # waken the zero-initialised parts so every path carries signal
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    idx = torch.randint(0, 256, (1, 30))
    logits = m(idx)
    idx2 = idx.clone()
    idx2[0, 20:] = (idx2[0, 20:] + 7) % 256
    logits2 = m(idx2)
    assert torch.allclose(logits[0, :20], logits2[0, :20], atol=1e-5)
    assert not torch.allclose(logits[0, 20:], logits2[0, 20:], atol=1e-5)


CACHE_KINDS = {"dense": None, "nsa": {"block": 4, "top_n": 4, "window": 6}, "mta": {"kq_every": 1},
               "dsa": {"top_k": 5}, "dsa-warmup": {"top_k": 5, "stage": "warmup"}}


def woken_lm(attn: str, **kw) -> MoELM:
    torch.manual_seed(0)
    m = MoELM(**{**TINY, **kw}, attn=attn.split("-")[0], attn_config=CACHE_KINDS[attn]).eval()
    with torch.no_grad():  # waken the zero-initialised parts (gates, MTA's kernels) so every path carries signal
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("attn", list(CACHE_KINDS))
def test_kv_cache_decodes_every_attention_kind_as_the_full_forward(attn):
    """A prompt, then one token at a time through the cache: each step's logits are the full causal forward's
    at that position (NSA: selection past the forced blocks, the window, blocks completed while decoding;
    MTA: the query convolutions across the trimmed query history; DSA: the indexer's cached keys)."""
    m = woken_lm(attn, context=64)
    idx = torch.randint(0, 16, (2, 30))  # many repeated bytes: equal indexer keys at the first layer, DSA's ties
    full = m(idx)
    caches = [{} for _ in m.blocks]
    with torch.no_grad():
        steps = [m(idx[:, :5], caches, 0)] + [m(idx[:, t:t + 1], caches, t) for t in range(5, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    if attn == "mta":  # only the 2 (c_q - 1) latest queries are kept
        assert all(c["q"].shape[2] == 10 for c in caches)
    if attn == "nsa":  # every complete block compressed once, as it completed
        assert all(c["k_cmp"].shape[2] == c["v_cmp"].shape[2] == 30 // 4 for c in caches)


@pytest.mark.parametrize("attn", list(CACHE_KINDS))
def test_kv_cache_generates_the_same_tokens(attn):
    m = woken_lm(attn)
    prompt = torch.randint(0, 256, (2, 5))
    a = m.generate(prompt, 20, temperature=0)
    b = m.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    c = m.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    d = m.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(c, d)


def test_muon_steps_expert_weights():
    from pipelines.nn.muon import MuonAdamW, newton_schulz
    from pipelines.lm.trainer import LMStage, make_lm_optimizer
    from pipelines.train import TrainConfig

    o = newton_schulz(torch.randn(3, 16, 8))  # a batch of matrices: near-orthonormal columns each
    assert torch.allclose(o.transpose(1, 2) @ o, torch.eye(8).expand(3, 8, 8), atol=0.35)
    m = MoELM(**TINY)
    opt = make_lm_optimizer(m, TrainConfig(lr=1e-2), LMStage(optimizer="muon"))
    assert isinstance(opt, MuonAdamW)
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    expert = m.blocks[0].ffn.w_in
    assert any(p is expert for p in muon) and all(p is not m.embed.weight for p in muon)
    assert all(p is not m.blocks[0].norm1.weight and p is not m.blocks[0].ffn.router.weight for p in muon)
    before = expert.detach().clone()
    loss = m(torch.randint(0, 256, (2, 16))).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, expert)


def test_save_load_round_trip_with_the_tied_head(tmp_path):
    from checkpoints.io import load_model, save_model

    torch.manual_seed(0)
    m = MoELM(**TINY)
    with torch.no_grad():
        m.blocks[0].ffn.bias.fill_(0.25)  # the router bias is state too
    save_model(m, tmp_path / "lm")
    back = load_model(tmp_path / "lm", "lm")
    idx = torch.randint(0, 256, (1, 12))
    assert torch.equal(m.eval()(idx), back(idx))
    assert torch.equal(back.blocks[0].ffn.bias, torch.full((4,), 0.25))
    assert not any("head" in k for k in back.state_dict())  # the head is the embedding, stored once


def test_cli_train_resume_generate_eval(cli, tmp_path):
    common = ["--width", "32", "--depth", "2", "--heads", "2", "--context", "32", "--experts", "4", "--batch-size", "4",
              "--sample-every", "0", "--save-every", "2", "--out", tmp_path / "lm"]
    r = cli("train-lm", *common, "--steps", "2", "--json")
    assert r.exit_code == 0, r.stderr
    first = json.loads(r.stdout.strip().splitlines()[-1])
    assert first["steps"] == 2 and first["bits_per_byte"] > 0
    r = cli("train-lm", "--out", tmp_path / "lm", "--resume", "--steps", "4", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["resumed_from"] == 2
    r = cli("generate", "--model", tmp_path / "lm", "--prompt", "\u00e9\u00e8 \x01", "--max-new-tokens", "5", "--json")
    assert r.exit_code == 0, r.stderr  # any bytes are fine in a prompt
    assert json.loads(r.stdout)["prompt"] == "\u00e9\u00e8 \x01"  # --json keeps control characters exact
    r = cli("generate", "--model", tmp_path / "lm", "--prompt", "\x1b[2J\x07go", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.stderr  # the plain output shows them as symbols: the terminal must not act on them
    assert r.stdout.startswith("\u241b[2J\u2407go") and not any(c < " " and c not in "\n\t" for c in r.stdout)
    r = cli("eval-lm", "--model", tmp_path / "lm", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["bits_per_byte"] > 0
    r = cli("train-lm", "--dense", "--optimizer", "muon", *common[:-1], tmp_path / "dense", "--steps", "1", "--json")
    assert r.exit_code == 0, r.stderr
    r = cli("train-lm", "--precision", "bf16", *common[:-1], tmp_path / "bf16", "--steps", "1", "--json")
    assert r.exit_code == 0, r.stderr  # the grouped matmuls in bf16 under autocast, forward and backward


def test_visible_shows_control_characters_as_symbols():
    from pipelines.lm.data import visible

    assert visible("a\x1b[31mb\r\nc\td\x07\x7f\x85\u00e9\u4e2d\x00") == "a\u241b[31mb\u240d\nc\td\u2407\u2421\\x85\u00e9\u4e2d\u2400"
    assert visible("plain text, \u00fcnicode \u2603") == "plain text, \u00fcnicode \u2603"


def test_lm_bad_inputs_fail_with_one_line(cli, tmp_path, runs_tok=None):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def" * 100)
    from checkpoints.io import save_model
    from pipelines.evaluation.classifier import ShapesClassifier

    save_model(ShapesClassifier(), tmp_path / "clf")
    cases = [(("train-lm", "--data", tmp_path / "empty.txt", "--out", tmp_path / "a"), "is empty"),
             (("train-lm", "--data", tmp_path / "bin.txt", "--out", tmp_path / "b"), "looks binary"),
             (("train-lm", "--data", tmp_path / "missing.txt", "--out", tmp_path / "c"), "missing.txt' does not exist"),
             (("generate", "--model", tmp_path / "clf"), "holds a classifier model, but this needs an lm model"),
             (("train-lm", "--attn", "flash", "--out", tmp_path / "d"), "not available for the LM"),
             (("bench-moe", "--top-k", "20"), "--top-k at most --experts")]
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code == 1, (args, r.stdout)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_cli_seed_init_and_recorded_data(cli, tmp_path, monkeypatch):
    """The same --seed gives the same initial weights; --init refuses architecture options; the run records its
    text file's absolute path, so eval-lm finds it from any working directory; a bad --lr is one line."""
    from safetensors.torch import load_file

    arch = ["--width", "32", "--depth", "1", "--heads", "2", "--context", "32", "--experts", "4"]
    monkeypatch.chdir(tmp_path)
    Path("text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        r = cli("train-lm", *arch, "--data", "text.txt", "--batch-size", "4", "--steps", "1", "--sample-every", "0",
                "--seed", seed, "--out", name, "--json")
        assert r.exit_code == 0, r.stderr
        runs[name] = load_file(tmp_path / name / "diffusion_pytorch_model.safetensors")
    trained = json.loads(r.stdout.strip().splitlines()[-1])
    info = cli("info", "c", "--json")  # parameters as training counts them: the router's bias buffer is not one
    assert info.exit_code == 0 and json.loads(info.stdout)["parameters"] == trained["parameters"]
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])
    assert json.loads((tmp_path / "a" / "sigma.json").read_text())["data_spec"] == str(tmp_path / "text.txt")
    monkeypatch.chdir(tmp_path.parent)
    assert cli("eval-lm", "--model", tmp_path / "a", "--json").exit_code == 0
    for args, message in [(("--init", tmp_path / "a", "--width", "64"), "leave out --width"),
                          (("--lr", "-1"), "--lr must be a finite number >= 0"),
                          (("--balance-loss", "-1"), "--balance-loss must be >= 0")]:
        r = cli("train-lm", *args, "--steps", "1", "--out", tmp_path / "x")
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_moe_runs(cli):
    r = cli("bench-moe", "--tokens", "64", "--dim", "16", "--experts", "4", "--hidden", "8", "--top-k", "2",
            "--repeats", "1", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["check_max_abs"] < 1e-5 and {"grouped", "sorted-loop", "loop", "dense"} <= set(res["methods"])
    if HAS_GROUPED_MM:  # the matmul floor (the grouped path's six matmuls alone) and loop / floor
        assert "grouped-matmuls-only" in res["methods"] and res["grouped_vs_loop_ceiling"] > 0


def test_dsa_warmup_trains_only_the_indexer_and_sparse_selects_top_k():
    from kernels.dsa import indexer_scores, topk_mask
    from pipelines.lm.data import ByteCorpus
    from pipelines.lm.trainer import LMStage, LMTask, make_lm_optimizer
    from pipelines.train import TrainConfig

    torch.manual_seed(0)
    m = MoELM(**TINY, attn="dsa", attn_config={"stage": "warmup", "top_k": 4})
    cfg = TrainConfig(lr=1e-2, batch_size=4)
    task = LMTask(m, ByteCorpus(None, 32), LMStage(), 4, None, cfg)
    task.trainable(m)
    indexer = {id(p) for p in m.indexer_parameters()}
    assert indexer and all(p.requires_grad == (id(p) in indexer) for p in m.parameters())
    opt = make_lm_optimizer(m, cfg, LMStage())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    before_buffers = {n: b.clone() for n, b in m.named_buffers()}
    assert any(n.endswith("ffn.bias") for n in before_buffers)
    for step in range(8):
        loss, logs = task.loss(m, m, step, torch.Generator().manual_seed(step), 0, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.after_step(m, step)  # the aux-loss-free bias update stays off: the model is frozen
        assert logs["indexer_kl"] > 0
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != (".index_" in n), n  # the indexer moved, nothing else did
    assert all(torch.equal(b, before_buffers[n]) for n, b in m.named_buffers() if n.endswith(".bias")), "router bias moved"
    # the selection: causal before top-k, so an early query never picks a future token
    s = indexer_scores(torch.randn(1, 6, 2, 4), torch.randn(1, 6, 4), torch.rand(1, 6, 2))
    mask = topk_mask(s, 3)
    assert not (mask & torch.ones(6, 6, dtype=torch.bool).triu(1)).any()
    assert mask.sum(-1).tolist() == [[1, 2, 3, 3, 3, 3]]


def test_cli_dsa_two_stages_from_a_dense_run(cli, tmp_path):
    arch = ["--width", "32", "--depth", "1", "--heads", "2", "--context", "32", "--experts", "4"]
    common = ["--batch-size", "4", "--sample-every", "0", "--steps", "2", "--json"]  # --init brings the architecture
    assert cli("train-lm", *arch, *common, "--out", tmp_path / "dense").exit_code == 0
    r = cli("train-lm", *common, "--attn", "dsa", "--dsa-stage", "warmup", "--init", tmp_path / "dense", "--out", tmp_path / "w")
    assert r.exit_code == 0, r.stderr
    r = cli("train-lm", *common, "--attn", "dsa", "--dsa-stage", "sparse", "--dsa-top-k", "8", "--init", tmp_path / "w",
            "--out", tmp_path / "s")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["bits_per_byte"] > 0
    r = cli("train-lm", *common, "--attn", "mta", "--init", tmp_path / "dense", "--out", tmp_path / "bad")
    assert r.exit_code == 1 and "does not fit this model" in r.stderr
    for args, message in ((("--dsa-stage", "warmup", "--init", tmp_path / "dense"), "it needs --attn dsa, not --attn dense"),
                          (("--attn", "dsa", "--dsa-stage", "warmup"), "give it --init RUN")):
        r = cli("train-lm", *common, *args, "--out", tmp_path / "bad")
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_compiled_model_does_not_recompile_as_the_routing_changes():
    """Under torch.compile (--compile) the expert dispatch runs eager: how many tokens each expert gets changes every
    step, and traced, those counts (0 and 1 above all) became guards that recompiled the graph step after step
    (train-lm --compile ran 12x slower than eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = MoELM(**{**TINY, "experts": 8, "top_k": 1})  # 6 tokens over 8 experts: empty and single-token experts
    compiled = torch.compile(m, backend="aot_eager")  # traces as inductor does, without its C++ build
    batches = [torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert torch.allclose(compiled(batches[0]), m(batches[0]), atol=1e-5)
    graphs = counters["aot_autograd"]["total"]
    for idx in batches[1:]:  # other tokens, other expert loads
        compiled(idx).float().square().mean().backward()
    assert counters["aot_autograd"]["total"] == graphs  # (the old traced dispatch: 14 graphs, then 18, 22, 26)
    torch._dynamo.reset()


def test_cli_own_text_files(cli, tmp_path, monkeypatch):
    """Text a researcher brings: UTF-16 is refused naming its encoding; a file too short says how long it must be;
    a non-UTF-8 file trains with a note; a prompt of non-UTF-8 bytes (a shell argument) is its bytes, shown as
    text; eval-lm and --resume name the run's text file once it is gone, and --resume notes a changed one."""
    monkeypatch.chdir(tmp_path)
    arch = ["--width", "32", "--depth", "1", "--heads", "2", "--context", "16", "--experts", "4", "--batch-size", "2",
            "--sample-every", "0"]
    Path("u16.txt").write_bytes(("some text\n" * 20).encode("utf-16"))
    Path("short.txt").write_text("a" * 33)
    Path("latin1.txt").write_bytes("caf\xe9 na\xefve gr\xfc\xdfe\n".encode("latin-1") * 10)
    for name, message in (("u16.txt", "UTF-16 or UTF-32 text"), ("short.txt", "it needs at least 34 bytes")):
        r = cli("train-lm", "--data", name, *arch, "--steps", "1", "--out", "x")
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("train-lm", "--data", "latin1.txt", *arch, "--steps", "1", "--save-every", "1", "--out", "run", "--json")
    assert r.exit_code == 0 and "is not UTF-8 (byte 3 is 0xe9)" in r.stderr, r.stderr
    r = cli("generate", "--model", "run", "--prompt", "caf\udce9", "--max-new-tokens", "3", "--json")  # bytes 'caf', 0xe9
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["prompt"] == "caf\ufffd"
    Path("latin1.txt").rename("moved.txt")
    for args in (("eval-lm", "--model", "run"), ("train-lm", "--out", "run", "--resume", "--steps", "2")):
        r = cli(*args)
        assert r.exit_code == 1 and "latin1.txt', which is not a file any more" in r.stderr, r.stderr
        assert "--data '" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    Path("latin1.txt").write_text("other text altogether. " * 5)
    r = cli("train-lm", "--out", "run", "--resume", "--steps", "2", "--json")
    assert r.exit_code == 0 and "has changed since the run last saved" in r.stderr, r.stderr


@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-32-be", "utf-32"])
def test_big_endian_utf16_and_utf32_text_is_refused_naming_its_encoding(tmp_path, encoding):
    """UTF-32-BE's mark starts with NUL bytes: it was called binary."""
    from pipelines.errors import SigmaError
    from pipelines.lm.data import load_text

    bom = {"utf-16-be": b"\xfe\xff", "utf-32-be": b"\x00\x00\xfe\xff", "utf-32": b""}[encoding]  # utf-32 writes its own
    (tmp_path / "be.txt").write_bytes(bom + ("some text\n" * 20).encode(encoding))
    with pytest.raises(SigmaError, match="UTF-16 or UTF-32 text"):
        load_text(str(tmp_path / "be.txt"))


def test_text_file_path_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    from pipelines.lm.data import load_text

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.txt").write_text("hello text\n")
    name, ids = load_text("~/t.txt")
    assert name == "t.txt" and bytes(ids.tolist()) == b"hello text\n"


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="no torch._grouped_mm")
def test_grouped_dispatch_runs_in_the_autocast_dtype():
    """torch._grouped_mm is on none of autocast's lists: under autocast it stayed fp32 (on CUDA only bf16 takes the
    fused kernel). moe_ffn casts as autocast does for `@` (bf16 matmuls, the sum over the k experts in x's fp32), gradients
    back in the parameters' fp32; a width grouped_mm cannot read in bf16 falls back to the sorted loop."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    w = [torch.randn(4, 16, 16, generator=g, requires_grad=True), torch.randn(4, 8, 16, generator=g, requires_grad=True)]
    gate, idx = torch.rand(40, 4, generator=g).topk(2, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe_ffn(x, *w, idx, gate, "grouped")
        loop = moe_ffn(x, *w, idx, gate, "sorted-loop")  # matmuls autocast casts by itself
    by_hand = moe_ffn(x.bfloat16(), *(t.bfloat16() for t in w), idx, gate, "grouped").float()
    assert out.dtype == torch.float32
    assert rel(out, by_hand) < 1e-2 and rel(out, loop) < 1e-2
    assert rel(out, moe_ffn(x, *w, idx, gate, "grouped")) > 1e-3  # it did compute in bf16 (was 0: fp32)
    grads = torch.autograd.grad(out.square().sum(), [x, *w])
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves fp64 alone; grouped_mm refuses it: the loop
        x64, w64 = x.detach().double(), [t.detach().double() for t in w]
        torch.testing.assert_close(moe_ffn(x64, *w64, idx, gate.double()), moe_reference(x64, *w64, idx, gate.double()))
    torch.testing.assert_close(moe_ffn(x64, *w64, idx, gate.double()), moe_reference(x64, *w64, idx, gate.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # rows of 12 bf16 values are not whole 16-byte units
        x12, w12 = torch.randn(40, 12), [torch.randn(4, 12, 16), torch.randn(4, 8, 12)]
        assert torch.equal(moe_ffn(x12, *w12, idx, gate), moe_ffn(x12, *w12, idx, gate, "sorted-loop"))
        with pytest.raises(ValueError, match="multiples of 8 in torch.bfloat16"):
            moe_ffn(x12, *w12, idx, gate, "grouped")
