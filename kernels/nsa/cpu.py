"""Native Sparse Attention on the CPU: vectorised PyTorch, chunked over heads, never an N x N tensor.

Forward and backward of the two attention branches as plain functions (the autograd wiring is in
__init__.py). Both recompute probabilities in backward from the saved log-sum-exp, as FlashAttention does,
so memory stays O(chunk) instead of O(N x selected keys) for the whole batch.

The selected branch gathers each query block's S selected KV blocks with one index_select on a flattened
block table (faster than advanced indexing here) and runs batched GEMMs [V, K] x [K, S*V]; its dK/dV are
accumulated with index_add_, which is sequential, hence deterministic, on the CPU.

Axis legend as in reference.py; R = B * H rows of (batch, head), processed `chunk` rows at a time.
"""
from __future__ import annotations

import torch

from kernels.common import sdpa

TILE_BYTES = 1 << 20  # fp32 score tile per step: small enough to stay in cache (4x faster than big chunks here)


def _rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B * H, ...] with each kv head repeated for its G query heads (no copy when G = 1)."""
    if x.shape[1] != heads:
        x = x.repeat_interleave(heads // x.shape[1], dim=1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # not -1: a sequence shorter than one block has 0 blocks


def _unrows(dx: torch.Tensor, B: int, hkv: int) -> torch.Tensor:
    """Gradient of _rows: [B * H, ...] -> [B, Hkv, ...], summing over each group's heads."""
    dx = dx.view(B, hkv, dx.shape[0] // (B * hkv), *dx.shape[1:])
    return dx.sum(2)


def _step(row_elems: int, limit: int) -> int:
    """How many rows of `row_elems` fp32 scores fit one cache-sized tile."""
    return max(1, min(limit, TILE_BYTES // (4 * max(row_elems, 1))))


# ---- compressed branch: every query against the NB compressed keys, with the block scores fused in ---------
def compressed_fwd(q, k_cmp, v_cmp, block: int):
    """q: [B, H, N, K]; k_cmp, v_cmp: [B, Hkv, NB, K]. Returns o [B, H, N, K], lse [B, H, N] (fp32) and
    scores [B, H, N // block, NB] (fp32): the probabilities summed over each query block."""
    B, H, N, K = q.shape
    scale = K**-0.5
    qr, kr, vr = q.reshape(B * H, N, K), _rows(k_cmp, H), _rows(v_cmp, H)
    nb = kr.shape[1]
    o = torch.empty_like(qr)
    lse = torch.empty(B * H, N, dtype=torch.float32, device=q.device)
    scores = torch.empty(B * H, N // block, nb, dtype=torch.float32, device=q.device)
    step = _step(nb * block, N // block) * block  # whole query blocks per tile
    for r in range(B * H):
        kt = kr[r].transpose(0, 1)
        for a in range(0, N, step):
            s = (qr[r, a : a + step] @ kt).float().mul_(scale)  # [c, NB]
            m = s.amax(-1, keepdim=True)
            p = s.sub_(m).exp_()
            l = p.sum(-1, keepdim=True)
            o[r, a : a + step] = (p.to(q.dtype) @ vr[r]).div_(l).to(o.dtype)
            lse[r, a : a + step] = (m + l.log()).squeeze(-1)
            p.div_(l)  # probabilities for the block scores
            scores[r, a // block : (a + step) // block] = p.view(-1, block, nb).sum(1)
    return o.view(B, H, N, K), lse.view(B, H, N), scores.view(B, H, N // block, nb)


def compressed_bwd(do, q, k_cmp, v_cmp, o, lse):
    B, H, N, K = q.shape
    hkv = k_cmp.shape[1]
    scale = K**-0.5
    qr, kr, vr = q.reshape(B * H, N, K), _rows(k_cmp, H), _rows(v_cmp, H)
    dor, lser = do.reshape(B * H, N, K), lse.reshape(B * H, N)
    delta = (do.float() * o.float()).sum(-1).reshape(B * H, N)  # rowsum(dO * O) = sum_j P_ij dP_ij
    dq = torch.empty_like(qr)
    dk = torch.zeros(kr.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(vr.shape, dtype=torch.float32, device=q.device)
    nb = kr.shape[1]
    step = _step(nb, N)
    for r in range(B * H):
        for a in range(0, N, step):
            sl = slice(a, a + step)
            s = (qr[r, sl] @ kr[r].transpose(0, 1)).float().mul_(scale)
            p = s.sub_(lser[r, sl, None]).exp_()  # [c, NB]
            dv[r] += (p.transpose(0, 1).to(q.dtype) @ dor[r, sl]).float()
            dp = (dor[r, sl] @ vr[r].transpose(0, 1)).float()
            ds = p.mul_(dp.sub_(delta[r, sl, None])).mul_(scale).to(q.dtype)
            dq[r, sl] = ds @ kr[r]
            dk[r] += (ds.transpose(0, 1) @ qr[r, sl]).float()
    return dq.view_as(q), _unrows(dk, B, hkv).to(k_cmp.dtype), _unrows(dv, B, hkv).to(v_cmp.dtype)


# ---- selected branch: block-sparse attention over S KV blocks per query block -------------------------------
def _flat_index(index: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, NB, S] block indices -> [B * H * NB, S] indices into the flattened [B * H * NB] block table."""
    B, hkv, nb, S = index.shape
    idx = _rows(index, heads).view(B * heads, nb, S)
    return (idx + torch.arange(B * heads, device=idx.device)[:, None, None] * nb).view(-1, S)


def selected_fwd(q, k, v, index, block: int):
    """q: [B, H, N, K]; k, v: [B, Hkv, N, K]; index: [B, Hkv, NB, S]. Returns o [B, H, N, K], lse [B, H, N]."""
    B, H, N, K = q.shape
    S = index.shape[-1]
    scale = K**-0.5
    qb = q.reshape(-1, block, K)  # [R*NB, V, K]: every query block of every (batch, head)
    kt, vt = _rows(k, H).reshape(-1, block, K), _rows(v, H).reshape(-1, block, K)  # block tables, same numbering
    flat = _flat_index(index, H)  # [R*NB, S]
    o = torch.empty_like(qb)
    lse = torch.empty(qb.shape[:2], dtype=torch.float32, device=q.device)
    step = _step(block * S * block, len(qb))
    for a in range(0, len(qb), step):
        ids = flat[a : a + step].reshape(-1)
        ks = kt.index_select(0, ids).view(-1, S * block, K)  # [c, S*V, K]
        vs = vt.index_select(0, ids).view(-1, S * block, K)
        s = torch.bmm(qb[a : a + step], ks.transpose(1, 2)).float().mul_(scale)  # [c, V, S*V]
        m = s.amax(-1, keepdim=True)
        p = s.sub_(m).exp_()  # one exp pass; normalise the [V, K] output instead of the [V, S*V] scores
        l = p.sum(-1, keepdim=True)
        o[a : a + step] = torch.bmm(p.to(q.dtype), vs).div_(l).to(o.dtype)
        lse[a : a + step] = (m + l.log()).squeeze(-1)
    return o.view(B, H, N, K), lse.view(B, H, N)


def selected_bwd(do, q, k, v, o, lse, index, block: int):
    B, H, N, K = q.shape
    hkv = k.shape[1]
    S = index.shape[-1]
    scale = K**-0.5
    qb, dob = q.reshape(-1, block, K), do.reshape(-1, block, K)
    lseb = lse.reshape(-1, block)
    delta = (do.float() * o.float()).sum(-1).reshape(-1, block)
    kt, vt = _rows(k, H).reshape(-1, block, K), _rows(v, H).reshape(-1, block, K)
    flat = _flat_index(index, H)
    dq = torch.empty_like(qb)
    dkt = torch.zeros(kt.shape, dtype=torch.float32, device=q.device)  # accumulated over the query blocks that chose each block
    dvt = torch.zeros(vt.shape, dtype=torch.float32, device=q.device)
    step = _step(block * S * block, len(qb))
    for a in range(0, len(qb), step):
        ids = flat[a : a + step].reshape(-1)
        ks = kt.index_select(0, ids).view(-1, S * block, K)
        vs = vt.index_select(0, ids).view(-1, S * block, K)
        s = torch.bmm(qb[a : a + step], ks.transpose(1, 2)).float().mul_(scale)
        p = s.sub_(lseb[a : a + step, :, None]).exp_()  # [c, V, S*V]
        dvs = torch.bmm(p.transpose(1, 2).to(q.dtype), dob[a : a + step])  # [c, S*V, K]
        dp = torch.bmm(dob[a : a + step], vs.transpose(1, 2)).float()
        ds = p.mul_(dp.sub_(delta[a : a + step, :, None])).mul_(scale).to(q.dtype)
        dq[a : a + step] = torch.bmm(ds, ks)
        dks = torch.bmm(ds.transpose(1, 2), qb[a : a + step])
        dkt.index_add_(0, ids, dks.view(-1, block, K).float())
        dvt.index_add_(0, ids, dvs.view(-1, block, K).float())
    dk = _unrows(dkt.view(B * H, N, K), B, hkv).to(k.dtype)
    dv = _unrows(dvt.view(B * H, N, K), B, hkv).to(v.dtype)
    return dq.view_as(q), dk, dv


# ---- causal 1D: per-token selection (LM) -------------------------------------------------------------------
def causal_selected(q, k, v, index, block: int, chunk: int = 256):
    """Differentiable through autograd (LM sizes are small). q: [B, H, N, K]; k, v: [B, Hkv, N, K];
    index: [B, Hkv, N, S] blocks per token, -1 = unused. Gathers S * block keys per token, masks the future."""
    B, H, N, K = q.shape
    S = index.shape[-1]
    nb = -(-N // block)
    pad = nb * block - N
    kr, vr = _rows(k, H), _rows(v, H)  # [R, N, K]
    if pad:
        kr, vr = torch.nn.functional.pad(kr, (0, 0, 0, pad)), torch.nn.functional.pad(vr, (0, 0, 0, pad))
    kt, vt = kr.reshape(-1, block, K), vr.reshape(-1, block, K)
    idx = _rows(index, H)  # [R, N, S]
    base = torch.arange(B * H, device=q.device)[:, None, None] * nb
    flat = (idx.clamp(min=0) + base).reshape(B * H, N * S)
    offs = torch.arange(block, device=q.device)
    qr = q.reshape(B * H, N, K)
    out = []
    for t0 in range(0, N, chunk):
        t1 = min(N, t0 + chunk)
        ids = flat[:, t0 * S : t1 * S].reshape(-1)
        ks = kt.index_select(0, ids).view(B * H, t1 - t0, S * block, K)
        vs = vt.index_select(0, ids).view(B * H, t1 - t0, S * block, K)
        key_pos = (idx[:, t0:t1, :, None] * block + offs).reshape(B * H, t1 - t0, S * block)
        t = torch.arange(t0, t1, device=q.device)[None, :, None]
        ok = (idx[:, t0:t1, :, None] >= 0).expand(-1, -1, -1, block).reshape_as(key_pos) & (key_pos <= t)
        s = (qr[:, t0:t1, None, :] @ ks.transpose(-1, -2)).squeeze(2).float() * K**-0.5
        p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
        out.append((p.to(q.dtype)[:, :, None, :] @ vs).squeeze(2))
    return torch.cat(out, 1).view(B, H, N, K)


def causal_window(q, k, v, window: int, chunk: int = 256):
    """Sliding-window causal attention, chunked over queries: each chunk sees only its band of keys."""
    B, H, N, K = q.shape
    kr, vr = _rows(k, H).view(B, H, N, K), _rows(v, H).view(B, H, N, K)
    out = []
    for t0 in range(0, N, chunk):
        t1 = min(N, t0 + chunk)
        k0 = max(0, t0 - window + 1)
        t = torch.arange(t0, t1, device=q.device)[:, None]
        j = torch.arange(k0, t1, device=q.device)[None, :]
        mask = (j <= t) & (t - j < window)
        out.append(sdpa(q[:, :, t0:t1], kr[:, :, k0:t1], vr[:, :, k0:t1], attn_mask=mask))  # fp32 under CPU bf16
    return torch.cat(out, 2)
