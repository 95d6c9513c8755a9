"""Multi-Token Attention on the CPU: query chunks with a halo, memory O(H x chunk x S) instead of O(H x S^2).

A chunk of output rows [t0, t1) needs the probabilities of rows [t0 - top, t1 + bottom) for the post-softmax
convolution, and those need the logits of rows [t0 - 2 top, t1 + 2 bottom) for the pre-softmax one: the
chunk recomputes its halo of logits from Q and K rather than sharing them (no S x S tensor anywhere). Rows
outside [0, S) are the reference's zero padding. Causal chunks only look at keys [0, t1).

Backward: each chunk is checkpointed (torch.utils.checkpoint): the chunk's forward runs again inside the
backward and autograd differentiates it, so saved memory stays one chunk's worth.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .reference import head_conv, kq_padding, up

CHUNK_BYTES = 32 << 20  # one [B, H, rows, S] fp32 score slab per chunk


# Score slabs of at least this many elements run the convolutions through torch.compile (inductor fuses the
# c_q x c_k shifted products into one cache-friendly loop: ~4x faster than c_q x c_k passes over memory, see
# BENCHMARKS.md); smaller ones, and machines where compiling fails, use the eager loops. SIGMA_MTA_COMPILE=0
# turns compiling off.
COMPILE_MIN_ELEMENTS = 1 << 22
_compiled: dict = {}


def _shifted_sum(x, w):
    """out[b, h, r, c] = sum_ij w[h, i, j] x[b, h, r + i, c + j] ('valid' depthwise correlation), one expression
    so that inductor fuses it."""
    H, cq, ck = w.shape
    C, S = x.shape[2] - cq + 1, x.shape[3] - ck + 1
    out = None
    for i in range(cq):
        for j in range(ck):
            t = x[:, :, i : i + C, j : j + S] * w[:, i, j].view(1, H, 1, 1)
            out = t if out is None else out + t
    return out


def _tap_sums(x, g):
    """dw[h, i, j] = sum_{b, r, c} x[b, h, r + i, c + j] g[b, h, r, c]."""
    C, S = g.shape[2:]
    cq, ck = x.shape[2] - C + 1, x.shape[3] - S + 1
    return torch.stack([torch.stack([(x[:, :, i : i + C, j : j + S] * g).sum((0, 2, 3)) for j in range(ck)], -1)
                        for i in range(cq)], -2)


def _shifted_sum_eager(x, w):  # the same, in place: c_q x c_k multiply-adds (2x faster than mkldnn's depthwise conv)
    H, cq, ck = w.shape
    C, S = x.shape[2] - cq + 1, x.shape[3] - ck + 1
    out = torch.zeros(x.shape[0], H, C, S, dtype=x.dtype, device=x.device)
    for i in range(cq):
        for j in range(ck):
            out.addcmul_(x[:, :, i : i + C, j : j + S], w[:, i, j].view(1, H, 1, 1))
    return out


def _tap_sums_eager(x, g):  # as a forward convolution with g as the kernel (mkldnn's depthwise backward is ~4x slower)
    B, H = x.shape[:2]
    dw = F.conv2d(x.reshape(1, B * H, *x.shape[2:]), g.reshape(B * H, 1, *g.shape[2:]), groups=B * H)
    return dw.view(B, H, *dw.shape[2:]).sum(0)


def _run(fn, eager, x, *args):
    """fn compiled (once, dynamic shapes) for large slabs, else its eager twin."""
    if x.numel() < COMPILE_MIN_ELEMENTS or x.device.type != "cpu" or _compiled.get("failed") \
            or os.environ.get("SIGMA_MTA_COMPILE") == "0":
        return eager(x, *args)
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    try:
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn, dynamic=True)
        return _compiled[fn](x, *args)
    except (BackendCompilerFailed, InductorError) as e:  # no C++ compiler, unsupported platform: the eager
        _compiled["failed"] = True  # loops, with one warning (other errors, e.g. out of memory, are raised)
        warnings.warn(f"MTA: compiling the CPU convolutions failed ({type(e).__name__}); using the eager loops")
        return eager(x, *args)


class KQConv(torch.autograd.Function):
    """Depthwise 'valid' 2D convolution of a padded score slab x [B, H, R, Sk] with w [H, c_q, c_k].

    Backward: dx is the 'full' correlation of g with the flipped kernel (the same shifted sum on g padded by
    the kernel size); dw[h] = x[h] correlated with g[h].
    """

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _run(_shifted_sum, _shifted_sum_eager, x, w.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        H, cq, ck = w.shape
        g = g.contiguous()
        dx = _run(_shifted_sum, _shifted_sum_eager, F.pad(g, (ck - 1, ck - 1, cq - 1, cq - 1)), w.to(g.dtype).flip(1, 2))
        dw = _run(_tap_sums, _tap_sums_eager, x, g)
        return dx, dw.to(w.dtype)


def _chunk_rows(q, k, v, kq_pre, head_pre, kq_post, head_post, t0: int, t1: int, causal: bool):
    """Output rows [t0, t1) of MTA: [B, H, t1 - t0, K]."""
    B, H, S, K = q.shape
    cq, ck = (kq_pre if kq_pre is not None else kq_post).shape[1:] if (kq_pre is not None or kq_post is not None) else (1, 1)
    left, right, top, bottom = kq_padding(cq, ck, causal)
    pre_h = (top, bottom) if kq_pre is not None else (0, 0)
    post_h = (top, bottom) if kq_post is not None else (0, 0)
    want0, want1 = t0 - pre_h[0] - post_h[0], t1 + pre_h[1] + post_h[1]  # logits rows this chunk depends on
    lo, hi = max(0, want0), min(S, want1)
    n_keys = t1 if causal else S
    a = (up(q[:, :, lo:hi]) @ up(k[:, :, :n_keys]).transpose(-1, -2)) * K**-0.5  # [B, H, hi - lo, keys]
    rows = torch.arange(lo, hi, device=q.device)[:, None]
    future = torch.arange(n_keys, device=q.device)[None, :] > rows if causal else None
    if kq_pre is not None:
        if causal:
            a = a.masked_fill(future, 0.0)
        a = F.pad(a, (left, right, lo - want0, want1 - hi))  # the reference's zero padding, where it applies
        a = KQConv.apply(a, kq_pre)  # valid on rows: [want0 + top, want1 - bottom)
        lo_p, hi_p = want0 + pre_h[0], want1 - pre_h[1]
    else:
        a = F.pad(a, (0, 0, lo - want0, want1 - hi))
        lo_p, hi_p = want0, want1
    if head_pre is not None:
        a = head_conv(a, head_pre[None])
    # rows of a: [lo_p, hi_p); those outside [0, S) are padding and must give zero probabilities
    prow = torch.arange(lo_p, hi_p, device=q.device)[:, None]
    inside = (prow >= 0) & (prow < S)
    if causal:  # padding rows stay unmasked (finite softmax, no NaN in backward) and are zeroed below
        a = a.masked_fill((torch.arange(n_keys, device=q.device)[None, :] > prow) & inside, float("-inf"))
    p = torch.softmax(a, dim=-1)
    if lo_p < 0 or hi_p > S:
        p = p * inside.to(p.dtype)
    if kq_post is not None:
        p = F.pad(p, (left, right, 0, 0))
        p = KQConv.apply(p, kq_post)  # rows [t0, t1)
        if causal:
            p = p.masked_fill(torch.arange(n_keys, device=q.device)[None, :] > torch.arange(t0, t1, device=q.device)[:, None], 0.0)
    if head_post is not None:
        p = head_conv(p, head_post)
    return (p @ up(v[:, :, :n_keys])).to(q.dtype)


def mta_cpu(q, k, v, kq_pre=None, head_pre=None, kq_post=None, head_post=None, causal: bool = False, chunk: int | None = None):
    """Same signature and result as reference.mta_reference, in query chunks of `chunk` rows."""
    B, H, S, K = q.shape
    if chunk is None:
        chunk = max(16, min(S, CHUNK_BYTES // max(1, 4 * B * H * S)))  # (max: an empty batch)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, kq_pre, head_pre, kq_post, head_post))
    out = []
    for t0 in range(0, S, chunk):
        t1 = min(S, t0 + chunk)
        args = (q, k, v, kq_pre, head_pre, kq_post, head_post, t0, t1, causal)
        o = checkpoint(_chunk_rows, *args, use_reentrant=False) if grad else _chunk_rows(*args)
        out.append(o)
    return torch.cat(out, dim=2)
