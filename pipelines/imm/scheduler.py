"""IMMScheduler: diffusers' SchedulerMixin over the IMM schedule, for the pushforward, restart (IMM) and Euler
(flow-matching baseline) samplers. A step maps x_t to x_s from the network output G at (c_in x_t, t, s_net)."""
from __future__ import annotations

import operator
from dataclasses import fields

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from pipelines.imm.schedule import IMMSchedule

SAMPLERS = ("pushforward", "restart", "euler")
TIME_TOLERANCE = 5e-3  # how far a timestep given to step() may be from the schedule's (fp16/bf16 rounding of t)


def randn(shape: tuple, generator=None) -> torch.Tensor:
    """fp32 N(0, 1) drawn on the generator's device (the CPU for the CPU generators sampling uses, so a seed gives
    the same numbers on any device); None: torch's global generator; a list: sample i from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"a list of generators needs one per sample: {len(generator)} for {shape[0]} samples")
        return torch.stack([randn(tuple(shape[1:]), g) for g in generator])
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, not {type(generator).__name__}")
    return torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu")


class IMMScheduler(SchedulerMixin, ConfigMixin):
    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, schedule: str = "fm", parameterization: str = "euler_fm", sigma_d: float = 0.5, T: float = 0.994,
                 eps: float = 0.006, k: int = 12, weight_b: float = 4.0, weight_a: int = 2, time_sampler: str = "uniform",
                 p_mean: float = -1.1, p_std: float = 2.0, s_grid: int = 0, sampler: str = "pushforward",
                 midpoint: float | None = None, start_time: float | None = None):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
        self.schedule = IMMSchedule(**{f.name: getattr(self.config, f.name) for f in fields(IMMSchedule)})
        self.sampler = sampler
        self.times = self.timesteps = None
        self.num_inference_steps = None

    @classmethod
    def from_schedule(cls, schedule: IMMSchedule, sampler: str = "pushforward", start_time: float | None = None,
                      midpoint: float | None = None) -> "IMMScheduler":
        return cls(**schedule.to_dict(), sampler=sampler, start_time=start_time, midpoint=midpoint)

    @property
    def init_noise_sigma(self) -> float:
        """x_T ~ N(0, sigma_d^2 I) (the paper's start). From a start time t0 below T, the noise is scaled to the
        std of x_t0 itself, sigma_d sqrt(alpha_t0^2 + sigma_t0^2), and read as x_t0."""
        if self.config.start_time is None or self.config.start_time >= self.schedule.T:
            return self.schedule.sigma_d
        alpha, sigma = self.schedule.alpha_sigma(torch.tensor(float(self.config.start_time), dtype=torch.float64))
        return self.schedule.sigma_d * float((alpha ** 2 + sigma ** 2).sqrt())

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, sampler: str | None = None):
        """Times t_0 > ... > t_n = eps, uniform in t from t_0 = `start_time` (default T; two steps: through
        `midpoint` if configured and below the start). `sampler` is for these timesteps only; None: the config's."""
        try:
            num_inference_steps = operator.index(num_inference_steps)
        except TypeError:
            raise TypeError(f"num_inference_steps must be an int, not {num_inference_steps!r}") from None
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, not {num_inference_steps}")
        sampler = self.config.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
        self.sampler = sampler
        self.num_inference_steps = num_inference_steps
        start, midpoint = self.config.start_time, self.config.midpoint
        if start is not None and midpoint is not None and midpoint >= start:  # a start moved before the midpoint
            midpoint = None  # wins: uniform times from the start
        self.times = self.schedule.sampling_times(num_inference_steps, midpoint, start)
        self.timesteps = self.times[:-1].to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.schedule.c_in(torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device)) * sample

    def _index(self, timestep) -> int:
        if self.times is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step / network_s")
        gaps = (self.times[:-1] - float(timestep)).abs()
        i = int(gaps.argmin())
        if gaps[i] > TIME_TOLERANCE:  # e.g. a 0-1000 timestep: the nearest time would silently repeat a step
            raise ValueError(f"timestep {float(timestep):g} is not one of scheduler.timesteps {self.timesteps.tolist()}")
        return i

    def network_s(self, timestep) -> float:
        """The s the network is conditioned on at this step: the next time (IMM pushforward), eps (restart:
        jump to the end), or t itself (Euler: the instantaneous velocity)."""
        i = self._index(timestep)
        if self.sampler == "euler":
            return float(self.times[i])
        if self.sampler == "restart":
            return self.schedule.eps
        return float(self.times[i + 1])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        """x_{t_{i+1}} from x_{t_i} and G(c_in x, t_i, network_s(t_i)). Restart noise comes from the generator
        (`randn`: a list gives sample i's from generator i; None: torch's global one)."""
        i = self._index(timestep)
        t, s_next = self.times[i].item(), self.times[i + 1].item()
        B = sample.shape[0]
        full = lambda v: torch.full((B,), v, dtype=sample.dtype, device=sample.device)  # noqa: E731
        if self.sampler == "euler":  # x - (t - s) sigma_d G: the euler_fm map's slope at s = t, times the stride
            prev = sample - (t - s_next) * self.schedule.sigma_d * model_output
        else:
            s_net = self.network_s(timestep)
            prev = self.schedule.combine(sample, model_output, full(s_net), full(t))
            if self.sampler == "restart" and i + 1 < len(self.times) - 1:  # re-noise the clean estimate to t_{i+1}
                noise = self.schedule.sigma_d * randn(sample.shape, generator)
                prev = self.schedule.add_noise(prev, noise.to(prev), full(s_next))
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
