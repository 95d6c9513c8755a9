"""Small helpers shared by the attention ops and the models that call them."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, in fp32 on the CPU when a backward will run: there, under bf16 autocast
    (`--precision bf16`), the flash kernel's backward is 2-4x slower in bf16 than in fp32 (torch 2.14, measured in
    BENCHMARKS.md), and at these head sizes attention is a small share of the FLOPs, so fp32 costs nothing and
    keeps the bf16 gain of the matmuls. Its bf16 forward is 2x faster than the fp32 one, so passes without
    gradients (a frozen tokenizer's encoder or teacher, sampling under autocast) stay in bf16."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and needs_grad:
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast the fp32 inputs back down
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def triton_interpreted() -> bool:
    """TRITON_INTERPRET as Triton reads it ("1", "true", "on", "yes" in any case; "0", "false", "off" or unset: off)."""
    try:
        from triton import knobs  # (Triton >= 3.4)

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


def on_tensor_device(fn):
    """Run a Triton host function on its first argument's GPU: Triton launches on the current CUDA device (and its
    stream), so tensors on another GPU (a pipeline moved to cuda:1) would be read by a kernel on cuda:0."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if args[0].device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(args[0].device):
            return fn(*args, **kwargs)

    return wrapped
