"""Multi-Token Attention: the public function.

    mta(q, k, v, kq_pre, head_pre, kq_post, head_post, causal=False, backend="auto") -> [B, H, S, K]

q, k, v: [B, H, S, K]; kq_pre, kq_post: [H, c_q, c_k] key-query kernels (None skips the convolution);
head_pre: [H, H] pre-softmax head mixing; head_post: [H / c_h, c_h, c_h] post-softmax head convolution.
The output is P V, before the per-head norm and gate of module.MTA.

backend: "auto" (the chunked path on any device), "cpu" (query chunks with a halo, checkpointed; O(H x chunk
x S) memory), "reference" (materialised). A fused Triton kernel is not written yet: "triton" is refused.
"""
from __future__ import annotations

from .cpu import mta_cpu
from .reference import identity_kq, mta_reference

BACKENDS = ("auto", "cpu", "reference")


def mta(q, k, v, kq_pre=None, head_pre=None, kq_post=None, head_post=None, causal: bool = False, backend: str = "auto"):
    if backend not in BACKENDS:
        raise ValueError(f"unknown MTA backend {backend!r} (have: {', '.join(BACKENDS)}; no Triton kernel yet)")
    if kq_pre is not None and kq_post is not None and kq_pre.shape != kq_post.shape:
        raise ValueError(f"MTA: the pre- and post-softmax kernels must have one shape, not {tuple(kq_pre.shape)} "
                         f"and {tuple(kq_post.shape)}")
    if backend == "reference":
        return mta_reference(q, k, v, kq_pre, head_pre, kq_post, head_post, causal)
    return mta_cpu(q, k, v, kq_pre, head_pre, kq_post, head_post, causal)


__all__ = ["mta", "mta_reference", "identity_kq", "BACKENDS"]
