"""Sparse reference attention in plain PyTorch: the definition of correct (the oracle).

Every backend (dense SDPA, FlexAttention, xformers, the fused Triton kernels) is tested against
this file. It favours obviousness over speed: each branch (clip keys, static keys, selected
reference blocks) is a separate masked softmax, and the three are merged exactly through their
log-sum-exps (`merge.py`), so the result is ONE softmax over the union of the keys.

Imported only by the tests, the benchmarks and, as the CPU fallback backend "naive", through the
one door in `dispatch._naive`; production code routes with `routing.py` and merges with
`merge.py`, never through this file.

Memory is O(B·H·Lq·k·b) for the reference branch (the gathered blocks are materialised), which is
fine for tests and small CPU runs; use a faster backend for long sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import gather_reference_blocks
from .inputs import accumulation_dtype, ceil_div
from .merge import attend_with_lse, merge_by_lse


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    static_k: torch.Tensor | None,
    static_v: torch.Tensor | None,
    ref_k: torch.Tensor | None,
    ref_v: torch.Tensor | None,
    ref_lengths: torch.Tensor | None,
    block_indices: torch.Tensor | None,
    block_size: int = 128,
    scale: float | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend signature, computed plainly. Returns (out [B,H,Lq,d] in q's dtype, lse [B,H,Lq]).

    need_lse is accepted for the backend signature; the lse is always returned (the merge needs it).

    lse is fp32 (fp64 for fp64 inputs). block_indices [B, Hkv, nQ, K] (int, -1 = unused) is
    required whenever a non-empty reference is given; ids must lie in [-1, nR) and a repeated id
    counts twice (the front door's inputs satisfy both). Inputs are not validated, only asserted.
    """
    batch, heads, query_len, head_dim = q.shape
    assert k.shape == q.shape and v.shape == q.shape, (tuple(q.shape), tuple(k.shape), tuple(v.shape))
    has_static = static_k is not None and static_k.shape[2] > 0
    has_reference = ref_k is not None and ref_k.shape[2] > 0
    kv_heads = next((t.shape[1] for t in (ref_k, static_k) if t is not None), heads)
    assert kv_heads >= 1 and heads % kv_heads == 0, (heads, kv_heads)
    group_size = heads // kv_heads
    query_blocks = ceil_div(query_len, block_size)
    if has_reference:
        assert block_indices is not None and block_indices.dim() == 4, "block_indices are required with a reference"
        assert tuple(block_indices.shape[:3]) == (batch, kv_heads, query_blocks), (tuple(block_indices.shape), (batch, kv_heads, query_blocks))
    if scale is None:
        scale = head_dim ** -0.5
    work = accumulation_dtype(q.dtype)
    query = q.to(work)

    branches = [attend_with_lse(query, k.to(work), v.to(work), None, scale)]

    if has_static:
        grouped = query.reshape(batch, kv_heads, group_size * query_len, head_dim)
        static_out, static_lse = attend_with_lse(grouped, static_k.to(work), static_v.to(work), None, scale)
        branches.append((static_out.view(batch, heads, query_len, head_dim), static_lse.view(batch, heads, query_len)))

    if has_reference and block_indices.shape[-1] > 0:
        padded_len = query_blocks * block_size
        # [B, H, nQ·b, d] -> [B, Hkv, nQ, G·b, d]: the G heads of a group share the chosen blocks.
        blocked = F.pad(query, (0, 0, 0, padded_len - query_len)).view(batch, kv_heads, group_size, query_blocks, block_size, head_dim)
        blocked = blocked.permute(0, 1, 3, 2, 4, 5).reshape(batch, kv_heads, query_blocks, group_size * block_size, head_dim)
        keys, values, valid = gather_reference_blocks(ref_k.to(work), ref_v.to(work), ref_lengths, block_indices, block_size)
        ref_out, ref_lse = attend_with_lse(blocked, keys, values, valid[..., None, :], scale)
        ref_out = ref_out.view(batch, kv_heads, query_blocks, group_size, block_size, head_dim).permute(0, 1, 3, 2, 4, 5)
        ref_lse = ref_lse.view(batch, kv_heads, query_blocks, group_size, block_size).permute(0, 1, 3, 2, 4)
        ref_out = ref_out.reshape(batch, heads, padded_len, head_dim)[:, :, :query_len]
        ref_lse = ref_lse.reshape(batch, heads, padded_len)[:, :, :query_len]
        branches.append((ref_out, ref_lse))

    out, lse = merge_by_lse(branches)
    return out.to(q.dtype), lse
