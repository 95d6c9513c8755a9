"""The IMM training objective (and the flow-matching baseline on the same network).

IMM (arXiv 2503.07565, Alg. 1): a batch is split into groups of M particles sharing (s, r, t), r < t just below
t. For each particle, x_t and x_r come from the SAME data x and noise eps. The student y_t = f(x_t; t -> s)
(gradient) and the target y_r = f(x_r; r -> s) (same weights, no gradient) are matched in distribution by
an MMD with a Laplace kernel; the induction (r -> t) makes one network jump along the whole trajectory.
"""
from __future__ import annotations

import math

import torch

from pipelines.imm.schedule import IMMSchedule


def network_output(net, sched: IMMSchedule, x_t: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """G(c_in x_t, t, s, label) in x_t's dtype. x_t: [B, N, c]; s, t, labels: [B]."""
    return net(sched.c_in(t).to(x_t.dtype)[:, None, None] * x_t, t, s, labels).to(x_t.dtype)


def model_map(net, sched: IMMSchedule, x_t: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
    """f(x_t; t -> s) = c_skip x_t + c_out G(c_in x_t, t, s, label). x_t: [B, N, c]; s, t, labels: [B]."""
    return sched.combine(x_t, network_output(net, sched, x_t, s, t, labels), s, t)


def velocity_loss(sched: IMMSchedule, G: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow matching's regression: sigma_d G(x_t, t, t) against the OT path's velocity eps - x, per element,
    in units of the data variance."""
    return (sched.sigma_d * G.float() - (noise - x).float()).pow(2).mean() / sched.sigma_d**2


def laplace_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = exp(-w~ max(||a_i - b_j||_2, 1e-8) / D) for every pair in each group.

    a, b: [G, M, D] (D = all elements of one sample); bandwidth w~: [G]. Returns [G, M, M]."""
    D = a.shape[-1]
    sq = (a[:, :, None] - b[:, None]).pow(2).sum(-1)  # [G, M, M]
    dist = sq.clamp_min(1e-16).sqrt()  # = max(||.||, 1e-8), with a finite gradient at 0
    return torch.exp(-bandwidth[:, None, None] * dist / D)


def mmd(y_t: torch.Tensor, y_r: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """Per-group squared MMD (V-statistic, all M x M pairs), one bandwidth for all three terms: [G]."""
    k_tt = laplace_kernel(y_t, y_t, bandwidth).mean((1, 2))
    k_rr = laplace_kernel(y_r, y_r, bandwidth).mean((1, 2))
    k_tr = laplace_kernel(y_t, y_r, bandwidth).mean((1, 2))
    return k_tt + k_rr - 2 * k_tr


def class_groups(labels: torch.Tensor, group_size: int, null_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrange a batch into groups of `group_size` particles that share one class: the MMD compares particles
    of one conditional distribution (with mixed labels it would only match the mixture, and the class would
    be free to drift). labels: int64 [B] -> (order [B], a permutation of the batch; group_labels [B // M]).
    Full groups of each class come first; the leftovers (fewer than M of a class) form groups of the null
    class, which trains the unconditional model that guidance needs."""
    B, M = labels.shape[0], group_size
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    full, rest, group_labels = [], [], []
    start = 0
    for c, n in enumerate(counts.tolist()):
        whole = n - n % M
        full.append(order[start : start + whole])
        rest.append(order[start + whole : start + n])
        group_labels += [c] * (whole // M)
        start += n
    order = torch.cat(full + rest)
    group_labels += [null_class] * ((B - len(group_labels) * M) // M)
    return order, torch.tensor(group_labels, dtype=torch.int64)


def group_window(batch: int, group_size: int, num_classes: int) -> int:
    """Samples of the stream `complete_class_groups` picks a batch's groups from: twice the batch, and at least
    2 M per class so that data sets of many classes still fill their groups (at 100 classes, batch 64 and M = 4,
    sorting the batch leaves ~97 % of it in null-class leftovers; a window of 800 leaves none)."""
    return max(2 * batch, 2 * num_classes * group_size)


def complete_class_groups(labels: torch.Tensor, groups: int, group_size: int, null_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `groups` full one-class groups from a window of the data stream longer than the batch (`--groups
    complete`; the window's length: `group_window`). Walking the window in stream order, a class's group is
    complete at its M-th sample, and the first `groups` groups to complete are the batch. No sample lands in a
    mixed leftover group, so the null class comes from label dropout alone (`class_groups` leaves ~14.5 % of a
    64-sample, 6-class batch in leftovers at M = 4 and ~31 % at M = 8), and classes keep the stream's
    frequencies. A window too short for `groups` full groups (many classes, large M) fills the rest with
    null-class groups of leftovers, as `class_groups` does.
    labels: int64 [W] -> (positions in the window [groups * M], group_labels [groups])."""
    M = group_size
    ends, members, group_labels = [], [], []  # per full group: where it completes, its positions, its class
    for c in labels.unique().tolist():
        pos = (labels == c).nonzero().squeeze(1)
        full = pos[: pos.numel() - pos.numel() % M].view(-1, M)
        ends.append(full[:, -1])
        members.append(full)
        group_labels += [c] * full.shape[0]
    ends, members = torch.cat(ends), torch.cat(members)
    first = torch.argsort(ends)[:groups]
    first = first.sort().values  # [kept]: completion order, then back to class-major for a stable layout
    chosen, group_labels = members[first].reshape(-1), torch.tensor(group_labels, dtype=torch.int64)[first]
    missing = groups - group_labels.numel()
    if missing:  # not enough full groups in the window: the earliest unused samples form null-class groups
        unused = torch.ones(labels.numel(), dtype=torch.bool)
        unused[chosen] = False
        chosen = torch.cat([chosen, unused.nonzero().squeeze(1)[: missing * M]])
        group_labels = torch.cat([group_labels, torch.full((missing,), null_class, dtype=torch.int64)])
    return chosen, group_labels


def draw_global(sched: IMMSchedule, batch: int, group_size: int, token_shape: tuple[int, int],
                label_dropout: float, generator: torch.Generator, objective: str = "imm", fm_fraction: float = 0.0) -> dict:
    """Every random draw of one step for the GLOBAL batch (a rank slices its part), so N processes compute
    exactly what one process would on the combined batch. IMM: (s, r, t) and label dropout per group of
    `group_size` particles, and which groups train the velocity instead (`fm`, each with probability
    `fm_fraction`; drawn last and only when > 0, so the other draws do not change); flow matching: one
    t ~ U(eps, T) per sample (groups of 1)."""
    groups = batch // group_size if objective == "imm" else batch
    if objective == "imm":
        s, r, t = sched.sample_times(groups, generator)  # [G] each
    else:
        t = sched.eps + (sched.T - sched.eps) * torch.rand(groups, generator=generator)
        s = r = t
    noise = sched.sigma_d * torch.randn(batch, *token_shape, generator=generator)  # eps ~ N(0, sigma_d^2 I)
    u = torch.rand(groups, generator=generator)
    drop = u < label_dropout  # whole groups go unconditional (IMM trainers refine this: `unconditional_groups`)
    fm = torch.rand(groups, generator=generator) < fm_fraction if fm_fraction > 0 else torch.zeros(groups, dtype=torch.bool)
    return {"s": s, "r": r, "t": t, "noise": noise, "drop": drop, "u": u, "fm": fm}


def unconditional_groups(u: torch.Tensor, group_labels: torch.Tensor, null_class: int, label_dropout: float) -> torch.Tensor:
    """drop [G]: the class groups that go unconditional. The leftover groups of `class_groups` are null already;
    dropout tops them up to a fraction `label_dropout` of all groups (in expectation) and drops nothing when
    they alone reach it, so the unconditional fraction is max(label_dropout, leftovers), not their sum (which
    was ~23 % for a 64-sample, 6-class batch at 0.1; the leftovers alone are ~14.5 % there, so 0.1 adds
    nothing and only a larger value raises the fraction). u: [G] uniforms from `draw_global`."""
    G = group_labels.shape[0]
    leftovers = int((group_labels == null_class).sum())
    p_full = min(max((label_dropout * G - leftovers) / max(G - leftovers, 1), 0.0), 1.0)
    return (u < p_full) & (group_labels != null_class)


def imm_loss(net, model, sched: IMMSchedule, x: torch.Tensor, labels: torch.Tensor, draws: dict,
             group_size: int, fm_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """IMM loss for this rank's particles. x: [b, N, c] clean tokens, labels: [b]; `draws` are this rank's
    slice of `draw_global` (s, r, t, drop, fm: [g]; noise: [b, N, c]) with b = g * group_size.

    Groups marked `fm` (none unless --fm-fraction > 0) train the velocity instead: s = t, and the flow-matching
    loss on the same forward pass, weighted by `fm_weight` (euler_fm only). IMM never trains G at s = t (there
    f(x; t -> t) = x whatever G is), so this supervises an input the MMD leaves free, at no extra cost; the
    hope is that the low-variance regression teaches the shared network the data faster than the MMD of 4
    particles does (flow matching learns shapes' classes much faster: BENCHMARKS.md, tenth session)."""
    b = x.shape[0]
    M, g = group_size, b // group_size
    per_sample = lambda v: v.to(x.device).repeat_interleave(M)  # noqa: E731  [g] -> [b]
    fm_g = draws["fm"].to(x.device)
    fm = per_sample(fm_g)
    s, r, t = per_sample(draws["s"]), per_sample(draws["r"]), per_sample(draws["t"])
    s = torch.where(fm, t, s)
    labels = torch.where(per_sample(draws["drop"]), torch.full_like(labels, model.null_class), labels)
    noise = draws["noise"].to(x)
    x_t = sched.add_noise(x, noise, t)  # the same x and noise for both times (Alg. 1)
    x_r = sched.add_noise(x, noise, r)
    G = network_output(net, sched, x_t, s, t, labels)
    y_t = sched.combine(x_t, G, s, t).float()  # f(x_t; t -> s), keeping G for the velocity groups
    keep_g = ~fm_g
    keep = per_sample(keep_g)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # stop-gradient target, fp32
        y_r = model_map(model, sched, x_r[keep], s[keep], r[keep], labels[keep]).float()
    s_g, t_g = draws["s"].to(x.device)[keep_g], draws["t"].to(x.device)[keep_g]
    bandwidth = sched.kernel_weight(s_g, t_g)  # [g']
    weight = sched.loss_weight(t_g)  # [g']
    g_imm = int(keep_g.sum())
    if g_imm:
        per_group = mmd(y_t[keep].reshape(g_imm, M, -1), y_r.reshape(g_imm, M, -1), bandwidth)  # [g']
        loss = (weight * per_group).sum() / g  # a mean over all groups: the velocity groups add zero MMD
    else:
        per_group, loss = y_t.new_zeros(1), 0 * y_t.sum()
    logs = {"mmd": per_group.mean().item() if g_imm else math.nan}  # (NaN: every group here is a velocity group)
    if fm_weight > 0 and not bool(keep_g.all()):
        fm_loss = velocity_loss(sched, G[fm], x[fm], noise[fm])
        loss = loss + fm_weight * fm_loss * (int(fm_g.sum()) / g)
        logs["fm"] = fm_loss.item()
    return loss, logs


def flow_matching_loss(net, model, sched: IMMSchedule, x: torch.Tensor, labels: torch.Tensor, draws: dict
                       ) -> tuple[torch.Tensor, dict]:
    """The baseline on the same network and parameterisation: velocity v = eps - x on the OT path (alpha = 1 - t,
    sigma = t), predicted as sigma_d G(c_in x_t, t, t), the slope of the euler_fm map at s = t. draws: t, drop
    [b]; noise [b, N, c]."""
    t = draws["t"].to(x.device)
    labels = torch.where(draws["drop"].to(x.device), torch.full_like(labels, model.null_class), labels)
    noise = draws["noise"].to(x)
    x_t = sched.add_noise(x, noise, t)
    return velocity_loss(sched, network_output(net, sched, x_t, t, t, labels), x, noise), {}
