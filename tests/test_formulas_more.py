"""Closed-form checks of the core maths and data code that the behavioural tests cannot see: MAETok's masking and
HOG target, the data splits and crops, the LM's data, evaluation and sampling, DSA's indexer, Muon, the lr
schedule, gradient clipping, latent statistics and the classifier's labels. Every expected value is computed by
hand here (or from a formula in docs/notes), not with the code's own helpers."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.maetok.model import MAETok, maetok_loss


def tiny_tok(**kw):
    return MAETok(**{**dict(image_size=16, patch_size=4, width=32, enc_depth=1, dec_depth=1, heads=2,
                            num_latents=8, latent_dim=4), **kw})


def randomise(model, std=0.3):
    """Random weights everywhere (zero-initialised branches would hide which inputs a module reads)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# ---- MAETok ------------------------------------------------------------------------------------------------


def test_mask_ratio_is_a_truncated_normal_not_a_clamped_one():
    """Ratios follow normal(0.6, 0.25) truncated to [0.4, 0.6] (notes/maetok.md): its CDF at 0.45, 0.5 and 0.55 is
    (Phi((r-0.6)/0.25) - Phi(-0.8)) / (Phi(0) - Phi(-0.8)), and no draw sits exactly on a bound (clamping would
    pile about half of them onto 0.6)."""
    model = tiny_tok()
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([model.sample_mask_ratio(g) for _ in range(6000)], dtype=torch.float64)
    lo, hi = normal_cdf(-0.8), normal_cdf(0.0)
    for q in (0.45, 0.5, 0.55):
        expected = (normal_cdf((q - 0.6) / 0.25) - lo) / (hi - lo)
        assert (r < q).double().mean().item() == pytest.approx(expected, abs=0.025), q
    assert ((r == 0.4) | (r == 0.6)).sum() == 0
    mean = 0.6 + 0.25 * (math.exp(-0.8**2 / 2) - 1) / math.sqrt(2 * math.pi) / (hi - lo)  # about 0.505
    assert r.mean().item() == pytest.approx(mean, abs=0.005)


@pytest.mark.parametrize("ratio,visible", [(0.25, 12), (0.5, 8), (0.75, 4)])
def test_random_keep_leaves_one_minus_ratio_of_the_patches_visible(ratio, visible):
    """At mask ratio r, round(N (1 - r)) of the N = 16 patches stay visible: sorted, distinct, a different subset
    per sample."""
    model = tiny_tok()
    keep = model.random_keep(64, ratio, torch.Generator().manual_seed(0))
    assert keep.shape == (64, visible)
    assert (keep[:, 1:] > keep[:, :-1]).all() and keep.min() >= 0 and keep.max() < 16
    assert len({tuple(k.tolist()) for k in keep}) > 32


def test_hog_loss_is_the_mean_squared_error_over_the_masked_patches_only(monkeypatch):
    """hog = mean over masked patches of mean_d (pred - target)^2; the targets of visible patches do not enter."""
    model = randomise(tiny_tok())
    x = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    keep = torch.tensor([[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]])
    targets = torch.randn(2, 16, model.hog_dim)
    monkeypatch.setattr(model, "hog_targets", lambda x: targets)
    _, logs = maetok_loss(model, model, x, keep, hog_weight=1.0)
    with torch.no_grad():
        pred = model(x, keep, with_hog=True).hog_pred
    masked = torch.ones(2, 16, dtype=torch.bool)
    masked[0, keep[0]] = masked[1, keep[1]] = False
    expected = (pred - targets).pow(2).mean(-1)[masked].mean().item()
    assert logs["hog"] == pytest.approx(expected, rel=1e-5)
    changed = targets.clone()
    changed[~masked] = 5.0
    monkeypatch.setattr(model, "hog_targets", lambda x: changed)
    assert maetok_loss(model, model, x, keep, hog_weight=1.0)[1]["hog"] == pytest.approx(logs["hog"], rel=1e-6)


def test_latents_are_read_from_the_latent_tokens():
    """With no encoder blocks the encoder is its final LayerNorm, so z = to_latent(LayerNorm(latent tokens)) for every
    picture and mask: the latent tokens, not the patch tokens, carry the output."""
    model = randomise(tiny_tok(enc_depth=0))
    n = model.encoder.norm
    expected = model.to_latent(F.layer_norm(model.latent_tokens, (32,), n.weight, n.bias, n.eps))
    x = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    keep = model.random_keep(2, 0.5, torch.Generator().manual_seed(0))
    for z in (model.encode(x)[0], model.encode(x, keep)[0]):
        assert z.shape == (2, 8, 4)
        torch.testing.assert_close(z, expected.expand(2, -1, -1))


def test_decoder_finetuning_freezes_the_encoder_by_itself():
    """keep=None (decoder fine-tuning) runs the encoder without gradient even when its parameters require one (the
    built-in --finetune-tail stage does not set requires_grad); the decoder still learns."""
    model = randomise(tiny_tok())
    x = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    loss, logs = maetok_loss(model, model, x, None)
    loss.backward()
    assert all(p.grad is None for p in model.encoder_parameters())
    assert model.to_pixels.weight.grad.abs().sum() > 0 and model.from_latent.weight.grad.abs().sum() > 0
    assert set(logs) == {"mse"}


@pytest.mark.parametrize("steps,tail,first", [(10, 0.2, 8), (10, 0.3, 7), (100, 0.1, 90)])
def test_finetune_tail_is_the_last_fraction_of_the_steps(steps, tail, first):
    """--finetune-tail f: the decoder fine-tuning phase starts at step round(steps (1 - f))."""
    from pipelines.data import make_dataset
    from pipelines.maetok.trainer import TokenizerStage, TokenizerTask

    data = make_dataset("shapes", image_size=16)
    task = TokenizerTask(tiny_tok(), data, data, TokenizerStage(finetune_tail=tail), 4, 0, "shapes", num_pictures=2,
                         steps=steps)
    assert task.finetune_from == first


def test_hog_splits_each_gradient_linearly_between_its_two_nearest_bins():
    """A linear ramp has one gradient orientation theta everywhere; at theta = 0.3 bin widths (bin k centred on
    k pi / 9) its magnitude is split 0.7 : 0.3 between bins 0 and 1. An interior patch (no border pixels) of a
    32x32 ramp holds exactly that in each of its cells and channels."""
    from pipelines.maetok.hog import hog_features

    theta = 0.3 * math.pi / 9
    h, w = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = 0.02 * (math.cos(theta) * (w - 16) + math.sin(theta) * (h - 16))  # gradient (cos, sin) along (W, H)
    x = ramp.expand(1, 3, 1, 32, 32)
    f = hog_features(x, patch=8)  # [1, 16, 3 * 4 * 9]
    cells = f[0, 1 * 4 + 1].view(3, 4, 9)  # token (row 1, col 1): pixels 8-15, no border
    assert torch.allclose(cells[..., 1] / cells[..., 0], torch.full((3, 4), 0.3 / 0.7), rtol=1e-3)
    assert torch.allclose(cells[..., 2:], torch.zeros(3, 4, 7), atol=1e-6)
    assert torch.allclose(cells[..., 0], torch.full((3, 4), cells[0, 0, 0].item()), rtol=1e-4)


# ---- data --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,frames", [("shapes", 1), ("moving-shapes", 4)])
def test_labels_of_matches_the_drawn_batch_in_both_splits(spec, frames):
    """labels_of (no pixels) gives the labels get_batch draws, in the held-out split too."""
    from pipelines.data import make_dataset

    for split in ("train", "heldout"):
        ds = make_dataset(spec, frames=frames, split=split, seed=2)
        idx = torch.arange(50, 90)
        assert torch.equal(ds.labels_of(idx), ds.get_batch(idx)[1]), split


def _png(path, size, bands, vertical=False):
    """Three equal colour bands (red, green, blue) across the width (or down the height)."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    for i in range(3):
        if vertical:
            a[i * h // 3 : (i + 1) * h // 3, :, i] = 255
        else:
            a[:, i * w // 3 : (i + 1) * w // 3, i] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def test_image_folder_resizes_the_short_side_and_crops_the_centre(tmp_path):
    """A 120x40 picture of red | green | blue bands becomes 24x8 and its centre 8x8 is the green band (not a squashed
    mix of all three, not the red left end); likewise down a 40x120 one."""
    from pipelines.data import make_dataset

    _png(tmp_path / "wide" / "a.png", (120, 40), 3)
    _png(tmp_path / "tall" / "a.png", (40, 120), 3, vertical=True)
    for name in ("wide", "tall"):
        x = make_dataset(str(tmp_path / name), image_size=8).get_batch(torch.arange(1))[0][0, :, 0]  # [3, 8, 8]
        inner = x[:, 2:6, 2:6]
        assert (inner[1] > 0.95).all() and (inner[0] < -0.95).all() and (inner[2] < -0.95).all(), name
        assert x[1].mean() > 0.6, name


def test_exactly_ten_items_hold_out_the_tenth(tmp_path):
    """With N >= 10 items every 10th (i % 10 == 9) is held out; N = 10 is the first size that holds one out."""
    from pipelines.data import make_dataset

    for i in range(10):
        Image.new("L", (8, 8), 20 * i).save(tmp_path / f"img{i}.png")
    train = make_dataset(str(tmp_path), image_size=8)
    held = make_dataset(str(tmp_path), image_size=8, split="heldout")
    assert held.paths == ["img9.png"] and len(train) == 9 and "img9.png" not in train.paths


def test_image_folder_class_is_the_first_level_folder(tmp_path):
    """Class = the first-level sub-folder, however deep the picture lies."""
    from pipelines.data import make_dataset

    for rel in ("cat/a.png", "cat/deep/b.png", "dog/x/y/c.png", "top.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel)
    ds = make_dataset(str(tmp_path), image_size=8)
    assert ds.class_names == ["all", "cat", "dog"]
    labels = dict(zip(ds.paths, ds.labels.tolist()))
    assert labels == {"cat/a.png": 1, "cat/deep/b.png": 1, "dog/x/y/c.png": 2, "top.png": 0}


# ---- LM data, evaluation, sampling ---------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_utf8():
    """encode gives the UTF-8 bytes (ids < 256), decode inverts it, multi-byte characters included."""
    from pipelines.lm.data import decode, encode

    text = "héllo wörld ✓ 𝄞 end\n"
    ids = encode(text)
    assert ids.tolist() == list(text.encode("utf-8")) and ids.max() < 256
    assert decode(ids) == text and decode(ids.tolist()) == text


def test_validation_is_a_disjoint_contiguous_tail(tmp_path):
    """The text is train + val exactly (val = the last 10 %); training windows never reach a validation byte; the
    validation windows are consecutive and each target is the next byte of its input."""
    from pipelines.lm.data import ByteCorpus

    path = tmp_path / "t.txt"
    path.write_bytes(bytes(b"abcdefghij"[i % 10] for i in range(900)) + b"XYZ" * 33 + b"Q")  # 1000 bytes
    ids = torch.tensor(list(path.read_bytes()))
    corpus = ByteCorpus(str(path), context=16)
    assert len(corpus.val) == 100 and len(corpus.train) == 900
    assert torch.equal(torch.cat([corpus.train, corpus.val]), ids)
    x, y = corpus.batch(torch.Generator().manual_seed(0), 8000)
    assert x.shape == (8000, 16) and (torch.cat([x, y], 1) >= ord("a")).all()  # lowercase only: no val byte
    assert torch.equal(x[:, 1:], y[:, :-1])
    vx, vy = corpus.val_windows()
    assert vx.shape == (6, 16)  # (100 - 1) // 16
    assert torch.equal(vx.flatten(), corpus.val[:96]) and torch.equal(vy.flatten(), corpus.val[1:97])


def test_a_short_text_keeps_one_whole_validation_window(tmp_path):
    """A tail of 10 % shorter than a window is lengthened to context + 1 bytes: one window with all its targets."""
    from pipelines.lm.data import ByteCorpus

    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(97, 123)) * 8)  # 208 bytes: 10 % = 20 < 33
    corpus = ByteCorpus(str(path), context=32)
    assert len(corpus.val) == 33
    vx, vy = corpus.val_windows()
    assert vx.shape == vy.shape == (1, 32) and torch.equal(vy[0], corpus.val[1:])


class _Fixed(torch.nn.Module):
    """A stand-in LM whose next-byte logits are always `logits` [V] (context 8, no KV cache)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.config = SimpleNamespace(context=8, attn="nsa")
        self.blocks = []
        self.device = torch.device("cpu")

    def forward(self, idx, *rest):
        return self.logits.expand(*idx.shape, -1).clone()


def test_bits_per_byte_is_the_loss_over_ln2():
    """A uniform model over 256 bytes has loss ln 256 nats per byte, i.e. 8 bits per byte, averaged per byte."""
    from pipelines.lm.data import ByteCorpus
    from pipelines.lm.trainer import evaluate

    corpus = ByteCorpus(None, context=32)
    ev = evaluate(_Fixed(torch.zeros(256)), corpus, max_windows=5, batch_size=2)
    assert ev["val_bytes"] == 5 * 32
    assert ev["val_loss"] == pytest.approx(math.log(256), rel=1e-6)
    assert ev["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)


def _sample_frequencies(logits, n=20000, temperature=1.0, top_k=None):
    from pipelines.lm.model import MoELM

    out = MoELM._generate(_Fixed(logits), torch.zeros(n, 1, dtype=torch.long), 1, temperature, top_k,
                          torch.Generator().manual_seed(0), False)
    return torch.bincount(out[:, 1], minlength=len(logits)).double() / n


def test_sampling_temperature_and_top_k():
    """Next-token frequencies follow softmax(logits / T); top-k renormalises over the k largest logits only;
    temperature 0 is greedy."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temp in (0.5, 2.0):
        expected = torch.softmax(logits.double() / temp, -1)
        assert torch.allclose(_sample_frequencies(logits, temperature=temp), expected, atol=0.015), temp
    expected = torch.tensor([math.e, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(_sample_frequencies(logits, temperature=1.0, top_k=2), expected / expected.sum(), atol=0.015)
    assert _sample_frequencies(logits, n=100, temperature=0.0).tolist() == [1.0, 0.0, 0.0, 0.0]


# ---- DSA ----------------------------------------------------------------------------------------------------


def test_indexer_scores_by_hand():
    """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) for s <= t, -inf for future keys."""
    from kernels.dsa import indexer_scores

    g = torch.Generator().manual_seed(0)
    q, k, w = torch.randn(1, 4, 2, 3, generator=g), torch.randn(1, 4, 3, generator=g), torch.rand(1, 4, 2, generator=g)
    got = indexer_scores(q, k, w)[0]
    for t in range(4):
        for s in range(4):
            if s > t:
                assert got[t, s] == float("-inf")
            else:
                want = sum(w[0, t, j].item() * max(0.0, float(q[0, t, j] @ k[0, s])) for j in range(2))
                assert got[t, s].item() == pytest.approx(want, abs=1e-6)


def test_indexer_kl_by_hand():
    """KL(p || softmax(I)) over the support, p = the main attention summed over heads and L1-normalised on it:
    >= 0, and 0 when softmax(I) equals p."""
    from kernels.dsa import indexer_kl

    support = torch.tensor([[[True, False, False], [True, True, False], [True, False, True]]])
    p = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]], [[1.0, 0, 0], [0.1, 0.9, 0], [0.6, 0.2, 0.2]]]])
    scores = torch.tensor([[[0.0, -1, -1], [1.0, 0.0, -1], [0.5, 9.0, -0.5]]])
    want = 0.0
    for t in range(3):
        idx = [s for s in range(3) if support[0, t, s]]
        target = torch.tensor([p[0, :, t, s].sum().item() for s in idx])
        target = target / target.sum()
        log_q = torch.log_softmax(torch.tensor([scores[0, t, s].item() for s in idx]), 0)
        want += float((target * (target.log() - log_q)).sum()) / 3
    got = indexer_kl(p, scores, support)
    assert got.item() == pytest.approx(want, rel=1e-5) and want > 0
    # I = log of the normalised target on the support: zero divergence
    target = p.sum(1).masked_fill(~support, 0)
    target = target / target.sum(-1, keepdim=True)
    assert indexer_kl(p, target.clamp_min(1e-30).log(), support).item() == pytest.approx(0.0, abs=1e-6)


def test_sparse_stage_detaches_the_indexer_input_and_attends_to_the_top_k():
    """Sparse stage: the indexer's KL reaches the indexer weights but not x (the model learns from the LM loss
    only); warm-up: the KL does reach x. Each sparse query attends to min(top_k, t + 1) past tokens."""
    from kernels.dsa.module import DSA

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    for stage in ("sparse", "warmup"):
        torch.manual_seed(0)
        dsa = DSA(8, 2, 4, top_k=2, index_heads=2, index_dim=4, stage=stage).train()
        x = torch.randn(1, 6, 8, generator=g, requires_grad=True)
        out = dsa(x, q, k, v)
        dsa.indexer_loss.backward()
        assert dsa.index_q.weight.grad.abs().sum() > 0
        assert (x.grad is None) == (stage == "sparse"), stage
        assert out.shape == (1, 2, 6, 4)
    # the layer attends to each query's top_k past tokens: with v = the identity, out[t] is the attention row
    dsa = DSA(8, 2, 6, top_k=3, index_heads=2, index_dim=4, stage="sparse").eval()
    x, q, k = torch.randn(1, 6, 8, generator=g), torch.randn(1, 2, 6, 6, generator=g), torch.randn(1, 2, 6, 6, generator=g)
    rows = dsa(x, q, k, torch.eye(6).expand(1, 2, 6, 6))
    assert ((rows > 0).sum(-1) == torch.tensor([1, 2, 3, 3, 3, 3])).all() and (rows.triu(1) == 0).all()
    # the sparse support: each query's top-k past tokens by the indexer score, min(k, t + 1) of them
    from kernels.dsa import topk_mask

    scores = torch.tensor([[[1.0, -1, -1, -1], [0.5, 2.0, -1, -1], [3.0, 1.0, 2.0, -1], [0.0, 5.0, 4.0, 1.0]]])
    scores = scores.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    assert topk_mask(scores, 2)[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]]
    # ties (equal, or equal to bf16's precision: 1 + 2^-12) go to the latest tokens, wherever they sit in the row
    ties = torch.tensor([[[0.0, 2.0, 0.0, 1.0, 0.0, 1.0 + 2**-12, -1.0]]])
    assert topk_mask(ties, 4)[0, 0].int().tolist() == [0, 1, 0, 1, 1, 1, 0]


# ---- Muon ---------------------------------------------------------------------------------------------------

NS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic coefficients


def ns_scalar(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The Newton-Schulz polynomial on one singular value: x <- a x + b x^3 + c x^5."""
    a, b, c = NS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def test_newton_schulz_acts_on_each_singular_value_by_the_quintic():
    """For a (rectangular) diagonal g, the iteration maps each entry s to p^5(s / |g|_F), p(x) = a x + b x^3 + c x^5;
    the same for the tall orientation."""
    from pipelines.nn.muon import newton_schulz

    s = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    g = torch.zeros(4, 6, dtype=torch.float64)
    g[range(4), range(4)] = s
    expected = torch.zeros(4, 6, dtype=torch.float64)
    expected[range(4), range(4)] = ns_scalar(s / s.norm())
    assert torch.allclose(newton_schulz(g, dtype=torch.float64), expected, atol=1e-6)
    assert torch.allclose(newton_schulz(g.T.contiguous(), dtype=torch.float64), expected.T, atol=1e-6)


def test_muon_update_scale_is_sqrt_of_fan_out_over_fan_in():
    """orthogonalise_all scales by sqrt(max(1, fan_out / fan_in)): nn.Linear weights are [out, in], stacked expert
    weights (in_out=True) [in, out]."""
    from pipelines.nn.muon import orthogonalise_all

    tall = torch.zeros(16, 4)  # 4 equal singular values: each normalises to 1/2
    tall[range(4), range(4)] = 3.0
    unit = ns_scalar(torch.tensor(0.5)).item() * tall / 3.0
    linear_tall, linear_wide, experts = orthogonalise_all([(tall, {}), (tall.T.contiguous(), {}),
                                                            (tall.T.contiguous()[None], {"in_out": True})])
    assert torch.allclose(linear_tall, 2.0 * unit, atol=1e-5)  # out 16, in 4
    assert torch.allclose(linear_wide, unit.T, atol=1e-5)  # out 4, in 16: no boost
    assert torch.allclose(experts[0], 2.0 * unit.T, atol=1e-5)  # stored [in 4, out 16]


def test_muon_and_adamw_steps_by_hand():
    """Muon: Nesterov momentum (buf = mu buf + g; update g + mu buf), orthogonalised, decoupled weight decay.
    AdamW: bias-corrected moments, decoupled weight decay. Two steps of each against the formulas."""
    from pipelines.nn.muon import MuonAdamW

    lr, mu, wd, b1, b2, eps = 0.1, 0.9, 0.1, 0.9, 0.95, 1e-8
    w = torch.nn.Parameter(torch.tensor([[1.0, 0.5], [-0.5, 2.0]], dtype=torch.float64))
    v = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = MuonAdamW([{"params": [w], "use_muon": True, "momentum": mu, "weight_decay": wd},
                     {"params": [v], "weight_decay": wd}], lr=lr, betas=(b1, b2), eps=eps)
    opt.ns_dtype = torch.float64
    w_grads = [torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.2, 1.0], dtype=torch.float64)]
    v_grads = [torch.tensor([0.5, -3.0, 1e-3], dtype=torch.float64), torch.tensor([-1.0, 1.0, 2.0], dtype=torch.float64)]
    w_want, v_want = w.detach().clone(), v.detach().clone()
    buf, m, s = torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, (gw, gv) in enumerate(zip(w_grads, v_grads), start=1):
        w.grad, v.grad = torch.diag(gw), gv.clone()
        opt.step()
        buf = mu * buf + gw
        nesterov = gw + mu * buf
        w_want = w_want * (1 - lr * wd) - lr * torch.diag(ns_scalar(nesterov / nesterov.norm()))
        m, s = b1 * m + (1 - b1) * gv, b2 * s + (1 - b2) * gv**2
        v_want = v_want * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((s / (1 - b2**t)).sqrt() + eps)
        assert torch.allclose(w.detach(), w_want, atol=1e-6), t
        assert torch.allclose(v.detach(), v_want, atol=1e-9), t


def test_lm_optimizer_decays_matrices_and_the_embedding_only():
    """AdamW for the LM: Linear and expert matrices and the embedding are weight-decayed; norms, the router and
    other vectors are not. With Muon the matrices go to Muon and the embedding stays a decayed AdamW parameter."""
    from pipelines.lm.model import MoELM
    from pipelines.lm.trainer import LMStage, make_lm_optimizer
    from pipelines.train import TrainConfig

    m = MoELM(width=32, depth=2, heads=2, context=32, experts=4, expert_hidden=8, top_k=2, shared_experts=1)
    b = m.blocks[0]
    for optimizer in ("adamw", "muon"):
        opt = make_lm_optimizer(m, TrainConfig(weight_decay=0.1), LMStage(optimizer=optimizer))
        wd = {id(p): (g["weight_decay"], g.get("use_muon", False)) for g in opt.param_groups for p in g["params"]}
        assert wd[id(m.embed.weight)] == (0.1, False)
        assert wd[id(b.norm1.weight)] == (0.0, False) and wd[id(b.ffn.router.weight)] == (0.0, False)
        assert wd[id(b.ffn.w_in)] == (0.1, optimizer == "muon")


# ---- the shared training loop ----------------------------------------------------------------------------------


def test_cosine_decays_to_min_lr_and_a_short_stage_warms_up_over_its_length():
    """lr(s) = min + (lr - min) (1 + cos(pi p)) / 2 after the warm-up; a stage shorter than --warmup warms up over
    its own length."""
    from pipelines.train import TrainConfig, lr_at

    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.55)
    assert lr_at(cfg, 99) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    two = TrainConfig(steps=100, warmup=10, lr=1.0, restart_at=95)  # second stage: 5 steps
    assert [lr_at(two, s) for s in range(95, 100)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


@pytest.mark.parametrize("clip", [1.0, 3.0, 0.0])
def test_gradients_are_clipped_to_the_global_norm(tmp_path, clip):
    """With plain SGD at lr 1, one step moves the parameters by exactly the clipped gradient: c min(1, clip / |c|)
    for a gradient c of norm 10 (clip 0: no clipping); the logged grad_norm is the norm before clipping."""
    import json

    from pipelines.data import make_dataset
    from pipelines.maetok.trainer import TokenizerStage, TokenizerTask
    from pipelines.train import TrainConfig, train

    data = make_dataset("shapes", image_size=16)
    task = TokenizerTask(tiny_tok(), data, data, TokenizerStage(), 4, 0, "shapes", num_pictures=1)
    task.pictures = lambda *a: None
    c = torch.linspace(-1, 2, 48)
    c = c / c.norm() * 10
    task.loss = lambda net, model, *rest: ((model.to_pixels.bias * c).sum(), {})
    task.make_optimizer = lambda model, cfg: torch.optim.SGD(model.parameters(), lr=1.0)
    before = task.model.to_pixels.bias.detach().clone()
    train(task, TrainConfig(steps=1, warmup=0, lr=1.0, grad_clip=clip, ema=0, save_every=0, sample_every=0, log_every=1,
                            device="cpu"), tmp_path / "run", quiet=True)
    step = before - task.model.to_pixels.bias.detach()
    assert torch.allclose(step, c * (min(1.0, clip / 10) if clip else 1.0), rtol=1e-5)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged.get("grad_norm", 10.0) == pytest.approx(10.0, rel=1e-5)


def test_channel_latent_statistics_pool_every_token():
    """--latent-norm channel: mean and std per channel over all B x L latent tokens. Tokens with means (0, 3, -2)
    and stds (1, 5, 0.2) pool to mean 1/3 and variance mean(var) + var(means) = 26.04/3 + 38/9 per channel."""
    from pipelines.imm.trainer import latent_statistics

    class Tok:
        def encode(self, x):
            z = x.flatten(1)[:, :12].view(-1, 3, 4)
            return (z * torch.tensor([1.0, 5.0, 0.2])[:, None] + torch.tensor([0.0, 3.0, -2.0])[:, None],)

    class Data:
        def __len__(self):
            return 2**31 - 1

        def get_batch(self, idx):
            return torch.randn(len(idx), 3, 1, 4, 4, generator=torch.Generator().manual_seed(int(idx[0]))), None

    mean, std = latent_statistics(Tok(), Data(), 4096, "cpu", batch_size=1024)
    assert torch.allclose(torch.tensor(mean), torch.full((4,), 1 / 3), atol=0.1)
    assert torch.allclose(torch.tensor(std), torch.full((4,), math.sqrt(26.04 / 3 + 38 / 9)), rtol=0.03)


# ---- the classifier's training and held-out accuracy -----------------------------------------------------------


class _Clips:
    """Clips whose every frame is the constant (label + 1) / 10, label = index % 6."""
    name, image_size, frames = "clips", 8, 3

    def __len__(self):
        return 60

    def indices_for_step(self, step, batch_size, seed):
        return torch.arange(step * batch_size, (step + 1) * batch_size) % 60

    def get_batch(self, idx):
        y = torch.as_tensor(idx) % 6
        return ((y + 1) / 10).view(-1, 1, 1, 1, 1).expand(-1, 3, 3, 8, 8).contiguous(), y


class _Reader(torch.nn.Module):
    """A perfect 'classifier' for _Clips: reads each frame's value; records its inputs."""
    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.seen = []

    @staticmethod
    def frames(x):
        from pipelines.evaluation.classifier import ShapesClassifier

        return ShapesClassifier.frames(x)

    def forward(self, x):
        self.seen.append(x)
        f = self.frames(x)
        return 50.0 * F.one_hot((f[:, 0, 0, 0] * 10).round().long() - 1, 6).float()


def test_clip_labels_are_repeated_per_frame_in_training_and_evaluation():
    """Clips are scored frame by frame, clip-major: each clip's label repeats T times (not the batch tiled T times),
    so a perfect per-frame reader scores accuracy 1 and a loss near 0."""
    from pipelines.evaluation.classifier import ClassifierTask, evaluate_classifier

    reader = _Reader()
    task = ClassifierTask(reader, _Clips(), 12, 0, "clips")
    loss, logs = task.loss(reader, reader, 0, torch.Generator().manual_seed(0), 0, 1)
    assert logs["accuracy"] == 1.0 and loss.item() < 1e-6
    assert evaluate_classifier(reader, _Clips(), 20, "cpu") == {"accuracy": 1.0, "num": 20}


def test_classifier_augmentation_flips_rows_and_columns():
    """Each training picture is the original, or flipped left-right, up-down or both, about a quarter each."""
    from pipelines.evaluation.classifier import ClassifierTask

    class Data(_Clips):
        frames = 1

        def get_batch(self, idx):
            ramp = torch.arange(64.0).view(8, 8) / 64
            return ramp.expand(len(idx), 3, 1, 8, 8).contiguous(), torch.zeros(len(idx), dtype=torch.long)

    seen = []

    def recorder(x):
        seen.append(x)
        return torch.zeros(x.shape[0], 6)

    task = ClassifierTask(_Reader(), Data(), 400, 0, "ramp")
    task.loss(recorder, _Reader(), 0, torch.Generator().manual_seed(0), 0, 1)
    x = seen[-1][:, 0, 0]  # [400, 8, 8]
    ramp = torch.arange(64.0).view(8, 8) / 64
    kinds = [ramp, ramp.flip(-1), ramp.flip(-2), ramp.flip(-1).flip(-2)]
    which = torch.tensor([[torch.equal(img, k) for k in kinds].index(True) for img in x])
    counts = torch.bincount(which, minlength=4)
    assert (counts > 70).all(), counts


def test_eval_scores_clips_frame_by_frame_against_the_asked_class(cli, tmp_path, monkeypatch):
    """`sigma eval` on a clip model: every frame is scored against the class its clip was asked for (clip-major,
    as the classifier flattens frames). A generator that draws the asked class except once (clip 0, a circle,
    drawn as a square) and a perfect per-frame reader: accuracy 33/36, confusion rows = the asked class, and the
    per-class accuracy is the row's recall (circle 3/6), not the column's precision (square 6/9)."""
    import json

    import checkpoints.io
    import pipelines.imm.sampling
    import sigmacli.imm
    from pipelines.data import SHAPE_CLASSES

    net = SimpleNamespace(config=SimpleNamespace(image_size=8, frames=3, num_classes=6, class_names=list(SHAPE_CLASSES)))
    scheduler = SimpleNamespace(times=[0.9, 0.5], sampler="pushforward")
    monkeypatch.setattr(sigmacli.imm, "load_pipeline", lambda folder, dev: (net, scheduler, None, {"data_spec": "moving-shapes"}))
    monkeypatch.setattr(sigmacli.imm, "sampling_options", lambda *a, **k: (2, 1.0))

    def generate(net, scheduler, labels, *rest):  # clip i: every frame the constant (drawn class + 1) / 10
        drawn = labels.clone()
        drawn[0] = 1
        return ((drawn + 1) / 10).view(-1, 1, 1, 1, 1).expand(-1, 3, 3, 8, 8).contiguous()

    class Reader(_Reader):
        config = SimpleNamespace(class_names=list(SHAPE_CLASSES))

        def features(self, x):
            f = self.frames(x)
            return torch.stack([f.mean((1, 2, 3)), f.std((1, 2, 3)), f[:, 0, 0, 0]], 1)

    monkeypatch.setattr(pipelines.imm.sampling, "generate", generate)
    monkeypatch.setattr(checkpoints.io, "load_model", lambda *a, **k: Reader())
    r = cli("eval", "--model", tmp_path, "--classifier", tmp_path, "--num", "12", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["class_accuracy"] == pytest.approx(33 / 36)
    confusion = torch.eye(6, dtype=torch.long) * 6  # 2 clips x 3 frames per class ...
    confusion[0, :2] = torch.tensor([3, 3])  # ... but one circle clip came out a square
    assert out["confusion"] == confusion.tolist()
    assert out["per_class_accuracy"] == {name: (0.5 if name == "circle" else 1.0) for name in SHAPE_CLASSES}
    # --num below the number of classes: the classes never asked for have no accuracy, not 0 %
    out = json.loads(cli("eval", "--model", tmp_path, "--classifier", tmp_path, "--num", "4", "--device", "cpu",
                         "--json").stdout.strip().splitlines()[-1])
    assert [name for name, a in out["per_class_accuracy"].items() if a is None] == ["cross", "star"]
    assert "cross not sampled, star not sampled" in cli("eval", "--model", tmp_path, "--classifier", tmp_path,
                                                        "--num", "4", "--device", "cpu").stdout
    # a classifier of other classes: one line that says how to get a fitting one
    Reader.config = SimpleNamespace(class_names=["ant", "bee"])
    r = cli("eval", "--model", tmp_path, "--classifier", tmp_path, "--num", "4", "--device", "cpu")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sigma train-classifier --data moving-shapes --image-size 8" in r.stderr
    # a folder with a space in its name: the command in the hint can be pasted as it is
    folder = tmp_path / "my clips"
    monkeypatch.setattr(sigmacli.imm, "load_pipeline", lambda f, dev: (net, scheduler, None, {"data_spec": str(folder)}))
    import pipelines.data

    monkeypatch.setattr(pipelines.data, "make_dataset", lambda *a, **k: list(range(40)))  # (the check comes first)
    r = cli("eval", "--model", tmp_path, "--classifier", tmp_path, "--num", "4", "--device", "cpu")
    assert r.exit_code == 1 and f"sigma train-classifier --data '{folder}' --image-size 8" in r.stderr, r.stderr
    # a one-class model (a folder without class sub-folders): train-classifier refuses one class, so no such hint
    net.config.num_classes, net.config.class_names = 1, ["all"]
    r = cli("eval", "--model", tmp_path, "--classifier", tmp_path, "--num", "4", "--device", "cpu")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "a classifier needs at least 2" in r.stderr and "train-classifier" not in r.stderr, r.stderr


def test_features_are_the_global_average_pool_of_the_last_map():
    """features = the last block's map averaged over its positions; extract_features gives them per frame, float64,
    whatever the batch size."""
    from pipelines.evaluation.classifier import ShapesClassifier, extract_features

    model = ShapesClassifier(image_size=16, width=8, feature_dim=16).eval()
    x = torch.rand(3, 3, 2, 16, 16) * 2 - 1
    frames = x.transpose(1, 2).reshape(6, 3, 16, 16)  # clip-major
    with torch.no_grad():
        maps = model.feature_map(frames)  # [6, 16, 2, 2]
        want = maps.sum((2, 3)) / 4
        assert torch.allclose(model.features(frames), want, atol=1e-6)
    feats = extract_features(model, x, batch_size=4)
    assert feats.dtype == torch.float64 and torch.allclose(feats, want.double(), atol=1e-6)


def test_linear_probe_standardises_each_latent_coordinate():
    """The probe standardises every latent coordinate by its own training std, so a loud nuisance coordinate
    (std 1e4) neither drowns the quiet one that carries the class nor changes the result."""
    from pipelines.maetok.trainer import linear_probe

    class Data:
        num_classes = 2

        def __init__(self, offset, loud):
            self.offset, self.loud = offset, loud

        def __len__(self):
            return 10_000

        def get_batch(self, idx):
            g = torch.Generator().manual_seed(int(idx[0]) + len(idx) + self.offset)
            y = torch.randint(0, 2, (len(idx),), generator=g)
            z = torch.randn(len(idx), 8, generator=g)
            z[:, 6] = (y - 0.5) + 0.1 * z[:, 6]  # the class, in a quiet coordinate
            z[:, 7] *= self.loud
            return z.view(-1, 8, 1, 1, 1), y

    class Tok:
        def encode(self, x):
            return x.reshape(-1, 4, 2), None

    for loud in (1.0, 1e4):
        r = linear_probe(Tok(), Data(0, loud), Data(777, loud), 300, 200, "cpu")
        assert r["probe_accuracy"] > 0.95 and r["probe_train_accuracy"] > 0.95, loud
