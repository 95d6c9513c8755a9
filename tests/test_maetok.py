"""MAETok model: masking discards patches, shapes, loss, stages."""
import pytest
import torch

from pipelines.maetok.model import MAETok, maetok_loss


def tiny(**kw):
    return MAETok(**{**dict(image_size=16, patch_size=4, width=32, enc_depth=1, dec_depth=1, heads=2,
                            num_latents=8, latent_dim=4), **kw})


def test_encoder_sees_only_visible_patches_plus_latents():
    model = tiny()
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x = torch.rand(3, 3, 1, 16, 16) * 2 - 1
    keep = model.random_keep(3, ratio=0.5)
    assert keep.shape == (3, 8)  # 16 patches, half visible
    model(x, keep)
    assert seen[-1] == (3, 8 + 8, 32)  # visible patches + latent tokens, masked ones are gone
    model(x)
    assert seen[-1] == (3, 16 + 8, 32)  # no masking at evaluation


def test_masked_patches_do_not_influence_latents():
    model = tiny().eval()
    with torch.no_grad():  # the zero-initialised residual branches would make every input look the same
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    keep = torch.tensor([[0, 3, 5, 9, 12]])
    z1 = model.encode(x, keep)[0]
    y = x.clone()
    y[..., 4:8, 4:8] = 0.7  # patch (1, 1) = index 5 is visible: changes z
    z2 = model.encode(y, keep)[0]
    w = x.clone()
    w[..., 4:8, 8:12] = 0.7  # patch (1, 2) = index 6 is masked: must not change z
    z3 = model.encode(w, keep)[0]
    assert not torch.allclose(z1, z2)
    torch.testing.assert_close(z1, z3)


def test_mask_ratio_distribution():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor([model.sample_mask_ratio(g) for _ in range(2000)])
    assert ratios.min() >= 0.4 and ratios.max() <= 0.6
    # truncated normal with its mode at the upper end: more mass near 0.6 than near 0.4
    assert (ratios > 0.55).sum() > (ratios < 0.45).sum()


def test_shapes_video_and_vae():
    model = tiny(frames=4, tubelet=2, bottleneck="vae")
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    out = model(x, model.random_keep(2, 0.5), with_hog=True)
    assert out.recon.shape == x.shape
    assert out.z.shape == (2, 8, 4)
    assert out.hog_pred.shape == (2, 2 * 16, 2 * 3 * 4 * 9)
    assert out.kl is not None and out.kl.item() >= 0


def test_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        tiny(image_size=18)
    with pytest.raises(ValueError, match="tubelet"):
        tiny(frames=3, tubelet=2)


def test_loss_falls_and_decoder_finetune_freezes_encoder():
    from pipelines.data import make_dataset

    model = tiny()
    x, _ = make_dataset("shapes", image_size=16).get_batch(torch.arange(8))
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for step in range(40):
        g = torch.Generator().manual_seed(step)
        keep = model.random_keep(8, model.sample_mask_ratio(g), g)
        loss, logs = maetok_loss(model, model, x, keep, g, hog_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["mse"])
    assert losses[-1] < 0.5 * losses[0]
    # fine-tuning stage: no masking, only pixel loss; the encoder gets no gradient
    for p in model.encoder_parameters():
        p.requires_grad_(False)
    opt.zero_grad(set_to_none=True)
    loss, logs = maetok_loss(model, model, x, None)
    loss.backward()
    assert "hog" not in logs and "mask" not in logs
    assert all(p.grad is None for p in model.encoder_parameters())
    assert model.to_pixels.weight.grad is not None and model.to_pixels.weight.grad.abs().sum() > 0


def test_feature_loss_reads_only_masked_patches_and_trains_the_feature_decoder():
    model = tiny(feature_dim=8)
    x = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    keep = model.random_keep(2, 0.5, g)
    targets = torch.randn(2, 16, 8)
    loss, logs = maetok_loss(model, model, x, keep, torch.Generator().manual_seed(1), feature_targets=targets)
    assert 0 < logs["feature"] <= 2
    loss.backward()
    assert model.to_feature.weight.grad.abs().sum() > 0 and model.feature_pos.grad.abs().sum() > 0
    # the targets of visible patches do not enter the loss
    changed = targets.clone()
    changed.scatter_(1, keep[..., None].expand(-1, -1, 8), 5.0)
    _, logs2 = maetok_loss(model, model, x, keep, torch.Generator().manual_seed(1), feature_targets=changed)
    assert logs2["feature"] == pytest.approx(logs["feature"], abs=1e-6)
    # no feature decoder unless asked for: old tokenizer configs build the same modules as before
    assert not any("feature" in name for name, _ in tiny().named_parameters())


def test_teacher_targets_follow_patchify_order_and_average_tubelets():
    from pipelines.evaluation.classifier import ShapesClassifier
    from pipelines.maetok.teacher import FeatureTeacher

    teacher = FeatureTeacher.__new__(FeatureTeacher)
    teacher.net, teacher.dim = ShapesClassifier(image_size=16, width=8, feature_dim=8).eval(), 8
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1  # 4 frames, tubelet 2 -> grid (2, 4, 4)
    out = teacher.targets(x, (2, 4, 4), tubelet=2)
    assert out.shape == (2, 2 * 4 * 4, 8)
    maps = torch.nn.functional.interpolate(teacher.net.feature_map(x[1:2, :, 2:4]), size=(4, 4), mode="bilinear")
    t, h, w = 1, 2, 3  # clip 1, second tubelet (frames 2 and 3), patch row 2, column 3
    assert torch.allclose(out[1, t * 16 + h * 4 + w], maps[:, :, h, w].mean(0), atol=1e-6)


def test_teacher_runs_on_the_pixels_device():
    """The tokenizer task loads its feature teacher before train() moves the model to the GPU: the teacher follows
    the batch instead of computing every step's targets on the CPU (the meta device stands in for CUDA)."""
    from pipelines.evaluation.classifier import ShapesClassifier
    from pipelines.maetok.teacher import FeatureTeacher

    teacher = FeatureTeacher.__new__(FeatureTeacher)
    teacher.net, teacher.dim = ShapesClassifier(image_size=16, width=8, feature_dim=8).eval(), 8
    meta = torch.device("meta")
    out = teacher.targets(torch.empty(2, 3, 4, 16, 16, device=meta), (2, 4, 4), tubelet=2)
    assert out.device == meta and out.shape == (2, 2 * 4 * 4, 8)
    assert teacher.net.head.weight.device == meta


def test_linear_probe_finds_a_linear_class_code_and_not_noise():
    from pipelines.data import make_dataset
    from pipelines.maetok.trainer import linear_probe

    train, heldout = (make_dataset("shapes", image_size=16, split=s) for s in ("train", "heldout"))

    x_tr, y_tr = train.get_batch(torch.arange(300))
    x_te, y_te = heldout.get_batch(torch.arange(200))
    label_of = {img.numpy().tobytes(): int(y) for x, ys in ((x_tr, y_tr), (x_te, y_te)) for img, y in zip(x, ys)}

    class Encoder:  # latents = a fixed random linear image of the one-hot class, plus noise (or noise alone)
        def __init__(self, signal):
            self.signal, self.mix = signal, torch.randn(6, 32, generator=torch.Generator().manual_seed(0))

        def encode(self, x):
            y = torch.tensor([label_of[img.numpy().tobytes()] for img in x])
            z = self.signal * torch.nn.functional.one_hot(y, 6).float() @ self.mix
            return (z + torch.randn(z.shape, generator=torch.Generator().manual_seed(len(y)))).view(-1, 8, 4), None

    strong = linear_probe(Encoder(3.0), train, heldout, 300, 200, "cpu")
    noise = linear_probe(Encoder(0.0), train, heldout, 300, 200, "cpu")
    assert strong["probe_accuracy"] > 0.95 and noise["probe_accuracy"] < 0.4
    assert strong["num_classes"] == 6 and strong["probe_num_train"] == 300


def test_latent_noise_scales_with_each_latents_batch_std_and_passes_gradients_unchanged():
    from pipelines.maetok.model import add_latent_noise

    scale = torch.tensor([0.1, 1.0, 10.0])
    z = (torch.randn(4096, 2, 3) * scale).requires_grad_(True)
    out = add_latent_noise(z, 1.0, torch.Generator().manual_seed(0))
    noise = (out - z).detach()
    # tau ~ U(0, 1) per sample, so the noise's std is E[tau^2]^0.5 = 3^-0.5 of each coordinate's own std
    ratio = noise.std(0) / z.detach().std(0)
    assert torch.allclose(ratio, torch.full_like(ratio, 3 ** -0.5), rtol=0.05)
    # one tau per sample: the noise-to-std ratio of a sample's coordinates share their magnitude scale
    per_sample = (noise / z.detach().std(0)).flatten(1).std(1)
    assert per_sample.max() > 0.9 and per_sample.min() < 0.1
    # the std is detached: d out / d z is the identity, the encoder cannot shrink the noise by its scale
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    # deterministic per generator; a batch of one is left alone (no std to measure)
    again = add_latent_noise(z.detach(), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(again, out.detach())
    assert torch.equal(add_latent_noise(z[:1].detach(), 1.0), z[:1].detach())


def test_latent_noise_enters_pretraining_only():
    model = tiny()
    x = torch.rand(4, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        for p in model.parameters():  # a decoder that reads its latents (to_pixels starts at zero)
            p.normal_(0, 0.3)
    keep = model.random_keep(4, 0.5, torch.Generator().manual_seed(0))

    def mse(noise, keep):
        return maetok_loss(model, model, x, keep, torch.Generator().manual_seed(1), latent_noise=noise)[1]["mse"]

    assert mse(1.0, keep) != pytest.approx(mse(0.0, keep), rel=1e-4)
    assert mse(1.0, None) == mse(0.0, None)  # decoder fine-tuning reads clean latents


def test_spectrum_probe_finds_a_class_kept_in_a_low_variance_direction():
    from pipelines.maetok.trainer import spectrum_probe

    class Data:  # latents of 8 numbers: 6 loud nuisances (std 10) and a quiet class sign (+-0.5) in coordinate 6
        def __len__(self):
            return 10_000

        def get_batch(self, idx):
            g = torch.Generator().manual_seed(int(idx[0]) + len(idx))
            y = torch.randint(0, 2, (len(idx),), generator=g)
            z = torch.cat([10 * torch.randn(len(idx), 6, generator=g), (y[:, None] - 0.5), torch.zeros(len(idx), 1)], 1)
            return z.view(-1, 8, 1, 1, 1), y

    class Tok:  # the identity between "images" [B, 8, 1, 1, 1] and latents [B, 4, 2]
        def encode(self, x):
            return x.reshape(-1, 4, 2), None

        def decode(self, z):
            return z.reshape(-1, 8, 1, 1, 1)

    class Classifier(torch.nn.Module):  # reads the sign of coordinate 6
        device = torch.device("cpu")

        @staticmethod
        def frames(x):
            return x.transpose(1, 2).flatten(0, 1)

        def forward(self, x):
            c = x[:, 6, 0, 0]
            return torch.stack([-c, c], dim=1)

    result = spectrum_probe(Tok(), Classifier(), Data(), Data(), 2000, 500, "cpu", dims=(4, 7))
    assert result["spectrum_all"] == 1.0 and result["spectrum_7"] > 0.95
    assert result["spectrum_4"] < 0.7  # the top 4 directions are nuisance: the class is lost
    # a classifier of the same two classes numbered the other way round: class_order's map puts it right
    unmapped = spectrum_probe(Tok(), Classifier(), Data(), Data(), 2000, 500, "cpu", dims=(7,), to_data=torch.tensor([0, 1]))
    swapped = spectrum_probe(Tok(), Classifier(), Data(), Data(), 2000, 500, "cpu", dims=(7,), to_data=torch.tensor([1, 0]))
    assert unmapped["spectrum_all"] == 1.0 and swapped["spectrum_all"] == 0.0


def test_compiled_training_pass_runs_the_masked_encoder_eager():
    """Under torch.compile (--compile) the masked encoder pass runs eager: its length changes with each batch's mask
    ratio, and compiled for symbolic lengths the tokenizer trained slower than eager (BENCHMARKS.md). The decoders,
    whose lengths are fixed, compile; so does the unmasked encoder (train-imm's frozen one)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny()
    traced = {"encoder": [], "decoder": []}
    for name in traced:
        getattr(model, name).register_forward_pre_hook(lambda m, a, name=name: traced[name].append(torch.compiler.is_compiling()))
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    keep = model.random_keep(2, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(compiled(x, keep).recon, model(x, keep).recon, atol=1e-6)
    assert traced == {"encoder": [False, False], "decoder": [True, False]}  # (the second pass of each: eager `model`)
    compiled(x).recon.square().mean().backward()
    assert traced["encoder"][-1] and traced["decoder"][-1]
    torch._dynamo.reset()
