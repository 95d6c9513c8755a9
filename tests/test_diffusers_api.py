"""IMMPipeline and IMMScheduler used the way diffusers users use pipelines and schedulers: half precision,
hand-written loops, generators, input checks, output types. Tiny models, a few seconds in all."""
import numpy as np
import pytest
import torch

from pipelines.imm.pipeline import IMMPipeline
from pipelines.imm.sampling import decode_tokens
from pipelines.imm.scheduler import IMMScheduler
from pipelines.maetok.model import MAETok
from tests.test_imm import tiny_dit


def tiny_pipe(sampler="pushforward"):
    torch.manual_seed(0)
    return IMMPipeline(tiny_dit().eval(), IMMScheduler(sampler=sampler, midpoint=0.6), None, default_steps=2)


def seed(s=0):
    return torch.Generator().manual_seed(s)


def test_half_precision_latent_pipeline_samples(tmp_path):
    """pipe.to(fp16 / bf16) and from_pretrained(dtype=...) sample (the time embedding was fp32 for a half model,
    the latent statistics fp32 for a half tokenizer), close to fp32; the folder holds safetensors only."""
    torch.manual_seed(0)
    tok = MAETok(image_size=16, patch_size=4, width=32, enc_depth=1, dec_depth=1, heads=2, num_latents=8, latent_dim=4).eval()
    IMMPipeline(tiny_dit("latent").eval(), IMMScheduler(), tok).save_pretrained(tmp_path / "pipe")
    assert sorted(p.suffix for p in (tmp_path / "pipe").rglob("*.*")) == [".json"] * 4 + [".safetensors"] * 2
    load = lambda **kw: IMMPipeline.from_pretrained(tmp_path / "pipe", low_cpu_mem_usage=False, **kw)  # noqa: E731
    ref = load()(class_labels=[0, 2], output_type="pt", generator=seed()).images
    for pipe in (load().to(torch.float16), load(dtype=torch.bfloat16)):
        out = pipe(class_labels=[0, 2], output_type="pt", generator=seed()).images
        assert out.dtype == torch.float32 and (out - ref).abs().mean() < 0.05


def test_half_precision_pca_latents_decode():
    """A half-precision model with latent_pca (its basis a weight, halved by .to) maps tokens back to fp32 latents."""
    torch.manual_seed(0)
    model = tiny_dit("latent", num_tokens=2, token_dim=2, latent_mean=[0.1] * 8, latent_std=[2.0] * 4, latent_pca=4,
                     latent_shape=(4, 2))
    model.set_latent_basis(torch.linalg.qr(torch.randn(8, 4))[0].T)
    tokens = torch.randn(3, 2, 2)
    ref = model.latents_from_tokens(tokens)
    half = model.to(torch.float16).latents_from_tokens(tokens.half())
    assert half.shape == (3, 4, 2) and half.dtype == torch.float32
    torch.testing.assert_close(half, ref, atol=0.02, rtol=0.01)


def test_hand_written_loop_reproduces_the_pipeline():
    """set_timesteps / timesteps / init_noise_sigma / scale_model_input / step(...).prev_sample, with the network's
    second time from network_s, give the pipeline's tokens for the same noise."""
    pipe = tiny_pipe()
    model, sched = pipe.transformer, pipe.scheduler
    expected = pipe(class_labels=[0, 1], guidance_scale=1.0, output_type="latent", generator=seed(3)).images
    sched.set_timesteps(2)
    x = sched.init_noise_sigma * torch.randn(2, *model.token_shape, generator=seed(3))
    labels = torch.tensor([0, 1])
    for t in sched.timesteps:
        G = model(sched.scale_model_input(x, t), t.expand(2), torch.full((2,), sched.network_s(t)), labels)
        x = sched.step(G, t, x).prev_sample
    torch.testing.assert_close(x, expected)
    assert torch.equal(decode_tokens(model, x), pipe(class_labels=[0, 1], guidance_scale=1.0, output_type="pt",
                                                     generator=seed(3)).images)


def test_step_refuses_timesteps_off_the_schedule_and_before_set_timesteps():
    sched = IMMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 2, 2), 0.994, torch.zeros(1, 2, 2))
    sched.set_timesteps(2)
    x = torch.zeros(1, 2, 2)
    sched.step(x, sched.timesteps[0].to(torch.bfloat16), x)  # a half-precision copy of a time is still that time
    for t in (999, 0.3):  # a 0-1000 timestep, a time between two: the nearest time would repeat a step silently
        with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
            sched.step(x, t, x)
    for steps, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match="num_inference_steps"):
            sched.set_timesteps(steps)


def test_sampler_argument_is_for_that_call_only():
    pipe = tiny_pipe()
    kw = dict(class_labels=[0, 1], output_type="pt")
    before = pipe(**kw, generator=seed()).images
    pipe(**kw, sampler="restart", generator=seed())
    assert torch.equal(pipe(**kw, generator=seed()).images, before) and pipe.scheduler.config.sampler == "pushforward"


def test_generators_none_uses_torch_rng_and_a_list_gives_each_image_its_own():
    pipe = tiny_pipe("restart")  # noise at the start and in the step
    kw = dict(class_labels=[0, 1], output_type="latent")
    torch.manual_seed(1)
    a, b = pipe(**kw).images, pipe(**kw).images
    torch.manual_seed(1)
    assert not torch.equal(a, b) and torch.equal(pipe(**kw).images, a)  # diffusers: no generator = torch's RNG
    both = pipe(**kw, generator=[seed(5), seed(6)]).images
    for i, s in enumerate((5, 6)):
        one = pipe(class_labels=[i], output_type="latent", generator=seed(s)).images
        torch.testing.assert_close(both[i:i + 1], one, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one per sample"):
        pipe(**kw, generator=[seed(5)])
    with pytest.raises(TypeError, match="generator must be"):
        pipe(**kw, generator=0)


def test_call_arguments_are_checked_in_one_line():
    pipe = tiny_pipe()  # 3 classes; label 3 is the null class
    assert pipe(class_labels=np.array([0, 3]), output_type="pt").images.shape[0] == 2
    assert pipe(num_images=3, output_type="pt").images.shape[0] == 3
    bad = [(dict(class_labels=[4]), ValueError, "must lie in"), (dict(class_labels=[-1]), ValueError, "must lie in"),
           (dict(class_labels=[1.7]), TypeError, "integers"), (dict(class_labels=[True, False]), TypeError, "integers"), (dict(class_labels=["circle"]), ValueError, "unknown class label 'circle'"),
           (dict(class_labels=[[0, 1]]), ValueError, "1-D"),
           (dict(class_labels=[0], num_images=3), ValueError, "num_images 3 does not match"),
           (dict(num_images=-1), ValueError, "num_images"), (dict(num_images=True), ValueError, "num_images"), (dict(guidance_scale=float("nan")), ValueError, "finite"),
           (dict(output_type="latents"), ValueError, "output_type"), (dict(num_inference_steps=0), ValueError, "at least 1")]
    for kw, error, match in bad:
        with pytest.raises(error, match=match):
            pipe(**kw)


def test_latent_output_type_returns_the_undecoded_tokens():
    pipe = tiny_pipe()
    tokens = pipe(class_labels=[0, 2], output_type="latent", generator=seed()).images
    assert tokens.shape == (2, *pipe.transformer.token_shape)
    pixels = pipe(class_labels=[0, 2], output_type="pt", return_dict=False, generator=seed())[0]
    assert torch.equal(decode_tokens(pipe.transformer, tokens), pixels)


def test_class_labels_by_name_as_sigma_sample_takes_them():
    torch.manual_seed(0)
    pipe = IMMPipeline(tiny_dit(class_names=["circle", "square", "star"]).eval(), IMMScheduler(), None)
    draw = lambda labels: pipe(class_labels=labels, output_type="latent", generator=seed()).images  # noqa: E731
    assert torch.equal(draw(["star", "circle"]), draw([2, 0])) and torch.equal(draw("square"), draw([1]))
    with pytest.raises(ValueError, match="unknown class label 'ring'; this model knows: circle, square, star"):
        pipe(class_labels=["ring"])
