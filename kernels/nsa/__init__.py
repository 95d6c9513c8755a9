"""Native Sparse Attention: the public functions.

    nsa_3d(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, block=64, top_n=8, forced=...)   # diffusion, non-causal
    nsa_causal(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, block=16, top_n=4, ...)        # LM, causal 1D

q: [B, H, N, K]; k, v: [B, Hkv, N, K] (H divisible by Hkv); k_cmp, v_cmp: [B, Hkv, NB, K], one compressed
key/value per block (made by the learnable compressor in module.py); g_cmp, g_slc: [B, H, N] gate values.
3D tokens must be in cube-major order (pipelines.nn.layers.cube_major_order) with block = cube volume.

backend: "auto" (Triton on CUDA, the vectorised CPU path otherwise), "triton", "cpu", "reference", or "flex"
(the selected branch through torch's compiled flex_attention; forward only on the CPU).
The attention branches (3D: compressed and selected; causal: the per-token selected branch on Triton) are
torch.library custom ops with registered fake and autograd implementations, so torch.compile traces them
without graph breaks.
"""
from __future__ import annotations

import torch

from . import cpu
from .reference import (cube_neighbourhood, nsa_3d_reference, nsa_causal_reference, select_causal, select_cubes,
                        selection_size)

BACKENDS = ("auto", "triton", "cpu", "reference", "flex")


def _impl(backend: str):
    if backend == "triton":
        from . import triton as impl  # imported lazily: triton is optional on macOS/Windows

        return impl
    return cpu


def _device_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpu"


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None, block: int | None = None) -> str:
    """"auto": Triton on CUDA, the PyTorch path elsewhere, and also on CUDA where the kernels' tiles do not fit
    the given head dim and block (e.g. head dim 24, or a cube of 8 tokens)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown NSA backend {backend!r} (have: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    chosen = _device_backend(device)
    if chosen == "triton" and head_dim is not None and not _impl("triton").shapes_ok(head_dim, block):
        return "cpu"
    return chosen


# ---- the two attention branches as custom ops ----------------------------------------------------------------
@torch.library.custom_op("sigma::nsa_compressed", mutates_args=())
def _compressed(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    o, lse, scores = _impl(backend).compressed_fwd(q, k_cmp, v_cmp, block)
    return o, lse, scores


@_compressed.register_fake
def _(q, k_cmp, v_cmp, block, backend):
    B, H, N, _ = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    return torch.empty_like(q), q.new_empty(B, H, N, **f32), q.new_empty(B, H, N // block, k_cmp.shape[2], **f32)


@torch.library.custom_op("sigma::nsa_compressed_bwd", mutates_args=())
def _compressed_bwd(do: torch.Tensor, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _impl(backend).compressed_bwd(do, q, k_cmp, v_cmp, o, lse)
    return dq, dk, dv


@_compressed_bwd.register_fake
def _(do, q, k_cmp, v_cmp, o, lse, backend):
    return torch.empty_like(q), torch.empty_like(k_cmp), torch.empty_like(v_cmp)


def _compressed_setup(ctx, inputs, output):
    q, k_cmp, v_cmp, block, backend = inputs
    o, lse, _ = output
    ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
    ctx.backend = backend


def _compressed_backward(ctx, do, dlse, dscores):  # lse and scores carry no gradient (top-k is not differentiable)
    q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
    dq, dk, dv = _compressed_bwd(do.contiguous(), q, k_cmp, v_cmp, o, lse, ctx.backend)
    return dq, dk, dv, None, None


_compressed.register_autograd(_compressed_backward, setup_context=_compressed_setup)


@torch.library.custom_op("sigma::nsa_selected", mutates_args=())
def _selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, block: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _impl(backend).selected_fwd(q, k, v, index, block)
    return o, lse


@_selected.register_fake
def _(q, k, v, index, block, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("sigma::nsa_selected_bwd", mutates_args=())
def _selected_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, index: torch.Tensor, block: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _impl(backend).selected_bwd(do, q, k, v, o, lse, index, block)
    return dq, dk, dv


@_selected_bwd.register_fake
def _(do, q, k, v, o, lse, index, block, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _selected_setup(ctx, inputs, output):
    q, k, v, index, block, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, index)
    ctx.block, ctx.backend = block, backend


def _selected_backward(ctx, do, dlse):
    q, k, v, o, lse, index = ctx.saved_tensors
    dq, dk, dv = _selected_bwd(do.contiguous(), q, k, v, o, lse, index, ctx.block, ctx.backend)
    return dq, dk, dv, None, None, None


_selected.register_autograd(_selected_backward, setup_context=_selected_setup)


@torch.library.custom_op("sigma::nsa_causal_selected", mutates_args=())
def _causal_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _impl("triton").causal_selected_fwd(q, k, v, index, block)
    return o, lse


@_causal_selected.register_fake
def _(q, k, v, index, block):  # the kernel makes its inputs contiguous: so are its outputs
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("sigma::nsa_causal_selected_bwd", mutates_args=())
def _causal_selected_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, index: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _impl("triton").causal_selected_bwd(do, q, k, v, o, lse, index, block)
    return dq, dk, dv


@_causal_selected_bwd.register_fake
def _(do, q, k, v, o, lse, index, block):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _causal_selected_setup(ctx, inputs, output):
    q, k, v, index, block = inputs
    ctx.save_for_backward(q, k, v, *output, index)
    ctx.block = block


def _causal_selected_backward(ctx, do, dlse):
    q, k, v, o, lse, index = ctx.saved_tensors
    dq, dk, dv = _causal_selected_bwd(do.contiguous(), q, k, v, o, lse, index, ctx.block)
    return dq, dk, dv, None, None


_causal_selected.register_autograd(_causal_selected_backward, setup_context=_causal_selected_setup)


def causal_selected_attention(q, k, v, index, block: int, backend: str = "auto"):
    """Per-token selected attention, causal: token t of head h attends to the keys <= t of the KV blocks
    index[b, h // G, t, :] (-1 = unused slot). Triton kernel (a custom op) or the vectorised PyTorch path."""
    chosen = resolve_backend(backend, q.device, q.shape[-1], block)  # (an LM with head dim 24: PyTorch on CUDA too)
    if chosen == "triton":
        return _causal_selected(q, k, v, index, block)[0]
    return cpu.causal_selected(q, k, v, index, block)


def compressed_attention(q, k_cmp, v_cmp, block: int, backend: str = "auto"):
    """All queries against the compressed keys: (o [B, H, N, K], lse [B, H, N], scores [B, H, N/block, NB])."""
    if q.shape[2] % block:
        raise ValueError(f"{q.shape[2]} tokens do not split into blocks of {block}")
    return _compressed(q, k_cmp, v_cmp, block, resolve_backend(backend, q.device))


def selected_attention(q, k, v, index, block: int, backend: str = "auto"):
    """Block-sparse attention: query block i attends to the KV blocks index[b, h // G, i, :]. Returns o."""
    if q.shape[2] % block:
        raise ValueError(f"{q.shape[2]} tokens do not split into blocks of {block}")
    return _selected(q, k, v, index, block, resolve_backend(backend, q.device))[0]


# ---- NSA -------------------------------------------------------------------------------------------------------
def _checked_inputs(q, k, v, k_cmp, v_cmp):
    """q, k, v, k_cmp, v_cmp made contiguous, after checking they share one floating dtype: the kernels' matmuls
    take no mixed or integer operands (the gates may differ: they are cast). Contiguous, because the custom ops'
    fake implementations (what torch.compile plans with) give outputs q's layout, and not every backend would."""
    tensors = (q, k, v, k_cmp, v_cmp)
    if len({t.dtype for t in tensors}) > 1 or not q.is_floating_point():
        raise ValueError(f"NSA: q, k, v, k_cmp and v_cmp must share one floating dtype, got "
                         f"{', '.join(str(t.dtype).removeprefix('torch.') for t in tensors)}")
    return tuple(t.contiguous() for t in tensors)


def nsa_3d(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, *, block: int, top_n: int, forced: torch.Tensor,
           backend: str = "auto", return_index: bool = False, n_select: int | None = None):
    """Non-causal NSA over cube-major tokens (one compressed token per cube). forced: [NB, NB] bool, the cubes
    every query cube attends to (its own and its neighbours, see cube_neighbourhood); n_select: the precomputed
    selection_size(top_n, forced) (a Python int, so torch.compile sees no data-dependent size). Returns o [B, H, N, K]."""
    B, H, N, K = q.shape
    hkv = k.shape[1]
    if N % block:
        raise ValueError(f"{N} tokens do not split into blocks of {block}")
    q, k, v, k_cmp, v_cmp = _checked_inputs(q, k, v, k_cmp, v_cmp)
    if forced.shape != (N // block, N // block):
        raise ValueError(f"NSA: {N} tokens make {N // block} cubes of {block}, but the forced cube mask is "
                         f"{'x'.join(map(str, forced.shape))} (a layer built for another grid?)")
    forced = forced.to(q.device)  # (cube_neighbourhood makes it on the CPU; NSA3D's buffer is already there)
    backend = resolve_backend(backend, q.device, K, block)
    if backend == "reference":
        o, index = nsa_3d_reference(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, block, top_n, forced)
        return (o, index) if return_index else o
    branch = ("triton" if q.is_cuda else "cpu") if backend == "flex" else backend
    o_cmp, _, scores = _compressed(q, k_cmp, v_cmp, block, branch)
    scores = scores.view(B, hkv, H // hkv, N // block, k_cmp.shape[2]).sum(2)  # a GQA group shares one selection
    index = select_cubes(scores, top_n, forced, n_select)
    if backend == "flex":
        from .flex import selected_flex

        o_slc = selected_flex(q, k, v, index, block)
    else:
        o_slc, _ = _selected(q, k, v, index, block, backend)
    o = g_cmp[..., None].to(o_cmp.dtype) * o_cmp + g_slc[..., None].to(o_slc.dtype) * o_slc
    return (o, index) if return_index else o


def nsa_causal(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, *, block: int, top_n: int, window: int = 0, g_win=None,
               n_initial: int = 1, n_local: int = 2, backend: str = "auto"):
    """Causal 1D NSA for the LM (per-token selection shared within a GQA group). The selected branch runs the
    Triton kernel (backend triton, auto on CUDA) or the CPU path that gathers each token's selected blocks (no
    N x N tensor); the compressed branch (N x N / block scores, small) and the window run in PyTorch."""
    q, k, v, k_cmp, v_cmp = _checked_inputs(q, k, v, k_cmp, v_cmp)
    backend = resolve_backend(backend, q.device, q.shape[-1], block)
    if backend == "reference":
        return nsa_causal_reference(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, block, top_n, window, g_win, n_initial, n_local)[0]
    B, H, N, K = q.shape
    hkv, nb = k.shape[1], k_cmp.shape[2]
    t = torch.arange(N, device=q.device)
    cmp_mask = ((torch.arange(nb, device=q.device) + 1) * block - 1)[None, :] <= t[:, None]  # [N, NB], small
    kc, vc = cpu._rows(k_cmp, H).view(B, H, nb, K), cpu._rows(v_cmp, H).view(B, H, nb, K)
    s = (q @ kc.transpose(-1, -2)).float() * K**-0.5
    p = torch.softmax(s.masked_fill(~cmp_mask, float("-inf")), -1).nan_to_num(0.0)  # [B, H, N, NB]
    g_cmp, g_slc = g_cmp.to(q.dtype), g_slc.to(q.dtype)  # the output keeps the inputs' dtype (gates come in fp32)
    o = g_cmp[..., None] * (p.to(q.dtype) @ vc)
    with torch.no_grad():
        scores = p.view(B, hkv, H // hkv, N, nb).sum(2)
        scores = torch.nn.functional.pad(scores, (0, -(-N // block) - nb))
        index = select_causal(scores, top_n, block, n_initial, n_local)
    o = o + g_slc[..., None] * causal_selected_attention(q, k, v, index, block, backend)
    if window > 0:
        o = o + g_win[..., None].to(q.dtype) * cpu.causal_window(q, k, v, window)
    return o


__all__ = ["nsa_3d", "nsa_causal", "compressed_attention", "selected_attention", "causal_selected_attention", "cube_neighbourhood",
           "select_cubes", "select_causal", "selection_size", "BACKENDS"]
