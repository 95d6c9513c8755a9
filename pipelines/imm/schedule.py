"""The IMM interpolant, time schedules, parameterisations and weights (Zhou, Ermon, Song 2025, arXiv 2503.07565).

All functions take float tensors of times t, s in [eps, T] and broadcast. The notation follows the paper:
x_t = alpha_t x + sigma_t eps with eps ~ N(0, sigma_d^2 I); eta_t = sigma_t / alpha_t; lambda_t = 2 log(alpha_t / sigma_t).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SCHEDULES = ("fm", "cosine")
PARAMETERIZATIONS = ("euler_fm", "simple_edm")
TIME_SAMPLERS = ("uniform", "lognormal")


@dataclass
class IMMSchedule:
    schedule: str = "fm"  # "fm": alpha = 1 - t, sigma = t (OT flow matching) | "cosine"
    parameterization: str = "euler_fm"  # f = x_t - (t - s) sigma_d G  |  "simple_edm"
    sigma_d: float = 0.5  # data (and noise) std
    T: float = 0.994  # largest time: sampling starts here
    eps: float = 0.006  # smallest time: sampling ends here
    k: int = 12  # r's decrement in eta is (eta_max - eta_min) / 2^k
    weight_b: float = 4.0  # w(s,t) = 1/2 sigmoid(b - lambda_t) (-dlambda/dt) alpha_t^a / (alpha_t^2 + sigma_t^2)
    weight_a: int = 2
    time_sampler: str = "uniform"  # t ~ U(eps, T) | "lognormal": log eta_t ~ N(p_mean, p_std) truncated; s ~ U(eps, t)
    p_mean: float = -1.1
    p_std: float = 2.0
    s_grid: int = 0  # 0: s ~ U(eps, t). N > 0: s is one of the N-step sampling grid's times at or below t, each
    # equally likely (as multistep consistency models fix s to segment ends): training covers only the jumps
    # that 1-, 2-, ..., N-step sampling on nested uniform grids makes (N = 2: s in {eps, 0.5})

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, not {self.parameterization!r}")
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time sampler must be one of {TIME_SAMPLERS}, not {self.time_sampler!r}")
        if not 0 <= self.eps < self.T < 1:
            raise ValueError(f"need 0 <= eps < T < 1, got eps={self.eps}, T={self.T}")
        if self.s_grid < 0:
            raise ValueError(f"s_grid must be >= 0, not {self.s_grid}")
        if self.weight_a not in (1, 2):
            raise ValueError(f"weight_a (the a of w(s,t)'s alpha_t^a) must be 1 or 2, not {self.weight_a}")
        if not 1 <= self.k <= 30:
            raise ValueError(f"k (r's decrement is (eta_max - eta_min) / 2^k) must be in 1..30, not {self.k}")

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- interpolant ------------------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.schedule == "fm":
            return 1 - t, t
        return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)

    def eta(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_of_eta(self, eta: torch.Tensor) -> torch.Tensor:
        if self.schedule == "fm":
            return eta / (1 + eta)
        return torch.atan(eta) * (2 / math.pi)

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return 2 * torch.log(alpha / sigma)

    def dlambda_dt(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "fm":
            return -2 / (t * (1 - t))
        half = 0.5 * math.pi * t
        return -math.pi / (torch.sin(half) * torch.cos(half))

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x + sigma_t noise; noise already has std sigma_d. t: [B] (broadcast over x's other axes)."""
        alpha, sigma = self.alpha_sigma(_expand(t, x))
        return alpha * x + sigma * noise

    # ---- parameterisation f(x_t; t -> s) = c_skip x_t + c_out G(c_in x_t, c_noise(t), c_noise(s)) -------------
    def c_in(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return 1 / (self.sigma_d * torch.sqrt(alpha**2 + sigma**2))

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        return 1000 * t

    def c_skip_out(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.parameterization == "euler_fm":
            return torch.ones_like(t), -(t - s) * self.sigma_d
        a_t, s_t = self.alpha_sigma(t)
        a_s, s_s = self.alpha_sigma(s)
        norm = a_t**2 + s_t**2
        c_skip = (a_t * a_s + s_t * s_s) / norm
        c_out = -self.sigma_d * (a_s * s_t - a_t * s_s) / torch.sqrt(norm)
        return c_skip, c_out

    def combine(self, x_t: torch.Tensor, G: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x_t; t -> s) from the network output G."""
        c_skip, c_out = self.c_skip_out(_expand(s, x_t), _expand(t, x_t))
        return c_skip * x_t + c_out * G

    def kernel_weight(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """w~(s, t) = 1 / |c_out(s, t)|: the Laplace kernel's bandwidth, one for all three MMD terms."""
        return 1 / self.c_skip_out(s, t)[1].abs().clamp_min(1e-8)

    # ---- training times --------------------------------------------------------------------------------
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(s, t) = 1/2 sigmoid(b - lambda_t) (-dlambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2) (eq. 13)."""
        t = t.clamp(1e-6, 1 - 1e-6)
        alpha, sigma = self.alpha_sigma(t)
        return 0.5 * torch.sigmoid(self.weight_b - self.lambda_(t)) * (-self.dlambda_dt(t)) * alpha**self.weight_a / (alpha**2 + sigma**2)

    def r_of(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """r(s, t): one constant decrement in eta, eta_r = clamp(eta_t - (eta_max - eta_min) / 2^k), then r >= s."""
        eta_min, eta_max = self.eta(torch.tensor(self.eps, dtype=torch.float64)), self.eta(torch.tensor(self.T, dtype=torch.float64))
        step = ((eta_max - eta_min) / 2**self.k).item()
        eta_r = (self.eta(t) - step).clamp(eta_min.item(), eta_max.item())
        return torch.maximum(self.t_of_eta(eta_r), s)

    def sample_times(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, r, t) for n groups, float32 [n] each, eps <= s <= r <= t <= T."""
        if self.time_sampler == "uniform":
            t = self.eps + (self.T - self.eps) * torch.rand(n, generator=generator, dtype=torch.float64)
        else:  # log eta ~ N(p_mean, p_std), truncated to [eta(eps), eta(T)] by inverse-CDF sampling
            lo, hi = (torch.log(self.eta(torch.tensor(v, dtype=torch.float64).clamp_min(1e-12))) for v in (self.eps, self.T))
            normal = torch.distributions.Normal(torch.tensor(self.p_mean, dtype=torch.float64), self.p_std)
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            cdf_lo, cdf_hi = normal.cdf(lo), normal.cdf(hi)
            log_eta = normal.icdf((cdf_lo + u * (cdf_hi - cdf_lo)).clamp(1e-12, 1 - 1e-12))
            t = self.t_of_eta(log_eta.exp()).clamp(self.eps, self.T)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.s_grid:
            grid = self.sampling_times(self.s_grid)[1:].double()  # [N] descending to eps
            count = (grid[None, :] <= t[:, None]).sum(1)  # the points at or below t: the last `count` (>= 1: eps <= t)
            s = grid[len(grid) - count + (u * count).long().clamp(max=count - 1)]
        else:
            s = self.eps + (t - self.eps) * u
        r = self.r_of(s, t)
        return s.float(), r.float(), t.float()

    # ---- sampling ---------------------------------------------------------------------------------------
    def sampling_times(self, steps: int, midpoint: float | None = None, start: float | None = None) -> torch.Tensor:
        """[steps + 1] times from `start` (default T) down to eps, uniform in t (or start, midpoint, eps for two
        steps). From a start below T the sampler reads its noise as x_start (IMMScheduler). Why not always T: near
        T the loss weight w(s,t) falls like alpha_t and eta's fixed decrement makes the induction chain very fine,
        so the network is least trained exactly where sampling begins (a long shapes run lost its jumps there)."""
        if steps < 1:
            raise ValueError("steps must be at least 1")
        start = self.T if start is None else start
        if not self.eps < start <= self.T:
            raise ValueError(f"start-time must lie in (eps {self.eps}, T {self.T}], not {start}")
        if midpoint is not None and steps == 2:
            if not self.eps < midpoint < start:
                raise ValueError(f"midpoint must lie between eps {self.eps} and the start {start}, not {midpoint}")
            return torch.tensor([start, midpoint, self.eps])
        return torch.linspace(start, self.eps, steps + 1)


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] (or scalar) -> [B, 1, ..., 1] matching x's rank, in x's dtype."""
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0:
        return t.to(x.dtype)
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
