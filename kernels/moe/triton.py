"""DeepSeekMoE expert FFNs in Triton: the dispatch done inside the grouped matmuls.

moe_ffn's "grouped" path spends its time outside the matmuls (BENCHMARKS.md, bench-moe): a gather of x into the
sorted order, the SwiGLU and gate as separate passes, a scatter-add back, and the same again in the backward.
Here each of those rides on a matmul: rows are gathered as the tiles are loaded (prologue) and SwiGLU, the gate
and the scatter-add happen on the accumulator before it is written (epilogue).

The (token, slot) pairs are sorted by expert (kernels.moe.dispatch): `token` [S] names each sorted pair's token,
`counts` [E] how many pairs each expert has. Row tiles of BM sorted pairs never straddle two experts, so a tile
multiplies by one expert's weights; each program finds its expert from the per-expert tile counts (no host sync:
the grid is the bound cdiv(S, BM) + E and the spare programs return).

  forward   _rows_kernel    GATHER_A, SWIGLU:     au = x[token] @ W_in[e];  h = silu(a) * u * gate    -> au, h
            _rows_kernel    SCATTER_C:            out[token] += h @ W_out[e]
  backward  _rows_kernel    GATHER_A, SWIGLU_BWD: dh = dout[token] @ W_out[e]^T;  da, du, and per-column-tile
                                                  partial sums of dgate = sum_f dh * silu(a) * u      -> dau
            _rows_kernel    SCATTER_C:            dx[token] += dau @ W_in[e]^T
            _weights_kernel GATHER_G:             dW_out[e] = h_e^T @ dout[token_e]
            _weights_kernel GATHER_A:             dW_in[e]  = x[token_e]^T @ dau_e
The scatters are atomic adds into fp32 buffers (k per output row: on a GPU not bitwise reproducible, as
index_add_ there); the dgate partials are summed on the host (deterministic). Matmuls accumulate in fp32 from
inputs in their own dtype (bf16 tensor cores on a GPU). Naming (fla style): i_ program ids, o_ offsets,
m_ masks, p_ pointers, b_ blocks in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.common import on_tensor_device

BM, BN, BK = 64, 64, 32  # row tile (sorted pairs), column tile, reduction tile: tl.dot needs >= 16 each
SPLIT_ROWS, SPLIT_PROGRAMS = 64, 512  # the weight gradients' row chunks (see _weights_launch)
FILL_NAN = False  # tests set this: buffers start as NaN, so a tile a kernel forgets to write cannot pass


def _empty(*shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if FILL_NAN else out


@triton.jit
def _expert_of_tile(COUNTS, i_m, E, E2: tl.constexpr, BM: tl.constexpr):
    """Which expert row tile i_m belongs to, the expert's first sorted row, its row count and the tile's first
    row within the expert. Expert e has cdiv(count_e, BM) tiles, in expert order; e == E for a spare program."""
    o_e = tl.arange(0, E2)
    b_n = tl.load(COUNTS + o_e, mask=o_e < E, other=0)
    b_tiles = (b_n + BM - 1) // BM
    b_end = tl.cumsum(b_tiles, 0)  # tiles of experts 0..e together
    e = tl.sum(tl.where((b_end <= i_m) & (o_e < E), 1, 0), 0)
    before = o_e < e
    row0 = tl.sum(tl.where(before, b_n, 0), 0)
    tile0 = tl.sum(tl.where(before, b_tiles, 0), 0)
    n = tl.sum(tl.where(o_e == e, b_n, 0), 0)
    return e, row0, n, (i_m - tile0) * BM


@triton.jit
def _rows_kernel(A, B, C, C2, TOKEN, COUNTS, GATE, AU, PART, S, K, N, E,
          s_am, s_ak, s_be, s_bk, s_bn,
          E2: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, SWIGLU: tl.constexpr,
          SWIGLU_BWD: tl.constexpr, STORE_AU: tl.constexpr, PREC: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[rows] (op)= A[rows or token[rows]] @ B[e] over one expert's row tile and a BN column tile.
    SWIGLU: B is [E, K, 2N] (gate | up); C = au [S, 2N] (if STORE_AU: for a backward), C2 = h [S, N] = silu(a) * u * gate.
    SWIGLU_BWD: A @ B is dh [., N]; AU is the forward's au; C = dau [S, 2N]; PART [N tiles, S] the dgate partials.
    SCATTER_C: C [T, N] fp32, C[token[rows]] += A[rows] @ B[e]. Otherwise C [S, N] = A @ B."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    e, row0, n, r0 = _expert_of_tile(COUNTS, i_m, E, E2, BM)
    if e >= E:
        return
    o_r = r0 + tl.arange(0, BM)
    m_r = o_r < n
    rows = (row0 + o_r).to(tl.int64)  # sorted pairs
    tok = tl.load(TOKEN + rows, mask=m_r, other=0).to(tl.int64)
    src = tok if GATHER_A else rows
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_b = B + e.to(tl.int64) * s_be
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(A + src[:, None] * s_am + o_k[None, :] * s_ak, mask=m_r[:, None] & m_k[None, :], other=0.0)
        m_kn = m_k[:, None] & m_n[None, :]
        b_b = tl.load(p_b + o_k[:, None] * s_bk + o_n[None, :] * s_bn, mask=m_kn, other=0.0)
        acc = tl.dot(b_a, b_b.to(b_a.dtype), acc, input_precision=PREC)
        if SWIGLU:  # the up half, columns N + o_n of the same expert
            b_u = tl.load(p_b + o_k[:, None] * s_bk + (N + o_n)[None, :] * s_bn, mask=m_kn, other=0.0)
            acc_u = tl.dot(b_a, b_u.to(b_a.dtype), acc_u, input_precision=PREC)
    m = m_r[:, None] & m_n[None, :]
    if SCATTER_C:
        tl.atomic_add(C + tok[:, None] * N + o_n[None, :], acc, mask=m, sem="relaxed")  # a sum: no ordering needed
    elif SWIGLU:
        b_g = tl.load(GATE + rows, mask=m_r, other=0.0).to(tl.float32)
        if STORE_AU:
            p_au = C + rows[:, None] * (2 * N) + o_n[None, :]
            tl.store(p_au, acc.to(C.dtype.element_ty), mask=m)
            tl.store(p_au + N, acc_u.to(C.dtype.element_ty), mask=m)
        b_h = acc * tl.sigmoid(acc) * acc_u * b_g[:, None]
        tl.store(C2 + rows[:, None] * N + o_n[None, :], b_h.to(C2.dtype.element_ty), mask=m)
    elif SWIGLU_BWD:  # acc = dh, the gradient of the gated hidden h = silu(a) * u * gate
        p_au = AU + rows[:, None] * (2 * N) + o_n[None, :]
        b_a = tl.load(p_au, mask=m, other=0.0).to(tl.float32)
        b_u = tl.load(p_au + N, mask=m, other=0.0).to(tl.float32)
        b_g = tl.load(GATE + rows, mask=m_r, other=0.0).to(tl.float32)
        b_sig = tl.sigmoid(b_a)
        b_silu = b_a * b_sig
        tl.store(PART + i_n.to(tl.int64) * S + rows, tl.sum(acc * b_silu * b_u, 1), mask=m_r)
        b_dh = acc * b_g[:, None]
        p_dau = C + rows[:, None] * (2 * N) + o_n[None, :]
        tl.store(p_dau, (b_dh * b_u * b_sig * (1 + b_a * (1 - b_sig))).to(C.dtype.element_ty), mask=m)
        tl.store(p_dau + N, (b_dh * b_silu).to(C.dtype.element_ty), mask=m)
    else:
        tl.store(C + rows[:, None] * N + o_n[None, :], acc.to(C.dtype.element_ty), mask=m)


@triton.jit
def _weights_kernel(A, G, DW, TOKEN, COUNTS, K, N, E, SPLIT, s_am, s_gm,
             E2: tl.constexpr, GATHER_A: tl.constexpr, GATHER_G: tl.constexpr, PREC: tl.constexpr,
             BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """DW[s, e] [K, N] = A[rows]^T @ G[rows] over the s-th of SPLIT chunks of expert e's sorted rows, each side read
    through token[rows] when gathered. A program loops over its chunk's rows; the chunks' partial sums are added
    on the host (no atomics). Splitting keeps a GPU busy: E x K/BK x N/BN alone is a few dozen programs."""
    i_es, i_k, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e, i_s = i_es // SPLIT, i_es % SPLIT
    o_e = tl.arange(0, E2)
    b_n = tl.load(COUNTS + o_e, mask=o_e < E, other=0)
    row0 = tl.sum(tl.where(o_e < e, b_n, 0), 0)
    n = tl.sum(tl.where(o_e == e, b_n, 0), 0)
    chunk = ((n + SPLIT - 1) // SPLIT + BR - 1) // BR * BR
    r_end = tl.minimum(n, (i_s + 1) * chunk)
    o_k = i_k * BK + tl.arange(0, BK)
    o_n = i_n * BN + tl.arange(0, BN)
    m_k, m_n = o_k < K, o_n < N
    acc = tl.zeros([BK, BN], dtype=tl.float32)
    for r0 in range(i_s * chunk, r_end, BR):
        o_r = r0 + tl.arange(0, BR)
        m_r = o_r < r_end
        rows = (row0 + o_r).to(tl.int64)
        tok = tl.load(TOKEN + rows, mask=m_r, other=0).to(tl.int64)
        a_rows = tok if GATHER_A else rows
        g_rows = tok if GATHER_G else rows
        b_a = tl.load(A + a_rows[:, None] * s_am + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_g = tl.load(G + g_rows[:, None] * s_gm + o_n[None, :], mask=m_r[:, None] & m_n[None, :], other=0.0)
        acc = tl.dot(tl.trans(b_a), b_g.to(b_a.dtype), acc, input_precision=PREC)
    tl.store(DW + (i_s * E + e).to(tl.int64) * K * N + o_k[:, None] * N + o_n[None, :], acc.to(DW.dtype.element_ty),
             mask=m_k[:, None] & m_n[None, :])


def _precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: for fp32, what torch's own fp32 matmuls do (IEEE unless the user allowed TF32, as
    grouped_mm would then use it too; Triton's default would be TF32 always); other dtypes have one."""
    if dtype != torch.float32:
        return None
    try:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except RuntimeError:  # (torch >= 2.9 refuses to read it after the new fp32_precision API set a mix)
        return "ieee"


def _grid_rows(S: int, E: int, N: int):
    return (triton.cdiv(S, BM) + E, triton.cdiv(N, BN))


def _rows_launch(a, b, c, token, counts, *, n, gather_a=False, scatter_c=False, c2=None, gate=None, au=None,
                 part=None, swiglu=False, swiglu_bwd=False, store_au=True):
    """b: [E, K, n] or its transpose view (any strides); a: [rows, K] contiguous."""
    S, E, K = token.numel(), counts.numel(), a.shape[1]
    dummy = c
    _rows_kernel[_grid_rows(S, E, n)](
        a, b, c, c2 if c2 is not None else dummy, token, counts, gate if gate is not None else dummy,
        au if au is not None else dummy, part if part is not None else dummy, S, K, n, E,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        E2=triton.next_power_of_2(E), GATHER_A=gather_a, SCATTER_C=scatter_c, SWIGLU=swiglu, SWIGLU_BWD=swiglu_bwd,
        STORE_AU=store_au, PREC=_precision(a.dtype), BM=BM, BN=BN, BK=BK)


def _weights_launch(a, g, token, counts, *, gather_a=False, gather_g=False, dtype):
    S, K, E, N = token.numel(), a.shape[1], counts.numel(), g.shape[1]
    grid_kn = (triton.cdiv(K, 2 * BK), triton.cdiv(N, BN))
    # chunks of at least SPLIT_ROWS rows an expert on average, up to about SPLIT_PROGRAMS programs in all
    split = max(1, min(triton.cdiv(S, E * SPLIT_ROWS), triton.cdiv(SPLIT_PROGRAMS, E * grid_kn[0] * grid_kn[1])))
    dw = _empty(split, E, K, N, like=a, dtype=dtype if split == 1 else torch.float32)
    _weights_kernel[(E * split, *grid_kn)](
        a, g, dw, token, counts, K, N, E, split, a.stride(0), g.stride(0),
        E2=triton.next_power_of_2(E), GATHER_A=gather_a, GATHER_G=gather_g, PREC=_precision(a.dtype), BK=2 * BK, BN=BN,
        BR=BK)
    return dw[0] if split == 1 else dw.sum(0).to(dtype)


class _ExpertFFN(torch.autograd.Function):
    """out [T, D] = sum over sorted pairs i of gate_i * expert_{e(i)}(x[token_i]) (moe_ffn's dispatch order)."""

    @staticmethod
    def forward(ctx, x, w_in, w_out, gate, token, counts, out_dtype, backward):
        (T, D), F, S = x.shape, w_out.shape[1], token.numel()
        h = _empty(S, F, like=x)
        au = _empty(S, 2 * F, like=x) if backward else h  # (no backward to come: h as a placeholder, not written)
        _rows_launch(x, w_in, au, token, counts, n=F, gather_a=True, c2=h, gate=gate, swiglu=True, store_au=backward)
        out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
        _rows_launch(h, w_out, out, token, counts, n=D, scatter_c=True)
        ctx.save_for_backward(x, w_in, w_out, gate, token, counts, au, h)
        return out.to(out_dtype)  # (the sum over the k experts stays fp32 until here)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, w_in, w_out, gate, token, counts, au, h = ctx.saved_tensors
        dout = dout.to(x.dtype).contiguous()
        (T, D), F, S = x.shape, w_out.shape[1], token.numel()
        dx = dw_in = dw_out = dgate = None
        if any(ctx.needs_input_grad[i] for i in (0, 1, 3)):  # all but w_out's gradient go through dh
            dau = _empty(S, 2 * F, like=x)
            part = _empty(triton.cdiv(F, BN), S, like=x, dtype=torch.float32)
            _rows_launch(dout, w_out.transpose(1, 2), dau, token, counts, n=F, gather_a=True, gate=gate, au=au,
                         part=part, swiglu_bwd=True)
            dgate = part.sum(0).to(gate.dtype)
        if ctx.needs_input_grad[0]:
            dx = torch.zeros(T, D, dtype=torch.float32, device=x.device)
            _rows_launch(dau, w_in.transpose(1, 2), dx, token, counts, n=D, scatter_c=True)
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw_in = _weights_launch(x, dau, token, counts, gather_a=True, dtype=w_in.dtype)
        if ctx.needs_input_grad[2]:
            dw_out = _weights_launch(h, dout, token, counts, gather_g=True, dtype=w_out.dtype)
        return dx, dw_in, dw_out, dgate, None, None, None, None


@on_tensor_device
def expert_ffn_triton(x, w_in, w_out, gate, token, counts, out_dtype=None):
    """x [T, D], w_in [E, D, 2F], w_out [E, F, D], gate [S] and token [S] in dispatch order, counts [E]; the
    matmuls run in x's dtype (cast the four to the compute dtype first), the output comes in out_dtype (x's)."""
    x, w_in, w_out, gate = (t.contiguous() for t in (x, w_in, w_out, gate))
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, w_out, gate))
    return _ExpertFFN.apply(x, w_in, w_out, gate, token.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous(),
                            out_dtype or x.dtype, backward)
