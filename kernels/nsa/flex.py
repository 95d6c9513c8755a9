"""The selected branch through torch's flex_attention with a BlockMask: the peer to beat (notes/nsa.md).

Compiled with torch.compile on first use (tens of seconds on a CPU, once per shape). On the CPU it is forward
only (flex_attention has no CPU backward in torch 2.14): for sampling and for `sigma bench-attn --backends flex`.
"""
from __future__ import annotations

import torch

_compiled = None


def selected_flex(q, k, v, index, block: int):
    """q: [B, H, N, K]; k, v: [B, Hkv, N, K]; index: [B, Hkv, NB, S] -> o [B, H, N, K]."""
    global _compiled
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    B, hkv, nb, S = index.shape
    H = q.shape[1]
    idx = index.repeat_interleave(H // hkv, dim=1).to(torch.int32)  # the mask is per query head
    kv_num = torch.full((B, H, nb), S, dtype=torch.int32, device=q.device)
    kv_idx = torch.zeros(B, H, nb, nb, dtype=torch.int32, device=q.device)  # padded to NB columns
    kv_idx[..., :S] = idx
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=block)
    return _compiled(q, k, v, block_mask=mask, enable_gqa=H != hkv)
