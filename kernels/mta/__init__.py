"""Multi-Token Attention: the public function.

    mta(q, k, v, kq_pre, head_pre, kq_post, head_post, causal=False, backend="auto") -> [B, H, S, K]

q, k, v: [B, H, S, K]; kq_pre, kq_post: [H, c_q, c_k] key-query kernels (None skips the convolution);
head_pre: [H, H] pre-softmax head mixing; head_post: [H / c_h, c_h, c_h] post-softmax head convolution.
The output is P V, before the per-head norm and gate of module.MTA.

backend: "auto" (the fused Triton kernel on CUDA when the heads and head dim fit its registers, the chunked
path otherwise), "triton"
(triton.py: fused forward and backward, O(S) memory; a torch.library custom op, so torch.compile traces it),
"cpu" (query chunks with a halo, checkpointed; O(H x chunk x S) memory), "reference" (materialised).
"""
from __future__ import annotations

import torch

from .cpu import mta_cpu
from .reference import identity_kq, mta_reference

BACKENDS = ("auto", "triton", "cpu", "reference")
AUTO_MAX_HEADS_X_DIM = 512  # "auto" takes the fused kernel up to heads x head dim = 512 (e.g. 8 x 64)


def _triton():
    from . import triton as impl  # imported lazily: triton is optional on macOS/Windows

    return impl


# ---- the fused kernel as a custom op (weights always given: the wrapper fills in identities) ----------------------
@torch.library.custom_op("sigma::mta_fused", mutates_args=())
def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, m1: torch.Tensor, w2: torch.Tensor,
           m2: torch.Tensor, head_group: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _triton().mta_fwd(q, k, v, w1, m1, w2, m2, head_group, causal)
    return o.to(q.dtype), lse


@_fused.register_fake
def _(q, k, v, w1, m1, w2, m2, head_group, causal):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("sigma::mta_fused_bwd", mutates_args=())
def _fused_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, m1: torch.Tensor,
               w2: torch.Tensor, m2: torch.Tensor, lse: torch.Tensor, head_group: int, causal: bool) -> list[torch.Tensor]:
    grads = _triton().mta_bwd(do, q, k, v, w1, m1, w2, m2, lse, head_group, causal)
    return [g.to(x.dtype) for g, x in zip(grads, (q, k, v, w1, m1, w2, m2))]


@_fused_bwd.register_fake
def _(do, q, k, v, w1, m1, w2, m2, lse, head_group, causal):
    return [x.new_empty(x.shape) for x in (q, k, v, w1, m1, w2, m2)]


def _fused_setup(ctx, inputs, output):
    q, k, v, w1, m1, w2, m2, head_group, causal = inputs
    ctx.save_for_backward(q, k, v, w1, m1, w2, m2, output[1])
    ctx.head_group, ctx.causal = head_group, causal


def _fused_backward(ctx, do, dlse):
    q, k, v, w1, m1, w2, m2, lse = ctx.saved_tensors
    grads = _fused_bwd(do.contiguous(), q, k, v, w1, m1, w2, m2, lse, ctx.head_group, ctx.causal)
    return (*grads, None, None)


_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


def mta_triton(q, k, v, kq_pre=None, head_pre=None, kq_post=None, head_post=None, causal: bool = False):
    """The fused kernel with missing pieces as identities: a [H, 1, 1] ones kernel, an H x H eye."""
    H = q.shape[1]
    one = q.new_ones(H, 1, 1, dtype=torch.float32)
    eye = torch.eye(H, dtype=torch.float32, device=q.device)
    w1 = kq_pre if kq_pre is not None else one
    w2 = kq_post if kq_post is not None else one
    m1 = head_pre if head_pre is not None else eye
    m2 = torch.block_diag(*head_post.unbind(0)) if head_post is not None else eye  # differentiable
    head_group = head_post.shape[1] if head_post is not None else 1
    return _fused(q, k, v, w1, m1, w2, m2, head_group, causal)[0]


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown MTA backend {backend!r} (have: {', '.join(BACKENDS)})")
    if backend == "auto":
        H, D = q.shape[1], q.shape[-1]  # one program holds H x 16 x D accumulators: beyond 8 x 64 they spill
        fits = q.device.type == "cuda" and _triton().shapes_ok(H, D) and H * D <= AUTO_MAX_HEADS_X_DIM
        return "triton" if fits else "cpu"
    return backend


def mta(q, k, v, kq_pre=None, head_pre=None, kq_post=None, head_post=None, causal: bool = False, backend: str = "auto"):
    if kq_pre is not None and kq_post is not None and kq_pre.shape != kq_post.shape:
        raise ValueError(f"MTA: the pre- and post-softmax kernels must have one shape, not {tuple(kq_pre.shape)} "
                         f"and {tuple(kq_post.shape)}")
    if not all(t.is_floating_point() for t in (q, k, v)):  # (the fused kernel would round its fp32 result to ints)
        raise ValueError(f"MTA: q, k and v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")
    backend = resolve_backend(backend, q)
    if backend == "reference":
        return mta_reference(q, k, v, kq_pre, head_pre, kq_post, head_post, causal)
    if backend == "triton":
        return mta_triton(q, k, v, kq_pre, head_pre, kq_post, head_post, causal)
    return mta_cpu(q, k, v, kq_pre, head_pre, kq_post, head_post, causal)


__all__ = ["mta", "mta_reference", "mta_triton", "identity_kq", "BACKENDS", "resolve_backend"]
