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
