"""Native Sparse Attention, the specification in plain PyTorch (slow, materialises N x N; tests only).

Yuan et al., "Native Sparse Attention" (arXiv 2502.11089), in two forms (../shared/notes/nsa.md):
  * 3D non-causal for diffusion: tokens are stored cube-major, so a cube (bt, bh, bw) of the token grid is a
    contiguous block of V = bt*bh*bw tokens. One compressed key/value per cube; every query attends to all
    compressed keys; a query cube selects KV cubes by its summed compressed-attention probabilities.
  * 1D causal for the LM: blocks of l tokens, selection per query token, forced initial and local blocks,
    an optional sliding-window branch.
Output (paper eq. 5): o = g_cmp * Attn(q, K_cmp, V_cmp) + g_slc * Attn(q, K_slc, V_slc) [+ g_win * Attn_win].

Axis legend: B batch, H query heads, Hkv key/value heads (G = H / Hkv heads share a selection), N tokens,
K head dim, V tokens per block (cube volume), NB blocks (= N / V), S selected blocks per query block/token.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, ..., K] -> [B, H, ..., K]: each kv head serves G = H / Hkv consecutive query heads."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def up(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> fp32 for the arithmetic; fp32 and fp64 stay as they are (fp64 gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def attend(q, k, v, mask=None):
    """Softmax attention with an optional boolean mask (True = attend). Rows with no key give 0, not NaN."""
    s = (up(q) @ up(k).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an all -inf row (causal, first block) -> zeros
    return (p @ up(v)).to(q.dtype), p


# ---- 3D non-causal ----------------------------------------------------------------------------------------
def cube_neighbourhood(cube_grid: tuple[int, int, int], radius: tuple[int, int, int]) -> torch.Tensor:
    """[NB, NB] bool: query cube i always selects KV cube j when they are within `radius` cubes per axis
    (radius 0 = the query's own cube). Cubes are numbered row-major over the cube grid (cube-major order)."""
    pos = torch.stack(torch.meshgrid(*(torch.arange(n) for n in cube_grid), indexing="ij"), -1).reshape(-1, 3)
    dist = (pos[:, None, :] - pos[None, :, :]).abs()  # [NB, NB, 3]
    return (dist <= torch.tensor(radius)).all(-1)


def selection_size(top_n: int, forced: torch.Tensor) -> int:
    """S: the number of KV cubes every query cube attends to."""
    return min(forced.shape[-1], top_n + int(forced.sum(-1).max()))


def select_cubes(scores: torch.Tensor, top_n: int, forced: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Top-n KV cubes per query cube on top of the forced ones. scores: [B, Hkv, NB, NB], forced: [NB, NB].

    Every query cube attends to the same number S = min(NB, top_n + max forced) of cubes (constant work per
    program): where a cube has fewer forced neighbours (grid edges), the spare slots go to the next best.
    Returns [B, Hkv, NB, S] int64 KV-cube indices, sorted ascending (memory order; deterministic).
    """
    count = selection_size(top_n, forced) if count is None else count  # pass it in to keep torch.compile graphs whole
    ranked = scores.float().masked_fill(forced, float("inf"))
    return ranked.topk(count, dim=-1).indices.sort(dim=-1).values


def block_mask_from_index(index: torch.Tensor, nb: int, block: int) -> torch.Tensor:
    """[B, Hkv, NB, S] selected cubes -> [B, Hkv, N, N] token mask (True = attend)."""
    sel = torch.zeros(*index.shape[:-1], nb, dtype=torch.bool, device=index.device)
    sel.scatter_(-1, index, True)  # [B, Hkv, NB(query), NB(kv)]
    return sel.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def nsa_3d_reference(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, block: int, top_n: int, forced: torch.Tensor,
                     index: torch.Tensor | None = None):
    """The whole non-causal NSA given the compressed keys/values (one per block) and the gate values.

    q: [B, H, N, K]; k, v: [B, Hkv, N, K]; k_cmp, v_cmp: [B, Hkv, NB, K]; g_cmp, g_slc: [B, H, N] in (0, 1);
    forced: [NB, NB] bool. `index` overrides the selection (tests). Returns (o [B, H, N, K], index).
    """
    B, H, N, K = q.shape
    nb = N // block
    o_cmp, p_cmp = attend(q, expand_kv(k_cmp, H), expand_kv(v_cmp, H))  # p_cmp: [B, H, N, NB]
    if index is None:
        # importance of KV cube j for query cube i: compressed probabilities summed over the cube's queries
        # and over the heads of a GQA group, so the group shares one selection (notes: probabilities, not logits)
        scores = p_cmp.view(B, H, nb, block, nb).sum(3).view(B, k.shape[1], H // k.shape[1], nb, nb).sum(2)
        index = select_cubes(scores, top_n, forced)
    mask = expand_kv(block_mask_from_index(index, nb, block), H)
    o_slc, _ = attend(q, expand_kv(k, H), expand_kv(v, H), mask)
    o = g_cmp[..., None] * up(o_cmp) + g_slc[..., None] * up(o_slc)
    return o.to(q.dtype), index


# ---- 1D causal (LM) ---------------------------------------------------------------------------------------
def select_causal(scores: torch.Tensor, top_n: int, block: int, n_initial: int = 1, n_local: int = 2,
                  start: int = 0) -> torch.Tensor:
    """Per-token block selection for causal NSA. scores: [B, Hkv, N, NB] (summed over the group's heads) for the
    tokens at positions start, ..., start + N - 1 (start > 0 when decoding with a cache).

    Token t may pick blocks whose first token is <= t (its own block is partly in the future: the causal mask
    inside the selected attention handles that). The first `n_initial` blocks and the `n_local` blocks ending
    at t's own block are always chosen; top_n counts them (paper: n = 16 including 1 initial + 2 local).
    Returns [B, Hkv, N, S] int64 with S = min(top_n, NB); -1 marks an unused slot (early tokens).
    """
    B, Hkv, N, nb = scores.shape
    count = min(top_n, nb)
    t = torch.arange(start, start + N, device=scores.device)[:, None]
    j = torch.arange(nb, device=scores.device)[None, :]
    own = t // block
    allowed = j <= own  # [N, NB]
    forced = (j < n_initial) | ((j > own - n_local) & allowed)
    ranked = scores.float().masked_fill(forced, float("inf")).masked_fill(~allowed, NEG_INF)
    top = ranked.topk(count, dim=-1)
    index = top.indices.masked_fill(top.values == NEG_INF, -1)
    return index.sort(dim=-1).values  # -1 slots first


def nsa_causal_reference(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, block: int, top_n: int, window: int = 0,
                         g_win=None, n_initial: int = 1, n_local: int = 2):
    """Causal 1D NSA. q: [B, H, T, K]; k, v: [B, Hkv, N, K]; k_cmp, v_cmp: [B, Hkv, N // block, K] where
    compressed token j summarises tokens [j*block, (j+1)*block); g_*: [B, H, T]. N need not divide by block.
    The T queries are the last T of the N tokens (T = N, or fewer when decoding with a cache).
    Returns (o, index [B, Hkv, T, S])."""
    B, H, T, K = q.shape
    N, nb = k.shape[2], k_cmp.shape[2]
    t, s = torch.arange(N - T, N, device=q.device), torch.arange(N, device=q.device)  # query and key positions
    # a query sees compressed block j only once the whole block is in its past
    cmp_mask = ((torch.arange(nb, device=q.device) + 1) * block - 1)[None, :] <= t[:, None]  # [T, NB]
    o_cmp, p_cmp = attend(q, expand_kv(k_cmp, H), expand_kv(v_cmp, H), cmp_mask)
    scores = p_cmp.view(B, k.shape[1], H // k.shape[1], T, nb).sum(2)  # [B, Hkv, T, NB] (NB may be 0)
    nb_sel = -(-N // block)  # a trailing partial block has no compressed token but can be selected (it is local)
    scores = torch.nn.functional.pad(scores, (0, nb_sel - nb))
    index = select_causal(scores, top_n, block, n_initial, n_local, start=N - T)
    sel = torch.zeros(B, k.shape[1], T, nb_sel + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, index % (nb_sel + 1), True)  # slot -1 lands in the spare last column
    token_mask = sel[..., :nb_sel].repeat_interleave(block, dim=-1)[..., :N]  # [B, Hkv, T, N]
    causal = s[None, :] <= t[:, None]
    o_slc, _ = attend(q, expand_kv(k, H), expand_kv(v, H), expand_kv(token_mask, H) & causal)
    o = g_cmp[..., None] * up(o_cmp) + g_slc[..., None] * up(o_slc)
    if window > 0:
        win = causal & (t[:, None] - s[None, :] < window)
        o_win, _ = attend(q, expand_kv(k, H), expand_kv(v, H), win)
        o = o + g_win[..., None] * up(o_win)
    return o.to(q.dtype), index
