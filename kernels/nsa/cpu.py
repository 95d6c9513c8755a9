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

GATHER_BYTES = 48 << 20  # size of the gathered K (and V) blocks per chunk: big GEMMs, small cache footprint


def _rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B * H, ...] with each kv head repeated for its G query heads (no copy when G = 1)."""
    if x.shape[1] != heads:
        x = x.repeat_interleave(heads // x.shape[1], dim=1)
    return x.reshape(-1, *x.shape[2:])


def _unrows(dx: torch.Tensor, B: int, hkv: int) -> torch.Tensor:
    """Gradient of _rows: [B * H, ...] -> [B, Hkv, ...], summing over each group's heads."""
    dx = dx.view(B, hkv, -1, *dx.shape[1:])
    return dx.sum(2)


def _chunk(rows: int, per_row_bytes: int) -> int:
    return max(1, min(rows, GATHER_BYTES // max(per_row_bytes, 1)))


# ---- compressed branch: every query against the NB compressed keys, with the block scores fused in ---------
def compressed_fwd(q, k_cmp, v_cmp, block: int):
    """q: [B, H, N, K]; k_cmp, v_cmp: [B, Hkv, NB, K]. Returns o [B, H, N, K], lse [B, H, N] (fp32) and
    scores [B, H, N // block, NB] (fp32): the probabilities summed over each query block."""
    B, H, N, K = q.shape
    scale = K**-0.5
    qr, kr, vr = q.reshape(B * H, N, K), _rows(k_cmp, H), _rows(v_cmp, H)
    nb = kr.shape[1]
    o = torch.empty_like(qr)
    lse = torch.empty(B * H, N, dtype=torch.float32)
    scores = torch.empty(B * H, N // block, nb, dtype=torch.float32)
    step = _chunk(B * H, N * nb * 4)
    for r in range(0, B * H, step):
        s = (qr[r : r + step] @ kr[r : r + step].transpose(1, 2)).float() * scale  # [c, N, NB]
        m = s.logsumexp(-1)
        p = (s - m[..., None]).exp_()
        o[r : r + step] = (p.to(q.dtype) @ vr[r : r + step]).to(o.dtype)
        lse[r : r + step] = m
        scores[r : r + step] = p.view(p.shape[0], N // block, block, nb).sum(2)
    return o.view(B, H, N, K), lse.view(B, H, N), scores.view(B, H, N // block, nb)


def compressed_bwd(do, q, k_cmp, v_cmp, o, lse):
    B, H, N, K = q.shape
    hkv = k_cmp.shape[1]
    scale = K**-0.5
    qr, kr, vr = q.reshape(B * H, N, K), _rows(k_cmp, H), _rows(v_cmp, H)
    dor, lser = do.reshape(B * H, N, K), lse.reshape(B * H, N)
    delta = (do.float() * o.float()).sum(-1).reshape(B * H, N)  # rowsum(dO * O) = sum_j P_ij dP_ij
    dq, dk, dv = torch.empty_like(qr), torch.empty_like(kr), torch.empty_like(vr)
    step = _chunk(B * H, N * kr.shape[1] * 4)
    for r in range(0, B * H, step):
        sl = slice(r, r + step)
        s = (qr[sl] @ kr[sl].transpose(1, 2)).float() * scale
        p = (s - lser[sl, :, None]).exp_()  # [c, N, NB]
        dv[sl] = (p.transpose(1, 2).to(q.dtype) @ dor[sl]).to(dv.dtype)
        dp = (dor[sl] @ vr[sl].transpose(1, 2)).float()
        ds = p.mul_(dp - delta[sl, :, None]).mul_(scale).to(q.dtype)
        dq[sl] = ds @ kr[sl]
        dk[sl] = ds.transpose(1, 2) @ qr[sl]
    return dq.view_as(q), _unrows(dk, B, hkv), _unrows(dv, B, hkv)


# ---- selected branch: block-sparse attention over S KV blocks per query block -------------------------------
def _flat_index(index: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, NQB, S] block indices -> [B * H, NQB * S] indices into the flattened [B * H * NB] block table."""
    B, hkv, nqb, S = index.shape
    idx = _rows(index, heads).view(B * heads, nqb * S)
    return idx + torch.arange(B * heads, device=idx.device)[:, None] * nqb  # NB == NQB: same blocks for q and kv


def selected_fwd(q, k, v, index, block: int):
    """q: [B, H, N, K]; k, v: [B, Hkv, N, K]; index: [B, Hkv, NB, S]. Returns o [B, H, N, K], lse [B, H, N]."""
    B, H, N, K = q.shape
    nb, S = N // block, index.shape[-1]
    scale = K**-0.5
    qb = q.reshape(B * H, nb, block, K)
    kt, vt = _rows(k, H).reshape(-1, block, K), _rows(v, H).reshape(-1, block, K)  # block tables [R*NB, V, K]
    flat = _flat_index(index, H)
    o = torch.empty_like(qb)
    lse = torch.empty(B * H, nb, block, dtype=torch.float32)
    step = _chunk(B * H, nb * S * block * K * q.element_size())
    for r in range(0, B * H, step):
        c = min(step, B * H - r)
        ids = flat[r : r + c].reshape(-1)
        ks = kt.index_select(0, ids).view(c, nb, S * block, K)
        vs = vt.index_select(0, ids).view(c, nb, S * block, K)
        s = (qb[r : r + c] @ ks.transpose(-1, -2)).float() * scale  # [c, NB, V, S*V]
        m = s.logsumexp(-1)
        p = (s - m[..., None]).exp_()
        o[r : r + c] = (p.to(q.dtype) @ vs).to(o.dtype)
        lse[r : r + c] = m
    return o.view(B, H, N, K), lse.view(B, H, N)


def selected_bwd(do, q, k, v, o, lse, index, block: int):
    B, H, N, K = q.shape
    hkv = k.shape[1]
    nb, S = N // block, index.shape[-1]
    scale = K**-0.5
    qb, dob = q.reshape(B * H, nb, block, K), do.reshape(B * H, nb, block, K)
    lseb = lse.reshape(B * H, nb, block)
    delta = (do.float() * o.float()).sum(-1).reshape(B * H, nb, block)
    kt, vt = _rows(k, H).reshape(-1, block, K), _rows(v, H).reshape(-1, block, K)
    flat = _flat_index(index, H)
    dq = torch.empty_like(qb)
    dkt = torch.zeros(kt.shape, dtype=torch.float32)  # accumulated over the query blocks that chose each block
    dvt = torch.zeros(vt.shape, dtype=torch.float32)
    step = _chunk(B * H, nb * S * block * K * q.element_size())
    for r in range(0, B * H, step):
        c = min(step, B * H - r)
        ids = flat[r : r + c].reshape(-1)
        ks = kt.index_select(0, ids).view(c, nb, S * block, K)
        vs = vt.index_select(0, ids).view(c, nb, S * block, K)
        s = (qb[r : r + c] @ ks.transpose(-1, -2)).float() * scale
        p = (s - lseb[r : r + c, ..., None]).exp_()  # [c, NB, V, S*V]
        dvs = p.transpose(-1, -2).to(q.dtype) @ dob[r : r + c]  # [c, NB, S*V, K]
        dp = (dob[r : r + c] @ vs.transpose(-1, -2)).float()
        ds = p.mul_(dp - delta[r : r + c, ..., None]).mul_(scale).to(q.dtype)
        dq[r : r + c] = ds @ ks
        dks = ds.transpose(-1, -2) @ qb[r : r + c]
        dkt.index_add_(0, ids, dks.reshape(-1, block, K).float())
        dvt.index_add_(0, ids, dvs.reshape(-1, block, K).float())
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
    base = torch.arange(B * H)[:, None, None] * nb
    flat = (idx.clamp(min=0) + base).reshape(B * H, N * S)
    offs = torch.arange(block)
    qr = q.reshape(B * H, N, K)
    out = []
    for t0 in range(0, N, chunk):
        t1 = min(N, t0 + chunk)
        ids = flat[:, t0 * S : t1 * S].reshape(-1)
        ks = kt.index_select(0, ids).view(B * H, t1 - t0, S * block, K)
        vs = vt.index_select(0, ids).view(B * H, t1 - t0, S * block, K)
        key_pos = (idx[:, t0:t1, :, None] * block + offs).reshape(B * H, t1 - t0, S * block)
        t = torch.arange(t0, t1)[None, :, None]
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
        t = torch.arange(t0, t1)[:, None]
        j = torch.arange(k0, t1)[None, :]
        mask = (j <= t) & (t - j < window)
        out.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, t0:t1], kr[:, :, k0:t1], vr[:, :, k0:t1], attn_mask=mask))
    return torch.cat(out, 2)
