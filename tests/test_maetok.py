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
