"""Native Sparse Attention in Triton: one block-sparse FlashAttention (forward + backward) serves both branches.

* Selected branch: query block i (a cube of V tokens) attends to the S KV blocks listed in index[b, hkv, i].
* Compressed branch: every query block attends to all NB compressed keys, which is the same kernel with an
  index listing every tile of compressed keys.
* Block scores for the selection: a second pass over the compressed keys with the saved log-sum-exp sums the
  probabilities over each query cube (importance per notes: probabilities, not logits).
* Backward: dQ in the query-block program (loops over its S blocks); dK/dV in a program per KV block that walks
  the query blocks which selected it, from a sorted inverted index (CSR): deterministic, no float atomics.

GQA: G = H / Hkv query heads share kv head h // G and its selection. Shapes: q [B, H, Nq, D], k, v
[B, Hkv, Nk, D], contiguous; D a power of two >= 16; block sizes powers of two >= 16 (tl.dot tiles).
Causal 1D (LM): selection is per token, shared by the G query heads of a GQA group, so a program takes one
token and stacks its group's heads as the rows of the query tile (padded to 16 rows for tl.dot), as the NSA
paper's kernel does; keys after the token are masked. dK/dV walk the tokens that selected each KV block
from the same CSR inverted index.

Naming (fla style): i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ blocks in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import on_tensor_device


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, IDX, sm_scale, NQ, NK, NQB, S, H, HKV,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr):
    i_qb, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv = i_h // (H // HKV)
    p_q = Q + i_bh.to(tl.int64) * NQ * D
    p_k = K + (i_b * HKV + i_hkv).to(tl.int64) * NK * D
    p_v = V + (i_b * HKV + i_hkv).to(tl.int64) * NK * D
    p_idx = IDX + ((i_b * HKV + i_hkv) * NQB + i_qb).to(tl.int64) * S
    o_q = i_qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_d = tl.arange(0, D)
    m_q = o_q < NQ
    b_q = tl.load(p_q + o_q[:, None] * D + o_d[None, :], mask=m_q[:, None], other=0.0)
    b_m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_Q], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_Q, D], dtype=tl.float32)
    for s in range(S):
        i_kb = tl.load(p_idx + s)
        o_k = i_kb * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = o_k < NK
        b_k = tl.load(p_k + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k)) * sm_scale  # [BLOCK_Q, BLOCK_K]
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # online softmax (FlashAttention-2)
        b_p = tl.exp(b_s - b_m_new[:, None])
        b_alpha = tl.exp(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_m_new
    b_o = b_acc / b_l[:, None]
    tl.store(O + i_bh.to(tl.int64) * NQ * D + o_q[:, None] * D + o_d[None, :], b_o.to(O.dtype.element_ty), mask=m_q[:, None])
    tl.store(LSE + i_bh.to(tl.int64) * NQ + o_q, b_m + tl.log(b_l), mask=m_q)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, IDX, sm_scale, NQ, NK, NQB, S, H, HKV,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr):
    i_qb, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv = i_h // (H // HKV)
    p_k = K + (i_b * HKV + i_hkv).to(tl.int64) * NK * D
    p_v = V + (i_b * HKV + i_hkv).to(tl.int64) * NK * D
    p_idx = IDX + ((i_b * HKV + i_hkv) * NQB + i_qb).to(tl.int64) * S
    o_q = i_qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_d = tl.arange(0, D)
    m_q = o_q < NQ
    o_qd = i_bh.to(tl.int64) * NQ * D + o_q[:, None] * D + o_d[None, :]
    b_q = tl.load(Q + o_qd, mask=m_q[:, None], other=0.0)
    b_do = tl.load(DO + o_qd, mask=m_q[:, None], other=0.0)
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * NQ + o_q, mask=m_q, other=0.0)
    b_delta = tl.load(DELTA + i_bh.to(tl.int64) * NQ + o_q, mask=m_q, other=0.0)
    b_dq = tl.zeros([BLOCK_Q, D], dtype=tl.float32)
    for s in range(S):
        i_kb = tl.load(p_idx + s)
        o_k = i_kb * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = o_k < NK
        b_k = tl.load(p_k + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k)) * sm_scale
        b_p = tl.where(m_k[None, :], tl.exp(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])  # dS = P * (dP - rowsum(dO * O))
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    tl.store(DQ + o_qd, (b_dq * sm_scale).to(DQ.dtype.element_ty), mask=m_q[:, None])


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, OFFSETS, QBLOCKS, sm_scale, NQ, NK, NKB, H, HKV,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr):
    i_kb, i_bhkv = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bhkv // HKV, i_bhkv % HKV
    G = H // HKV
    o_k = i_kb * BLOCK_K + tl.arange(0, BLOCK_K)
    o_d = tl.arange(0, D)
    m_k = o_k < NK
    o_kd = i_bhkv.to(tl.int64) * NK * D + o_k[:, None] * D + o_d[None, :]
    b_k = tl.load(K + o_kd, mask=m_k[:, None], other=0.0)
    b_v = tl.load(V + o_kd, mask=m_k[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    row = i_bhkv * NKB + i_kb
    start = tl.load(OFFSETS + row)
    end = tl.load(OFFSETS + row + 1)
    for e in range(start, end):  # the query blocks that selected this KV block, ascending: a fixed sum order
        i_qb = tl.load(QBLOCKS + e)
        o_q = i_qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        m_q = o_q < NQ
        for g in range(G):
            i_bh = i_b * H + i_hkv * G + g
            o_qd = i_bh.to(tl.int64) * NQ * D + o_q[:, None] * D + o_d[None, :]
            b_q = tl.load(Q + o_qd, mask=m_q[:, None], other=0.0)
            b_do = tl.load(DO + o_qd, mask=m_q[:, None], other=0.0)
            b_lse = tl.load(LSE + i_bh.to(tl.int64) * NQ + o_q, mask=m_q, other=0.0)
            b_delta = tl.load(DELTA + i_bh.to(tl.int64) * NQ + o_q, mask=m_q, other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_k)) * sm_scale
            b_p = tl.where(m_q[:, None] & m_k[None, :], tl.exp(b_s - b_lse[:, None]), 0.0)
            b_dv += tl.dot(tl.trans(b_p).to(b_do.dtype), b_do)
            b_dp = tl.dot(b_do, tl.trans(b_v))
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q)
    tl.store(DK + o_kd, (b_dk * sm_scale).to(DK.dtype.element_ty), mask=m_k[:, None])
    tl.store(DV + o_kd, b_dv.to(DV.dtype.element_ty), mask=m_k[:, None])


@triton.jit
def _scores_kernel(Q, KC, LSE, SCORES, sm_scale, NQ, NC, H, HKV,
                   BLOCK_Q: tl.constexpr, TILE_Q: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr):
    """scores[b, h, i, j] = sum over the queries of block i of softmax(q kc^T)[j], from the saved lse; the block's
    queries in tiles of TILE_Q rows (a whole cube of 256 tokens would not fit one tile's registers)."""
    i_qb, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv = i_h // (H // HKV)
    o_d = tl.arange(0, D)
    p_kc = KC + (i_b * HKV + i_hkv).to(tl.int64) * NC * D
    p_out = SCORES + (i_bh.to(tl.int64) * tl.cdiv(NQ, BLOCK_Q) + i_qb) * NC
    for c0 in range(0, NC, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < NC
        b_kc = tl.load(p_kc + o_c[:, None] * D + o_d[None, :], mask=m_c[:, None], other=0.0)
        b_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
        # the sum stays in registers: adding to the stored sums of earlier query tiles instead would read what
        # other threads of the program wrote, with no barrier between (a race on a GPU, invisible to the interpreter)
        for q0 in range(0, BLOCK_Q, TILE_Q):
            o_q = i_qb * BLOCK_Q + q0 + tl.arange(0, TILE_Q)
            m_q = o_q < NQ
            b_q = tl.load(Q + i_bh.to(tl.int64) * NQ * D + o_q[:, None] * D + o_d[None, :], mask=m_q[:, None], other=0.0)
            b_lse = tl.load(LSE + i_bh.to(tl.int64) * NQ + o_q, mask=m_q, other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_kc)) * sm_scale
            b_p = tl.where(m_q[:, None] & m_c[None, :], tl.exp(b_s - b_lse[:, None]), 0.0)
            b_sum += tl.sum(b_p, 0)
        tl.store(p_out + o_c, b_sum, mask=m_c)


# ---- causal 1D: per-token selection, one program per (token, kv head) ----------------------------------------
@triton.jit
def _token_group_rows(i_b, i_hkv, i_t, H, N, G: tl.constexpr, GP: tl.constexpr):
    """The rows (head, token) in [B*H*N] of token i_t's GQA group as one tile of GP >= 16 rows, and their mask."""
    o_g = tl.arange(0, GP)
    return (i_b * H + i_hkv * G + o_g).to(tl.int64) * N + i_t, o_g < G


@triton.jit
def _causal_fwd_kernel(Q, K, V, O, LSE, IDX, sm_scale, N, S, H, HKV,
                       G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    i_t, i_bhkv = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bhkv // HKV, i_bhkv % HKV
    o_row, m_g = _token_group_rows(i_b, i_hkv, i_t, H, N, G, GP)  # the group's query heads: rows of the tile
    o_d = tl.arange(0, D)
    b_q = tl.load(Q + o_row[:, None] * D + o_d[None, :], mask=m_g[:, None], other=0.0)
    p_k = K + i_bhkv.to(tl.int64) * N * D
    p_v = V + i_bhkv.to(tl.int64) * N * D
    p_idx = IDX + (i_bhkv.to(tl.int64) * N + i_t) * S
    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    b_acc = tl.zeros([GP, D], dtype=tl.float32)
    for s in range(S):
        i_kb = tl.load(p_idx + s)  # -1: an unused slot, every key masked
        o_k = i_kb * BLOCK + tl.arange(0, BLOCK)
        m_k = (o_k <= i_t) & (i_kb >= 0)  # causal: o_k < N follows from o_k <= i_t
        b_k = tl.load(p_k + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_s = tl.where(m_k[None, :], tl.dot(b_q, tl.trans(b_k)) * sm_scale, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # no keys yet: exp(-inf - 0) = 0, not NaN
        b_p = tl.exp(b_s - b_m_safe[:, None])
        b_alpha = tl.exp(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_m_new
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # a token with no visible key gets 0, as in the CPU path
    tl.store(O + o_row[:, None] * D + o_d[None, :], b_o.to(O.dtype.element_ty), mask=m_g[:, None])
    tl.store(LSE + o_row, b_m + tl.log(b_l), mask=m_g)


@triton.jit
def _causal_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, IDX, sm_scale, N, S, H, HKV,
                          G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    i_t, i_bhkv = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bhkv // HKV, i_bhkv % HKV
    o_row, m_g = _token_group_rows(i_b, i_hkv, i_t, H, N, G, GP)
    o_d = tl.arange(0, D)
    o_qd = o_row[:, None] * D + o_d[None, :]
    b_q = tl.load(Q + o_qd, mask=m_g[:, None], other=0.0)
    b_do = tl.load(DO + o_qd, mask=m_g[:, None], other=0.0)
    b_lse = tl.load(LSE + o_row, mask=m_g, other=0.0)
    b_delta = tl.load(DELTA + o_row, mask=m_g, other=0.0)
    p_k = K + i_bhkv.to(tl.int64) * N * D
    p_v = V + i_bhkv.to(tl.int64) * N * D
    p_idx = IDX + (i_bhkv.to(tl.int64) * N + i_t) * S
    b_dq = tl.zeros([GP, D], dtype=tl.float32)
    for s in range(S):
        i_kb = tl.load(p_idx + s)
        o_k = i_kb * BLOCK + tl.arange(0, BLOCK)
        m_k = (o_k <= i_t) & (i_kb >= 0)
        b_k = tl.load(p_k + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k)) * sm_scale
        b_p = tl.where(m_g[:, None] & m_k[None, :], tl.exp(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    tl.store(DQ + o_qd, (b_dq * sm_scale).to(DQ.dtype.element_ty), mask=m_g[:, None])


@triton.jit
def _causal_bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, OFFSETS, TOKENS, sm_scale, N, NKB, H, HKV,
                           G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    i_kb, i_bhkv = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bhkv // HKV, i_bhkv % HKV
    o_d = tl.arange(0, D)
    o_k = i_kb * BLOCK + tl.arange(0, BLOCK)
    o_kd = i_bhkv.to(tl.int64) * N * D + o_k[:, None] * D + o_d[None, :]
    b_k = tl.load(K + o_kd, mask=(o_k < N)[:, None], other=0.0)
    b_v = tl.load(V + o_kd, mask=(o_k < N)[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK, D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK, D], dtype=tl.float32)
    row = i_bhkv * NKB + i_kb
    start = tl.load(OFFSETS + row)
    end = tl.load(OFFSETS + row + 1)
    for e in range(start, end):  # the tokens that selected this block, ascending: a fixed sum order
        i_t = tl.load(TOKENS + e)
        o_row, m_g = _token_group_rows(i_b, i_hkv, i_t, H, N, G, GP)
        o_qd = o_row[:, None] * D + o_d[None, :]
        b_q = tl.load(Q + o_qd, mask=m_g[:, None], other=0.0)
        b_do = tl.load(DO + o_qd, mask=m_g[:, None], other=0.0)
        b_lse = tl.load(LSE + o_row, mask=m_g, other=0.0)
        b_delta = tl.load(DELTA + o_row, mask=m_g, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k)) * sm_scale
        b_p = tl.where(m_g[:, None] & (o_k <= i_t)[None, :], tl.exp(b_s - b_lse[:, None]), 0.0)
        b_dv += tl.dot(tl.trans(b_p).to(b_do.dtype), b_do)
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q)
    tl.store(DK + o_kd, (b_dk * sm_scale).to(DK.dtype.element_ty), mask=(o_k < N)[:, None])
    tl.store(DV + o_kd, b_dv.to(DV.dtype.element_ty), mask=(o_k < N)[:, None])


# ---- host side ----------------------------------------------------------------------------------------------
MAX_TILE = 64  # the most query or key rows of one tl.dot tile: larger cubes run as several tiles (tile_index)
FILL_NAN = False  # tests set this: outputs start as NaN, so a tile a kernel forgets to write cannot pass


def _empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    out = torch.empty_like(x, dtype=dtype)
    return out.fill_(float("nan")) if FILL_NAN else out


def _tileable(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def shapes_ok(head_dim: int, *blocks: int) -> bool:
    """Whether the kernels' tl.dot tiles fit: a power-of-two head dim and blocks, each >= 16."""
    return all(_tileable(n) for n in (head_dim, *blocks))


def _check(q: torch.Tensor, *blocks: int):
    D = q.shape[-1]
    if not _tileable(D):
        raise ValueError(f"the Triton NSA kernels need a power-of-two head dim >= 16, got {D}")
    for b in blocks:
        if not _tileable(b):
            raise ValueError(f"the Triton NSA kernels need power-of-two blocks of >= 16 tokens, got {b}")


def inverted_index(index: torch.Tensor, nkb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of index [B, Hkv, NQB, S] by KV block: offsets [B*Hkv*NKB + 1] and the selecting query blocks,
    ascending within each KV block (stable sort), so every dK/dV sum runs in one fixed order."""
    R, nqb, S = index.shape[0] * index.shape[1], index.shape[2], index.shape[3]
    flat = index.reshape(R, nqb * S).long()
    keys = flat + torch.arange(R, device=index.device)[:, None] * nkb
    qblk = torch.arange(nqb, device=index.device).repeat_interleave(S).expand(R, -1)
    valid = flat >= 0
    keys, qblk = keys[valid], qblk[valid]
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=R * nkb)
    offsets = torch.zeros(R * nkb + 1, dtype=torch.int32, device=index.device)
    offsets[1:] = counts.cumsum(0)
    return offsets, qblk[order].to(torch.int32).contiguous()


def sparse_fwd(q, k, v, index, block_q: int, block_k: int):
    """o [B, H, Nq, D] and lse [B, H, Nq] (fp32) of block-sparse attention; index [B, Hkv, ceil(Nq/block_q), S]."""
    _check(q, block_q, block_k)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, NQ, D = q.shape
    HKV, NK = k.shape[1], k.shape[2]
    nqb, S = index.shape[2], index.shape[3]
    o = _empty_like(q)
    lse = _empty_like(q[..., 0], dtype=torch.float32)
    idx = index.to(torch.int32).contiguous()
    _fwd_kernel[(nqb, B * H)](q, k, v, o, lse, idx, D**-0.5, NQ, NK, nqb, S, H, HKV,
                              BLOCK_Q=block_q, BLOCK_K=block_k, D=D)
    return o, lse


def sparse_bwd(do, q, k, v, o, lse, index, block_q: int, block_k: int):
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    B, H, NQ, D = q.shape
    HKV, NK = k.shape[1], k.shape[2]
    nqb, S = index.shape[2], index.shape[3]
    nkb = triton.cdiv(NK, block_k)
    delta = (o.float() * do.float()).sum(-1).contiguous()
    idx = index.to(torch.int32).contiguous()
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    _bwd_dq_kernel[(nqb, B * H)](q, k, v, do, lse, delta, dq, idx, D**-0.5, NQ, NK, nqb, S, H, HKV,
                                 BLOCK_Q=block_q, BLOCK_K=block_k, D=D)
    offsets, qblocks = inverted_index(index, nkb)
    _bwd_dkv_kernel[(nkb, B * HKV)](q, k, v, do, lse, delta, dk, dv, offsets, qblocks, D**-0.5, NQ, NK, nkb, H, HKV,
                                    BLOCK_Q=block_q, BLOCK_K=block_k, D=D)
    return dq, dk, dv


def max_tile(q: torch.Tensor) -> int:
    """The most query or key rows of one tile: MAX_TILE, halved for rows of more than 256 bytes (fp32 at head dim
    128 needs 198 KB of shared memory at 64 rows, over an A100's 163 KB: `python -m kernels.compile_check`)."""
    return MAX_TILE if q.shape[-1] * q.element_size() <= 256 else max(16, MAX_TILE // 2)


def _tile(n: int, most: int) -> int:
    """Tile for the compressed keys: the smallest power of two >= n, between 16 and `most`."""
    return max(16, min(most, triton.next_power_of_2(n)))


def dense_index(B: int, hkv: int, nqb: int, nk: int, tile: int, device) -> torch.Tensor:
    return torch.arange(triton.cdiv(nk, tile), device=device, dtype=torch.int32).expand(B, hkv, nqb, -1)


@on_tensor_device
def compressed_fwd(q, k_cmp, v_cmp, block: int):
    """o [B, H, N, D], lse [B, H, N] and scores [B, H, N // block, NB] (fp32) of the compressed branch."""
    B, H, N, D = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    most = max_tile(q)
    tile = _tile(nc, most)
    o, lse = sparse_fwd(q, k_cmp, v_cmp, dense_index(B, hkv, triton.cdiv(N, most), nc, tile, q.device), most, tile)
    _check(q, block)
    scores = torch.empty(B, H, N // block, nc, dtype=torch.float32, device=q.device)
    if FILL_NAN:
        scores.fill_(float("nan"))
    _scores_kernel[(N // block, B * H)](q.contiguous(), k_cmp.contiguous(), lse, scores, D**-0.5, N, nc, H, hkv,
                                        BLOCK_Q=block, TILE_Q=min(block, most), BLOCK_C=tile, D=D)
    return o, lse, scores


@on_tensor_device
def compressed_bwd(do, q, k_cmp, v_cmp, o, lse):
    B, H, N, D = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    most = max_tile(q)
    tile = _tile(nc, most)
    index = dense_index(B, hkv, triton.cdiv(N, most), nc, tile, q.device)
    return sparse_bwd(do, q, k_cmp, v_cmp, o, lse, index, most, tile)


def tile_index(index: torch.Tensor, block: int, most: int = MAX_TILE) -> tuple[torch.Tensor, int]:
    """index [B, Hkv, NQB, S] over cubes of `block` tokens -> the same selection over tiles of at most `most`
    tokens, [B, Hkv, NQB R, S R] with R = block / tile: each query tile of cube i attends to every tile of
    the cubes i selected. (One tile per cube of 256 tokens needs 397 KB of shared memory in dK/dV, more than
    an H100 has: `python -m kernels.compile_check`.)"""
    tile = min(block, most)
    R = block // tile
    if R == 1:
        return index, tile
    B, hkv, nqb, S = index.shape
    tiles = (index[..., None] * R + torch.arange(R, device=index.device, dtype=index.dtype)).reshape(B, hkv, nqb, S * R)
    return tiles.repeat_interleave(R, dim=2), tile


def _whole_cubes(k: torch.Tensor, block: int):
    if k.shape[2] % block:  # tile_index numbers the tiles of whole cubes
        raise ValueError(f"{k.shape[2]} keys do not split into cubes of {block}")


@on_tensor_device
def selected_fwd(q, k, v, index, block: int):
    _whole_cubes(k, block)
    index, tile = tile_index(index, block, max_tile(q))
    return sparse_fwd(q, k, v, index, tile, tile)


@on_tensor_device
def selected_bwd(do, q, k, v, o, lse, index, block: int):
    _whole_cubes(k, block)
    index, tile = tile_index(index, block, max_tile(q))
    return sparse_bwd(do, q, k, v, o, lse, index, tile, tile)


def _group_rows(H: int, hkv: int) -> tuple[int, int]:
    G = H // hkv
    return G, max(16, triton.next_power_of_2(G))


@on_tensor_device
def causal_selected_fwd(q, k, v, index, block: int):
    """o [B, H, N, D] and lse [B, H, N] (fp32) of causal per-token selected attention; index [B, Hkv, N, S]
    (KV block ids, -1 = unused slot)."""
    _check(q, block)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, D = q.shape
    hkv, S = k.shape[1], index.shape[-1]
    G, GP = _group_rows(H, hkv)
    o = _empty_like(q)
    lse = _empty_like(q[..., 0], dtype=torch.float32)
    idx = index.to(torch.int32).contiguous()
    _causal_fwd_kernel[(N, B * hkv)](q, k, v, o, lse, idx, D**-0.5, N, S, H, hkv, G=G, GP=GP, BLOCK=block, D=D)
    return o, lse


@on_tensor_device
def causal_selected_bwd(do, q, k, v, o, lse, index, block: int):
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    B, H, N, D = q.shape
    hkv, S = k.shape[1], index.shape[-1]
    G, GP = _group_rows(H, hkv)
    nkb = triton.cdiv(N, block)
    delta = (o.float() * do.float()).sum(-1).contiguous()
    idx = index.to(torch.int32).contiguous()
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    _causal_bwd_dq_kernel[(N, B * hkv)](q, k, v, do, lse, delta, dq, idx, D**-0.5, N, S, H, hkv,
                                        G=G, GP=GP, BLOCK=block, D=D)
    offsets, tokens = inverted_index(index, nkb)  # "query blocks" here are single tokens
    _causal_bwd_dkv_kernel[(nkb, B * hkv)](q, k, v, do, lse, delta, dk, dv, offsets, tokens, D**-0.5, N, nkb, H, hkv,
                                           G=G, GP=GP, BLOCK=block, D=D)
    return dq, dk, dv
