"""IMM written out by hand, in float64, against the code: the objective of Alg. 1, the parameterisations, and
each sampler's steps. The network is a small analytic function of all its inputs (the input scale, both times,
the label), so a wrong coefficient, a wrong time or a wrong label anywhere changes a number these tests check."""
import math

import pytest
import torch
from torch import nn

from pipelines.imm.objective import draw_global, flow_matching_loss, imm_loss
from pipelines.imm.sampling import sample_tokens
from pipelines.imm.schedule import IMMSchedule
from pipelines.imm.scheduler import IMMScheduler

SIGMA_D, T, EPS = 0.5, 0.994, 0.006


class AnalyticNet(nn.Module):
    """G(x_in, t, s, label) = tanh(w x_in) + 0.3 t - 0.7 s + 0.05 label: nonlinear in x_in (so c_in matters)."""
    null_class = 3
    token_shape = (3, 2)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, x_in, t, s, labels):
        view = lambda v: v.to(x_in.dtype).view(-1, 1, 1)  # noqa: E731
        return torch.tanh(self.w * x_in) + 0.3 * view(t) - 0.7 * view(s) + 0.05 * view(labels)


def c_in(t):  # 1 / (sigma_d sqrt(alpha^2 + sigma^2)), fm schedule
    return 1 / (SIGMA_D * math.sqrt((1 - t) ** 2 + t**2))


def euler_fm(net, x_t, t, s, label):  # f(x_t; t -> s) = x_t - (t - s) sigma_d G(c_in x_t, t, s)
    G = net(c_in(t) * x_t[None], torch.tensor([t]), torch.tensor([s]), torch.tensor([label]))[0]
    return x_t - (t - s) * SIGMA_D * G


def weight(t, a=2, b=4.0):  # eq. 13 for the fm schedule
    alpha, sigma = 1 - t, t
    lam = 2 * math.log(alpha / sigma)
    return 0.5 / (1 + math.exp(-(b - lam))) * (2 / (t * (1 - t))) * alpha**a / (alpha**2 + sigma**2)


def test_imm_loss_is_algorithm_1_written_out():
    """Groups of M = 4 sharing (s, r, t); x_t and x_r from the same x and noise; dropped groups read the null class;
    y_r from the same weights without gradient; a Laplace kernel with w~ = 1 / ((t - s) sigma_d) over all N c
    elements; the V-statistic MMD; w(s, t); a mean over groups. Value and gradient."""
    torch.manual_seed(0)
    sched, net, M = IMMSchedule(), AnalyticNet(), 4
    x = (0.5 * torch.randn(12, 3, 2)).double()
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    draws = draw_global(sched, 12, M, (3, 2), 0.5, torch.Generator().manual_seed(5))
    draws["drop"] = torch.tensor([False, True, False])  # one group unconditional, whatever the draw said
    loss, _ = imm_loss(net, net, sched, x, labels, draws, M)
    (grad,) = torch.autograd.grad(loss, net.w)

    total = 0.0
    for g in range(3):
        s, r, t = (draws[k][g].item() for k in ("s", "r", "t"))
        label = AnalyticNet.null_class if draws["drop"][g] else labels[M * g].item()
        y_t, y_r = [], []
        for i in range(M * g, M * g + M):
            noise = draws["noise"][i].double()
            y_t.append(euler_fm(net, (1 - t) * x[i] + t * noise, t, s, label))
            with torch.no_grad():
                y_r.append(euler_fm(net, (1 - r) * x[i] + r * noise, r, s, label))
        bandwidth, D = 1 / ((t - s) * SIGMA_D), 3 * 2

        def k(a, b):
            return torch.exp(-bandwidth * (a - b).norm() / D)

        mean_k = lambda A, B: sum(k(a, b) for a in A for b in B) / M**2  # noqa: E731
        total = total + weight(t) * (mean_k(y_t, y_t) + mean_k(y_r, y_r) - 2 * mean_k(y_t, y_r))
    want = total / 3
    (want_grad,) = torch.autograd.grad(want, net.w)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert grad.item() == pytest.approx(want_grad.item(), rel=1e-4)  # no gradient through the target


def test_flow_matching_loss_regresses_the_ot_velocity():
    """(sigma_d G(c_in x_t, t, t) - (eps - x))^2 per element, over sigma_d^2; the null class where dropped."""
    torch.manual_seed(0)
    sched, net = IMMSchedule(), AnalyticNet()
    x = (0.5 * torch.randn(4, 3, 2)).double()
    labels = torch.tensor([0, 1, 2, 1])
    draws = draw_global(sched, 4, 1, (3, 2), 0.0, torch.Generator().manual_seed(2), objective="flow-matching")
    draws["drop"] = torch.tensor([False, False, True, False])
    loss, _ = flow_matching_loss(net, net, sched, x, labels, draws)
    want = 0.0
    for i in range(4):
        t, noise = draws["t"][i].item(), draws["noise"][i].double()
        label = AnalyticNet.null_class if draws["drop"][i] else labels[i].item()
        G = net(c_in(t) * ((1 - t) * x[i] + t * noise)[None], torch.tensor([t]), torch.tensor([t]), torch.tensor([label]))[0]
        want = want + ((SIGMA_D * G - (noise - x[i])) ** 2).mean() / SIGMA_D**2 / 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_training_noise_is_gaussian_with_std_sigma_d():
    noise = draw_global(IMMSchedule(), 4096, 4, (8, 4), 0.1, torch.Generator().manual_seed(0))["noise"]
    assert noise.mean().abs() < 0.01 and noise.std().item() == pytest.approx(SIGMA_D, rel=0.01)
    assert (noise.abs() > 2 * SIGMA_D).float().mean().item() == pytest.approx(0.0455, abs=0.003)  # N(0, 1) tails


def test_parameterisations_and_bandwidth_at_closed_form_points():
    s, t = torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    euler = IMMSchedule()
    assert euler.c_in(t).item() == pytest.approx(1 / (0.5 * math.sqrt(0.5)))
    assert [v.item() for v in euler.c_skip_out(s, t)] == pytest.approx([1.0, -0.3 * 0.5])
    assert euler.kernel_weight(s, t).item() == pytest.approx(1 / (0.3 * 0.5))
    # simple_edm, fm schedule: alpha_t = sigma_t = 0.5, alpha_s = 0.8, sigma_s = 0.2, alpha_t^2 + sigma_t^2 = 0.5
    edm = IMMSchedule(parameterization="simple_edm")
    c_skip, c_out = edm.c_skip_out(s, t)
    assert c_skip.item() == pytest.approx((0.4 + 0.1) / 0.5)
    assert c_out.item() == pytest.approx(-0.5 * (0.8 * 0.5 - 0.5 * 0.2) / math.sqrt(0.5))
    assert edm.kernel_weight(s, t).item() == pytest.approx(1 / abs(c_out.item()))


def _start(seed, B=2):
    g = torch.Generator().manual_seed(seed)
    return g, SIGMA_D * torch.randn(B, *AnalyticNet.token_shape, generator=g)  # the sampler's first draw


def _guided(net, x, t, s, labels, w):  # G(null) + w (G(label) - G(null)), on c_in(t) x
    t_b, s_b = torch.full((len(labels),), t), torch.full((len(labels),), s)
    G_c = net(c_in(t) * x, t_b, s_b, labels)
    G_n = net(c_in(t) * x, t_b, s_b, torch.full_like(labels, AnalyticNet.null_class))
    return G_n + w * (G_c - G_n)


@pytest.mark.parametrize("sampler", ["pushforward", "restart", "euler"])
def test_two_step_samplers_written_out(sampler):
    """From x_T ~ N(0, sigma_d^2) through t_1 = (T + eps) / 2 to eps, guidance 2:
    pushforward f(f(x; T -> t_1); t_1 -> eps); restart f(x; T -> eps), re-noised to t_1 with fresh noise, then
    f(.; t_1 -> eps) and no noise after the last step; Euler x - (t_i - t_{i+1}) sigma_d G(x, t_i, t_i)."""
    net = AnalyticNet().float()
    labels = torch.tensor([0, 2])
    out = sample_tokens(net, IMMScheduler(sampler=sampler), labels, 2, torch.Generator().manual_seed(7), cfg_scale=2.0)
    g, x = _start(7)
    t1 = (T + EPS) / 2
    with torch.no_grad():
        if sampler == "pushforward":
            x = x - (T - t1) * SIGMA_D * _guided(net, x, T, t1, labels, 2.0)
            x = x - (t1 - EPS) * SIGMA_D * _guided(net, x, t1, EPS, labels, 2.0)
        elif sampler == "restart":
            x0 = x - (T - EPS) * SIGMA_D * _guided(net, x, T, EPS, labels, 2.0)
            x = (1 - t1) * x0 + t1 * SIGMA_D * torch.randn(x.shape, generator=g)
            x = x - (t1 - EPS) * SIGMA_D * _guided(net, x, t1, EPS, labels, 2.0)
        else:
            x = x - (T - t1) * SIGMA_D * _guided(net, x, T, T, labels, 2.0)
            x = x - (t1 - EPS) * SIGMA_D * _guided(net, x, t1, t1, labels, 2.0)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_the_second_time_embedding_reads_the_stride_or_s():
    """second_time="stride" embeds t - s (the paper's better ImageNet model), "s" embeds s: with the same weights,
    the stride model at (t, s) is the s model at (t, t - s)."""
    from pipelines.imm.model import DiT

    args = dict(space="latent", num_tokens=8, token_dim=4, grid=(1, 4, 4), latent_mean=[0.0] * 4, latent_std=[1.0] * 4,
                width=32, depth=2, heads=2, num_classes=3)
    torch.manual_seed(0)
    stride = DiT(**args, second_time="stride")
    with torch.no_grad():
        for p in stride.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised output head would make every output 0
    by_s = DiT(**args, second_time="s")
    by_s.load_state_dict(stride.state_dict())
    x, labels = torch.randn(3, 8, 4), torch.tensor([0, 1, 3])
    t, s = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.1, 0.45, 0.006])
    with torch.no_grad():
        torch.testing.assert_close(stride(x, t, s, labels), by_s(x, t, t - s, labels))
        assert not torch.allclose(stride(x, t, s, labels), by_s(x, t, s, labels), atol=1e-4)


def test_lognormal_time_sampler_is_the_truncated_normal_in_log_eta():
    """log eta_t ~ N(P_mean = -1.1, P_std = 2) truncated to [log eta(eps), log eta(T)]: its median and quartiles."""
    sched = IMMSchedule(time_sampler="lognormal")
    _, _, t = sched.sample_times(50_000, torch.Generator().manual_seed(0))
    log_eta = torch.log(t.double() / (1 - t.double()))
    normal = torch.distributions.Normal(torch.tensor(-1.1, dtype=torch.float64), 2.0)
    lo, hi = normal.cdf(torch.tensor(math.log(EPS / (1 - EPS)))), normal.cdf(torch.tensor(math.log(T / (1 - T))))
    for q in (0.25, 0.5, 0.75):
        want = normal.icdf(lo + q * (hi - lo)).item()
        assert torch.quantile(log_eta, q).item() == pytest.approx(want, abs=0.03), q
