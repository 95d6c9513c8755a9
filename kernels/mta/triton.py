"""Multi-Token Attention in Triton: fused forward and backward that never hold an S x S matrix.

Every score tile is recomputed from Q, K, V, dO and per-row statistics (O(S) memory: lse and delta per row and
head), by one program per (row tile, batch) that holds all H heads (the head mixing needs them together).
Eq. numbers are the steps of reference.py / ../shared/notes/mta.md.

The trick that avoids shifting tiles in registers (Triton cannot): both key-query convolutions act on a
product of two matrices, so a shift of the score plane is a shift of the rows that are loaded.
  pre-softmax  (2): B[r, c]  = sum_ij w1[i, j] q[r+i-T1] . k[c+j-L1]  = sum_i q_i[r] . (sum_j w1[i, j] k_j)[c]
  post-softmax (5) and P V: sum_c D[r, c] v[c] = sum_ij w2[i, j] sum_c' P[r+i-T2, c'] v[c'-j+L2]
so a P tile at a shifted row origin is recomputed (from Q, K and lse), and the column shift lands on V.
The same holds for every pass: a sum over taps of (tile) @ (rows shifted by the tap) is one tl.dot with the
kernel row applied to the loaded rows (_weighted_rows). Causal masks (scores before (2) and after (5))
depend on the tap, so tiles near the diagonal take the per-tap form (one masked tl.dot per tap) and tiles
below it the factored form; the post-convolution weight gradient needs every tap's product separately.

Passes (grid: row or column tiles x batch):
  forward   _stats   lse[h, r] over all keys (online softmax of the mixed scores C, eq. 3-4)
            _post    O = W2 (conv_post(P)) V, P recomputed at the c_q row shifts of the post convolution
  backward  _delta   delta[h, r] = sum_c P dP, with dP (the adjoint of (5), (6) and P V) from dO and V directly
            _post    (BWD) the post-convolution kernel and head-convolution gradients
            _dq      dq, and the pre-convolution kernel and head-mixing gradients, dB at the c_q row shifts
            _dk      dk, dB at the c_k column shifts;   _dv   dv, P at the c_k column shifts
Weight gradients are per-program partial sums added on the host: deterministic, no atomics.

Loops over heads and taps are runtime loops (not unrolled): a 6 x 11 kernel with 8 heads would otherwise
unroll into thousands of tl.dot calls per kernel.
Cost: a tile is recomputed c_q (forward) or c_q / c_k (backward) times; the fused kernel trades FLOPs for
memory. Shapes: q, k, v [B, H, S, D]; H and D powers of two (D >= 16); any S.
Naming (fla style): i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ blocks in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import on_tensor_device

from .reference import kq_padding

BLOCK = 16  # rows and columns of a score tile: small, since a program holds H of them


# ---- building blocks -------------------------------------------------------------------------------------------
@triton.jit
def _rows(p, o_rows, S, D: tl.constexpr):
    """Rows o_rows of a [S, D] matrix in fp32; rows outside [0, S) are the zero padding of the score plane."""
    o_d = tl.arange(0, D)
    m = (o_rows >= 0) & (o_rows < S)
    return tl.load(p + o_rows[:, None] * D + o_d[None, :], mask=m[:, None], other=0.0).to(tl.float32)


@triton.jit
def _pick(x, h, H: tl.constexpr):
    """x[h] of an [H, ...] block (a head out of the registers of all heads)."""
    return tl.sum(tl.where((tl.arange(0, H) == h)[:, None, None], x, 0.0), 0)


@triton.jit
def _bilinear_conv(p_x, p_y, p_w, r0, c0, S, SIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   D: tl.constexpr, CQ: tl.constexpr, CK: tl.constexpr, T: tl.constexpr, L: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """sum_ij w[i, j] x[r + SIGN(i-T)] . y[c + SIGN(j-L)], masked to key <= query per tap when causal, on the
    tile rows r0 + [0, BM), columns c0 + [0, BN). SIGN = 1: the pre-softmax conv of Q K^T (2); SIGN = -1: dP
    from dO V^T, the adjoint of the post-softmax conv (5)."""
    o_r = r0 + tl.arange(0, BM)
    o_c = c0 + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if CAUSAL:
        # below the diagonal band no tap is masked: the factored form is exact there
        j_max = (CK - 1 - L) if SIGN > 0 else L
        i_min = -T if SIGN > 0 else -(CQ - 1 - T)
        if c0 + (BN - 1 + j_max) <= r0 + i_min:
            acc = _bilinear_factored(p_x, p_y, p_w, o_r, o_c, S, SIGN, BN, D, CQ, CK, T, L, acc)
        else:
            for i in range(CQ):
                b_x = _rows(p_x, o_r + SIGN * (i - T), S, D)
                for j in range(CK):
                    b_s = tl.dot(b_x, tl.trans(_rows(p_y, o_c + SIGN * (j - L), S, D)))
                    m = (o_c + SIGN * (j - L))[None, :] <= (o_r + SIGN * (i - T))[:, None]
                    acc += tl.load(p_w + i * CK + j) * tl.where(m, b_s, 0.0)
    else:
        acc = _bilinear_factored(p_x, p_y, p_w, o_r, o_c, S, SIGN, BN, D, CQ, CK, T, L, acc)
    return acc


@triton.jit
def _bilinear_factored(p_x, p_y, p_w, o_r, o_c, S, SIGN: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                       CQ: tl.constexpr, CK: tl.constexpr, T: tl.constexpr, L: tl.constexpr, acc):
    for i in range(CQ):
        b_y = _weighted_rows(p_y, o_c, S, p_w + i * CK, 1, CK, SIGN, L, BN, D)  # y convolved with kernel row i
        acc += tl.dot(_rows(p_x, o_r + SIGN * (i - T), S, D), tl.trans(b_y))
    return acc


@triton.jit
def _weighted_rows(p, o_rows, S, p_w, W_STRIDE: tl.constexpr, N: tl.constexpr, SIGN: tl.constexpr, OFF: tl.constexpr,
                   BR: tl.constexpr, D: tl.constexpr):
    """sum_t w[t * W_STRIDE] rows(o_rows + SIGN (t - OFF)): one row (or column) of a key-query kernel applied to
    the rows of a [S, D] matrix. Where no tap is masked, a sum over taps of (tile) @ (shifted rows) is one
    tl.dot with these rows: the factored form of every pass below."""
    acc = tl.zeros([BR, D], dtype=tl.float32)
    for t in range(N):
        acc += tl.load(p_w + t * W_STRIDE) * _rows(p, o_rows + SIGN * (t - OFF), S, D)
    return acc


@triton.jit
def _mixed_scores(p_q, p_k, p_w1, p_m1, r0, c0, S, scale, H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  D: tl.constexpr, CQ: tl.constexpr, CK: tl.constexpr, T: tl.constexpr, L: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """C = W1 B (3) of all heads on a tile, and B (2) itself: two [H, BM, BN] blocks."""
    o_h = tl.arange(0, H)
    b_b = tl.zeros([H, BM, BN], dtype=tl.float32)
    b_c = tl.zeros([H, BM, BN], dtype=tl.float32)
    for h in range(H):
        b_s = _bilinear_conv(p_q + h * S * D, p_k + h * S * D, p_w1 + h * CQ * CK, r0, c0, S, 1, BM, BN, D,
                             CQ, CK, T, L, CAUSAL) * scale
        b_b += tl.where((o_h == h)[:, None, None], b_s[None, :, :], 0.0)
        b_c += tl.load(p_m1 + o_h * H + h)[:, None, None] * b_s[None, :, :]
    return b_c, b_b


@triton.jit
def _probs(p_q, p_k, p_w1, p_m1, p_lse, r0, c0, S, scale, H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           D: tl.constexpr, CQ: tl.constexpr, CK: tl.constexpr, T: tl.constexpr, L: tl.constexpr,
           CAUSAL: tl.constexpr):
    """P (4) of all heads on a tile from the saved lse, zero outside the plane and above the diagonal; and B."""
    o_h = tl.arange(0, H)
    o_r = r0 + tl.arange(0, BM)
    o_c = c0 + tl.arange(0, BN)
    b_c, b_b = _mixed_scores(p_q, p_k, p_w1, p_m1, r0, c0, S, scale, H, BM, BN, D, CQ, CK, T, L, CAUSAL)
    m_r = (o_r >= 0) & (o_r < S)
    m = m_r[:, None] & ((o_c >= 0) & (o_c < S))[None, :]
    if CAUSAL:
        m = m & (o_c[None, :] <= o_r[:, None])
    b_lse = tl.load(p_lse + o_h[:, None] * S + o_r[None, :], mask=m_r[None, :], other=0.0)
    b_p = tl.exp(tl.where(m[None, :, :], b_c - b_lse[:, :, None], float("-inf")))
    return b_p, b_b


@triton.jit
def _dprobs(p_g, p_v, p_w2, p_m2, r0, c0, S, H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            D: tl.constexpr, CQ: tl.constexpr, CK: tl.constexpr, T: tl.constexpr, L: tl.constexpr,
            CH: tl.constexpr, CAUSAL: tl.constexpr):
    """dP [H, BM, BN]: dP[hp] = sum_h W2[h, hp] sum_ij w2[hp, i, j] [mask] dO[h, r-i+T] . V[h, c-j+L]
    (the adjoint of P V, the head convolution (6) and the post-softmax convolution (5) with its re-mask)."""
    o_h = tl.arange(0, H)
    b_dp = tl.zeros([H, BM, BN], dtype=tl.float32)
    for hp in range(H):
        g0 = (hp // CH) * CH
        b_d = tl.zeros([BM, BN], dtype=tl.float32)
        for h in range(g0, g0 + CH):
            b_d += tl.load(p_m2 + h * H + hp) * _bilinear_conv(p_g + h * S * D, p_v + h * S * D, p_w2 + hp * CQ * CK,
                                                               r0, c0, S, -1, BM, BN, D, CQ, CK, T, L, CAUSAL)
        b_dp += tl.where((o_h == hp)[:, None, None], b_d[None, :, :], 0.0)
    return b_dp


@triton.jit
def _dscores(p_q, p_k, p_g, p_v, p_w1, p_m1, p_w2, p_m2, p_lse, p_delta, r0, c0, S, scale, H: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CQ1: tl.constexpr, CK1: tl.constexpr,
             T1: tl.constexpr, L1: tl.constexpr, CQ2: tl.constexpr, CK2: tl.constexpr, T2: tl.constexpr,
             L2: tl.constexpr, CH: tl.constexpr, CAUSAL: tl.constexpr):
    """dC = P (dP - delta) (softmax backward) of all heads on a tile, and B (for the head-mixing gradient)."""
    o_h = tl.arange(0, H)
    o_r = r0 + tl.arange(0, BM)
    b_p, b_b = _probs(p_q, p_k, p_w1, p_m1, p_lse, r0, c0, S, scale, H, BM, BN, D, CQ1, CK1, T1, L1, CAUSAL)
    b_dp = _dprobs(p_g, p_v, p_w2, p_m2, r0, c0, S, H, BM, BN, D, CQ2, CK2, T2, L2, CH, CAUSAL)
    m_r = (o_r >= 0) & (o_r < S)
    b_delta = tl.load(p_delta + o_h[:, None] * S + o_r[None, :], mask=m_r[None, :], other=0.0)
    return b_p * (b_dp - b_delta[:, :, None]), b_b


# ---- forward ---------------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(Q, K, W1, M1, LSE, S, scale, H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  D: tl.constexpr, CQ1: tl.constexpr, CK1: tl.constexpr, T1: tl.constexpr, L1: tl.constexpr,
                  CAUSAL: tl.constexpr):
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    r0 = i_r * BM
    p_q = Q + i_b.to(tl.int64) * H * S * D
    p_k = K + i_b.to(tl.int64) * H * S * D
    o_h = tl.arange(0, H)
    o_r = r0 + tl.arange(0, BM)
    b_m = tl.full([H, BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([H, BM], dtype=tl.float32)
    if CAUSAL:
        c_end = tl.minimum(S, r0 + BM)
    else:
        c_end = S
    for c0 in range(0, c_end, BN):
        o_c = c0 + tl.arange(0, BN)
        b_c, _ = _mixed_scores(p_q, p_k, W1, M1, r0, c0, S, scale, H, BM, BN, D, CQ1, CK1, T1, L1, CAUSAL)
        m = (o_c < S)[None, :] & (o_r >= 0)[:, None]  # every row has a visible key (column 0): no -inf row
        if CAUSAL:
            m = m & (o_c[None, :] <= o_r[:, None])
        b_c = tl.where(m[None, :, :], b_c, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_c, 2))  # online softmax over the key tiles
        b_l = b_l * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_c - b_m_new[:, :, None]), 2)
        b_m = b_m_new
    tl.store(LSE + i_b.to(tl.int64) * H * S + o_h[:, None] * S + o_r[None, :], b_m + tl.log(b_l),
             mask=(o_r < S)[None, :])


@triton.jit
def _post_kernel(Q, K, V, DO, W1, M1, W2, M2, LSE, O, DW2, DM2, S, scale, H: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, D: tl.constexpr, CQ1: tl.constexpr, CK1: tl.constexpr, T1: tl.constexpr,
                 L1: tl.constexpr, CQ2: tl.constexpr, CK2: tl.constexpr, T2: tl.constexpr, L2: tl.constexpr,
                 CH: tl.constexpr, TP2: tl.constexpr, CAUSAL: tl.constexpr, BWD: tl.constexpr):
    """Forward: O[h, r] = sum_hp W2[h, hp] sum_ij w2[hp, i, j] sum_c' [c'-j+L2 <= r] P[hp, r+i-T2, c'] V[h, c'-j+L2].
    BWD: the same products Z_ij = (P shifted, masked) V, contracted with dO for dw2 and dW2 instead."""
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    r0 = i_r * BM
    base = i_b.to(tl.int64) * H * S * D
    p_q, p_k, p_v, p_do = Q + base, K + base, V + base, DO + base
    p_lse = LSE + i_b.to(tl.int64) * H * S
    o_h = tl.arange(0, H)
    o_r = r0 + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    o_tap = tl.arange(0, TP2)
    acc_o = tl.zeros([H, BM, D], dtype=tl.float32)
    acc_dw = tl.zeros([H, TP2], dtype=tl.float32)
    acc_dm = tl.zeros([H, H], dtype=tl.float32)
    if CAUSAL:
        c_end = tl.minimum(S, r0 + BM)  # P[r', c'] = 0 for c' > r' and r' <= r here
    else:
        c_end = S
    for c0 in range(0, c_end, BN):
        o_c = c0 + tl.arange(0, BN)
        if CAUSAL:
            full = c0 + (BN - 1 + L2) <= r0  # every output column c = c'-j+L2 <= every row r
        else:
            full = c0 >= 0
        if BWD:
            full = c0 < 0  # never: the weight gradients need every tap's product
        for i in range(CQ2):
            b_p, _ = _probs(p_q, p_k, W1, M1, p_lse, r0 + (i - T2), c0, S, scale, H, BM, BN, D, CQ1, CK1, T1, L1,
                            CAUSAL)
            for hp in range(H):
                g0 = (hp // CH) * CH
                b_ph = _pick(b_p, hp, H)
                if full:  # no tap masked: O[h] += W2[h, hp] P[hp] (sum_j w2[hp, i, j] V[h] shifted)
                    for h in range(g0, g0 + CH):
                        b_vc = _weighted_rows(p_v + h * S * D, o_c, S, W2 + hp * CQ2 * CK2 + i * CK2, 1, CK2, -1, L2, BN, D)
                        b_z = tl.load(M2 + h * H + hp) * tl.dot(b_ph, b_vc)
                        acc_o += tl.where((o_h == h)[:, None, None], b_z[None, :, :], 0.0)
                else:  # one product per tap (the weight gradients need them separately)
                    for j in range(CK2):
                        o_cv = o_c - (j - L2)  # the output column c of P's column c' for this tap
                        if CAUSAL:
                            b_pm = tl.where(o_cv[None, :] <= o_r[:, None], b_ph, 0.0)  # the re-mask after (5)
                        else:
                            b_pm = b_ph
                        w = tl.load(W2 + hp * CQ2 * CK2 + i * CK2 + j)
                        for h in range(g0, g0 + CH):
                            b_z = tl.dot(b_pm, _rows(p_v + h * S * D, o_cv, S, D))  # [BM, D]
                            w_mix = tl.load(M2 + h * H + hp)
                            if BWD:
                                b_gz = tl.sum(tl.sum(_rows(p_do + h * S * D, o_r, S, D) * b_z, 1), 0)
                                acc_dw += tl.where((o_h == hp)[:, None] & (o_tap == i * CK2 + j)[None, :], w_mix * b_gz, 0.0)
                                acc_dm += tl.where((o_h == h)[:, None] & (o_h == hp)[None, :], w * b_gz, 0.0)
                            else:
                                acc_o += tl.where((o_h == h)[:, None, None], (w_mix * w * b_z)[None, :, :], 0.0)
    if BWD:
        i_p = (i_b * tl.num_programs(0) + i_r).to(tl.int64)
        tl.store(DW2 + i_p * H * TP2 + o_h[:, None] * TP2 + o_tap[None, :], acc_dw)
        tl.store(DM2 + i_p * H * H + o_h[:, None] * H + o_h[None, :], acc_dm)
    else:
        p_o = O + base + o_h[:, None, None] * S * D + o_r[None, :, None] * D + o_d[None, None, :]
        tl.store(p_o, acc_o, mask=(o_r < S)[None, :, None])


# ---- backward --------------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(Q, K, V, DO, W1, M1, W2, M2, LSE, DELTA, S, scale, H: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, D: tl.constexpr, CQ1: tl.constexpr, CK1: tl.constexpr, T1: tl.constexpr,
                  L1: tl.constexpr, CQ2: tl.constexpr, CK2: tl.constexpr, T2: tl.constexpr, L2: tl.constexpr,
                  CH: tl.constexpr, CAUSAL: tl.constexpr):
    """delta[h, r] = sum_c P[h, r, c] dP[h, r, c], the softmax backward's row term."""
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    r0 = i_r * BM
    base = i_b.to(tl.int64) * H * S * D
    p_lse = LSE + i_b.to(tl.int64) * H * S
    o_h = tl.arange(0, H)
    o_r = r0 + tl.arange(0, BM)
    acc = tl.zeros([H, BM], dtype=tl.float32)
    if CAUSAL:
        c_end = tl.minimum(S, r0 + BM)
    else:
        c_end = S
    for c0 in range(0, c_end, BN):
        b_p, _ = _probs(Q + base, K + base, W1, M1, p_lse, r0, c0, S, scale, H, BM, BN, D, CQ1, CK1, T1, L1, CAUSAL)
        b_dp = _dprobs(DO + base, V + base, W2, M2, r0, c0, S, H, BM, BN, D, CQ2, CK2, T2, L2, CH, CAUSAL)
        acc += tl.sum(b_p * b_dp, 2)
    tl.store(DELTA + i_b.to(tl.int64) * H * S + o_h[:, None] * S + o_r[None, :], acc, mask=(o_r < S)[None, :])


@triton.jit
def _dq_kernel(Q, K, V, DO, W1, M1, W2, M2, LSE, DELTA, DQ, DW1, DM1, S, scale, H: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CQ1: tl.constexpr, CK1: tl.constexpr,
               T1: tl.constexpr, L1: tl.constexpr, CQ2: tl.constexpr, CK2: tl.constexpr, T2: tl.constexpr,
               L2: tl.constexpr, CH: tl.constexpr, TP1: tl.constexpr, CAUSAL: tl.constexpr):
    """dq[r'] = scale sum_ij w1[i, j] sum_c [c+j-L1 <= r'] dB[r'-i+T1, c] k[c+j-L1]  (the adjoint of (1)-(2)),
    dw1[i, j] = scale sum_r' q[r'] . (same inner sum), dW1 = sum dC B^T over the tiles of this row block."""
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    r0 = i_r * BM
    base = i_b.to(tl.int64) * H * S * D
    p_q, p_k = Q + base, K + base
    p_lse = LSE + i_b.to(tl.int64) * H * S
    p_delta = DELTA + i_b.to(tl.int64) * H * S
    o_h = tl.arange(0, H)
    o_r = r0 + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    o_tap = tl.arange(0, TP1)
    acc_dq = tl.zeros([H, BM, D], dtype=tl.float32)
    acc_dw = tl.zeros([H, TP1], dtype=tl.float32)
    acc_dm = tl.zeros([H, H], dtype=tl.float32)
    if CAUSAL:
        c_end = tl.minimum(S, r0 + BM + T1)  # dB[r, c] = 0 for c > r, and r <= r' + T1 here
    else:
        c_end = S
    for c0 in range(0, c_end, BN):
        o_c = c0 + tl.arange(0, BN)
        if CAUSAL:
            full = c0 + (BN - 1 + CK1 - 1 - L1) <= r0  # every key c+j-L1 <= every row r'
        else:
            full = c0 >= 0
        for i in range(CQ1):
            b_dc, b_b = _dscores(p_q, p_k, DO + base, V + base, W1, M1, W2, M2, p_lse, p_delta, r0 - (i - T1), c0,
                                 S, scale, H, BM, BN, D, CQ1, CK1, T1, L1, CQ2, CK2, T2, L2, CH, CAUSAL)
            if i == T1:  # the unshifted tile: dW1[h, hp] = sum dC[h] B[hp]
                for hp in range(H):
                    col = tl.sum(tl.sum(b_dc * _pick(b_b, hp, H)[None, :, :], 2), 1)
                    acc_dm += tl.where((o_h == hp)[None, :], col[:, None], 0.0)
            for hp in range(H):
                b_db = tl.sum(tl.load(M1 + o_h * H + hp)[:, None, None] * b_dc, 0)  # dB = W1^T dC  (3)
                b_q = _rows(p_q + hp * S * D, o_r, S, D)
                if full:  # dq += dB (sum_j w1[i, j] K shifted); dw1[i, j] += (dB^T Q) . (K shifted by j)
                    b_kc = _weighted_rows(p_k + hp * S * D, o_c, S, W1 + hp * CQ1 * CK1 + i * CK1, 1, CK1, 1, L1, BN, D)
                    acc_dq += tl.where((o_h == hp)[:, None, None], (scale * tl.dot(b_db, b_kc))[None, :, :], 0.0)
                    b_u = tl.dot(tl.trans(b_db), b_q) * scale  # [BN, D]
                    for j in range(CK1):
                        b_uk = tl.sum(tl.sum(b_u * _rows(p_k + hp * S * D, o_c + (j - L1), S, D), 1), 0)
                        acc_dw += tl.where((o_h == hp)[:, None] & (o_tap == i * CK1 + j)[None, :], b_uk, 0.0)
                else:
                    for j in range(CK1):
                        if CAUSAL:
                            b_dbm = tl.where((o_c + (j - L1))[None, :] <= o_r[:, None], b_db, 0.0)
                        else:
                            b_dbm = b_db
                        b_x = tl.dot(b_dbm, _rows(p_k + hp * S * D, o_c + (j - L1), S, D)) * scale  # [BM, D]
                        acc_dq += tl.where((o_h == hp)[:, None, None], (tl.load(W1 + hp * CQ1 * CK1 + i * CK1 + j) * b_x)[None, :, :], 0.0)
                        acc_dw += tl.where((o_h == hp)[:, None] & (o_tap == i * CK1 + j)[None, :],
                                           tl.sum(tl.sum(b_q * b_x, 1), 0), 0.0)
    p_dq = DQ + base + o_h[:, None, None] * S * D + o_r[None, :, None] * D + o_d[None, None, :]
    tl.store(p_dq, acc_dq, mask=(o_r < S)[None, :, None])
    i_p = (i_b * tl.num_programs(0) + i_r).to(tl.int64)
    tl.store(DW1 + i_p * H * TP1 + o_h[:, None] * TP1 + o_tap[None, :], acc_dw)
    tl.store(DM1 + i_p * H * H + o_h[:, None] * H + o_h[None, :], acc_dm)


@triton.jit
def _dk_kernel(Q, K, V, DO, W1, M1, W2, M2, LSE, DELTA, DK, S, scale, H: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, D: tl.constexpr, CQ1: tl.constexpr, CK1: tl.constexpr, T1: tl.constexpr,
               L1: tl.constexpr, CQ2: tl.constexpr, CK2: tl.constexpr, T2: tl.constexpr, L2: tl.constexpr,
               CH: tl.constexpr, CAUSAL: tl.constexpr):
    """dk[c'] = scale sum_ij w1[i, j] sum_r [c' <= r+i-T1] dB[r, c'-j+L1] q[r+i-T1]; one program per key tile."""
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    c0 = i_c * BN
    base = i_b.to(tl.int64) * H * S * D
    p_q = Q + base
    p_lse = LSE + i_b.to(tl.int64) * H * S
    p_delta = DELTA + i_b.to(tl.int64) * H * S
    o_h = tl.arange(0, H)
    o_c = c0 + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    acc = tl.zeros([H, BN, D], dtype=tl.float32)
    if CAUSAL:
        r_start = (c0 // BM) * BM  # causal: r >= r+i-T1 >= c' >= c0
    else:
        r_start = 0
    for r0 in range(r_start, S, BM):
        o_r = r0 + tl.arange(0, BM)
        if CAUSAL:
            full = c0 + (BN - 1) <= r0 - T1  # every key c' <= every row r+i-T1
        else:
            full = r0 >= 0
        for j in range(CK1):
            b_dc, _ = _dscores(p_q, K + base, DO + base, V + base, W1, M1, W2, M2, p_lse, p_delta, r0, c0 - (j - L1),
                               S, scale, H, BM, BN, D, CQ1, CK1, T1, L1, CQ2, CK2, T2, L2, CH, CAUSAL)
            for hp in range(H):
                b_db = tl.sum(tl.load(M1 + o_h * H + hp)[:, None, None] * b_dc, 0)
                if full:  # dk += dB^T (sum_i w1[i, j] Q shifted)
                    b_qc = _weighted_rows(p_q + hp * S * D, o_r, S, W1 + hp * CQ1 * CK1 + j, CK1, CQ1, 1, T1, BM, D)
                    acc += tl.where((o_h == hp)[:, None, None], (scale * tl.dot(tl.trans(b_db), b_qc))[None, :, :], 0.0)
                else:
                    for i in range(CQ1):
                        if CAUSAL:
                            b_dbm = tl.where(o_c[None, :] <= (o_r + (i - T1))[:, None], b_db, 0.0)
                        else:
                            b_dbm = b_db
                        b_y = tl.dot(tl.trans(b_dbm), _rows(p_q + hp * S * D, o_r + (i - T1), S, D))  # [BN, D]
                        acc += tl.where((o_h == hp)[:, None, None],
                                        (scale * tl.load(W1 + hp * CQ1 * CK1 + i * CK1 + j) * b_y)[None, :, :], 0.0)
    p_dk = DK + base + o_h[:, None, None] * S * D + o_c[None, :, None] * D + o_d[None, None, :]
    tl.store(p_dk, acc, mask=(o_c < S)[None, :, None])


@triton.jit
def _dv_kernel(Q, K, DO, W1, M1, W2, M2, LSE, DV, S, scale, H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               D: tl.constexpr, CQ1: tl.constexpr, CK1: tl.constexpr, T1: tl.constexpr, L1: tl.constexpr,
               CQ2: tl.constexpr, CK2: tl.constexpr, T2: tl.constexpr, L2: tl.constexpr, CH: tl.constexpr,
               CAUSAL: tl.constexpr):
    """dv[h, c] = sum_hp W2[h, hp] sum_ij w2[hp, i, j] sum_r' [c <= r'-i+T2] P[hp, r', c+j-L2] dO[h, r'-i+T2]."""
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    c0 = i_c * BN
    base = i_b.to(tl.int64) * H * S * D
    p_do = DO + base
    p_lse = LSE + i_b.to(tl.int64) * H * S
    o_h = tl.arange(0, H)
    o_c = c0 + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    acc = tl.zeros([H, BN, D], dtype=tl.float32)
    if CAUSAL:
        r_start = (tl.maximum(c0 - L2, 0) // BM) * BM  # P[r', c'] = 0 for r' < c' = c+j-L2 >= c0 - L2
    else:
        r_start = 0
    for r0 in range(r_start, S, BM):
        o_r = r0 + tl.arange(0, BM)
        if CAUSAL:
            full = c0 + (BN - 1) <= r0 - (CQ2 - 1 - T2)  # every column c <= every row r'-i+T2
        else:
            full = r0 >= 0
        for j in range(CK2):
            b_p, _ = _probs(Q + base, K + base, W1, M1, p_lse, r0, c0 + (j - L2), S, scale, H, BM, BN, D,
                            CQ1, CK1, T1, L1, CAUSAL)
            for hp in range(H):
                g0 = (hp // CH) * CH
                b_ph = _pick(b_p, hp, H)
                if full:  # dv[h] += W2[h, hp] P^T (sum_i w2[hp, i, j] dO[h] shifted)
                    for h in range(g0, g0 + CH):
                        b_gc = _weighted_rows(p_do + h * S * D, o_r, S, W2 + hp * CQ2 * CK2 + j, CK2, CQ2, -1, T2, BM, D)
                        b_y = tl.load(M2 + h * H + hp) * tl.dot(tl.trans(b_ph), b_gc)
                        acc += tl.where((o_h == h)[:, None, None], b_y[None, :, :], 0.0)
                else:
                    for i in range(CQ2):
                        if CAUSAL:
                            b_pm = tl.where(o_c[None, :] <= (o_r - (i - T2))[:, None], b_ph, 0.0)
                        else:
                            b_pm = b_ph
                        w = tl.load(W2 + hp * CQ2 * CK2 + i * CK2 + j)
                        for h in range(g0, g0 + CH):
                            b_y = tl.dot(tl.trans(b_pm), _rows(p_do + h * S * D, o_r - (i - T2), S, D))  # [BN, D]
                            acc += tl.where((o_h == h)[:, None, None], (tl.load(M2 + h * H + hp) * w * b_y)[None, :, :], 0.0)
    p_dv = DV + base + o_h[:, None, None] * S * D + o_c[None, :, None] * D + o_d[None, None, :]
    tl.store(p_dv, acc, mask=(o_c < S)[None, :, None])


# ---- host side -------------------------------------------------------------------------------------------------
def shapes_ok(heads: int, head_dim: int) -> bool:
    """Whether the kernels' blocks fit: heads a power of two (all heads in one block), head dim a power of two >= 16."""
    return heads >= 1 and heads & (heads - 1) == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _consts(q, k, v, w1, w2, head_group: int, causal: bool) -> dict:
    B, H, S, D = q.shape
    if not shapes_ok(H, D):
        raise ValueError(f"the Triton MTA kernel needs a power-of-two number of heads and head dim >= 16, "
                         f"got {H} heads of {D}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"MTA: q, k and v must have one shape, not {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if H * S * D >= 2**31:  # per-head offsets are int32 inside the kernels
        raise ValueError(f"MTA: {H} x {S} x {D} elements per batch entry exceed the kernels' int32 offsets")
    (cq1, ck1), (cq2, ck2) = w1.shape[1:], w2.shape[1:]
    l1, _, t1, b1 = kq_padding(cq1, ck1, causal)
    l2, _, t2, b2 = kq_padding(cq2, ck2, causal)
    assert not causal or (b1 == 0 and b2 == 0), "the causal loop bounds assume no padding below"
    return dict(H=H, BM=BLOCK, BN=BLOCK, D=D, CQ1=cq1, CK1=ck1, T1=t1, L1=l1, CQ2=cq2, CK2=ck2, T2=t2, L2=l2,
                CH=head_group, CAUSAL=causal)


@on_tensor_device
def mta_fwd(q, k, v, w1, m1, w2, m2, head_group: int, causal: bool):
    """O = P V of MTA (fp32) and lse [B, H, S]. w1, w2: [H, c_q, c_k] key-query kernels (a [H, 1, 1] ones kernel
    is no convolution); m1, m2: [H, H] head mixing (m2 block-diagonal in groups of head_group)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    w1, m1, w2, m2 = (t.float().contiguous() for t in (w1, m1, w2, m2))
    B, H, S, D = q.shape
    c = _consts(q, k, v, w1, w2, head_group, causal)
    scale = D**-0.5
    grid = (triton.cdiv(S, BLOCK), B)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    o = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    _stats_kernel[grid](q, k, w1, m1, lse, S, scale, **{n: c[n] for n in ("H", "BM", "BN", "D", "CQ1", "CK1", "T1", "L1", "CAUSAL")})
    _post_kernel[grid](q, k, v, q, w1, m1, w2, m2, lse, o, lse, lse, S, scale, **c,
                       TP2=triton.next_power_of_2(w2.shape[1] * w2.shape[2]), BWD=False)
    return o, lse


@on_tensor_device
def mta_bwd(do, q, k, v, w1, m1, w2, m2, lse, head_group: int, causal: bool):
    """Gradients (fp32) of mta_fwd's O: dq, dk, dv, dw1, dm1, dw2, dm2."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    w1, m1, w2, m2 = (t.float().contiguous() for t in (w1, m1, w2, m2))
    B, H, S, D = q.shape
    c = _consts(q, k, v, w1, w2, head_group, causal)
    scale = D**-0.5
    nt = triton.cdiv(S, BLOCK)  # row tiles = column tiles
    tp1 = triton.next_power_of_2(w1.shape[1] * w1.shape[2])
    tp2 = triton.next_power_of_2(w2.shape[1] * w2.shape[2])
    f32 = dict(dtype=torch.float32, device=q.device)
    delta = torch.empty(B, H, S, **f32)
    _delta_kernel[(nt, B)](q, k, v, do, w1, m1, w2, m2, lse, delta, S, scale, **c)
    dw2 = torch.empty(B * nt, H, tp2, **f32)
    dm2 = torch.empty(B * nt, H, H, **f32)
    _post_kernel[(nt, B)](q, k, v, do, w1, m1, w2, m2, lse, lse, dw2, dm2, S, scale, **c, TP2=tp2, BWD=True)
    dq = torch.empty(B, H, S, D, **f32)
    dw1 = torch.empty(B * nt, H, tp1, **f32)
    dm1 = torch.empty(B * nt, H, H, **f32)
    _dq_kernel[(nt, B)](q, k, v, do, w1, m1, w2, m2, lse, delta, dq, dw1, dm1, S, scale, **c, TP1=tp1)
    dk = torch.empty(B, H, S, D, **f32)
    _dk_kernel[(nt, B)](q, k, v, do, w1, m1, w2, m2, lse, delta, dk, S, scale, **c)
    dv = torch.empty(B, H, S, D, **f32)
    _dv_kernel[(nt, B)](q, k, do, w1, m1, w2, m2, lse, dv, S, scale, **c)
    taps1, taps2 = w1.shape[1] * w1.shape[2], w2.shape[1] * w2.shape[2]
    dw1 = dw1.sum(0)[:, :taps1].reshape(w1.shape)
    dw2 = dw2.sum(0)[:, :taps2].reshape(w2.shape)
    return dq, dk, dv, dw1, dm1.sum(0), dw2, dm2.sum(0)
