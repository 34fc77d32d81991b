"""The CPU backend: every branch (clip, static, the gathered reference blocks) through PyTorch's
fused flash-attention CPU kernel with its log-sum-exp, merged exactly by the lse.

On a CPU the plain definition (`naive.py`) spends ~80 % of a render in the clip branch's
materialised [Lq, Lq] score matrix (bmm, exp, sub, mul over 4096 x 4096 per head for a 16-frame
chunk at 128²); the fused kernel streams it in tiles and returns its log-sum-exp, which is all the
exact merge (`merge.py`) needs. The reference branch already touches only the top-k blocks per
query block, so it stays as in the definition. Tested against `naive.py` (outputs, lse, gradients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import gather_reference_blocks
from .inputs import accumulation_dtype, ceil_div
from .merge import merge_by_lse


def fused_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _flash_with_lse(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                    key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ scale) v and its natural-log lse [B, H, M] (fp32) through the fused kernel;
    key_mask [B, H, 1, N] (True = attend). A row with no allowed key gets out 0 and lse -inf,
    as in merge.attend_with_lse (the kernel itself reports lse 0 there)."""
    additive = None
    if key_mask is not None:
        additive = torch.zeros(key_mask.shape, dtype=queries.dtype).masked_fill(~key_mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(queries, keys, values, 0.0, False, attn_mask=additive, scale=scale)[:2]
    lse = lse.float()
    if key_mask is not None:
        lse = torch.where(key_mask.any(-1), lse, torch.full_like(lse, float("-inf")))
    return out, lse


def cpu_attention(
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
    """The backend signature (see dispatch.py); the same function as naive_attention."""
    batch, heads, query_len, head_dim = q.shape
    assert q.device.type == "cpu" and k.shape == q.shape and v.shape == q.shape, (q.device, tuple(q.shape), tuple(k.shape))
    has_static = static_k is not None and static_k.shape[2] > 0
    has_reference = ref_k is not None and ref_k.shape[2] > 0 and block_indices is not None and block_indices.shape[-1] > 0
    kv_heads = next((t.shape[1] for t in (ref_k, static_k) if t is not None), heads)
    group_size = heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    work = accumulation_dtype(q.dtype)
    query = q.to(work)

    branches = [_flash_with_lse(query, k.to(work), v.to(work), scale)]
    if has_static:
        grouped = query.reshape(batch, kv_heads, group_size * query_len, head_dim)
        static_out, static_lse = _flash_with_lse(grouped, static_k.to(work), static_v.to(work), scale)
        branches.append((static_out.reshape(batch, heads, query_len, head_dim), static_lse.reshape(batch, heads, query_len)))
    if has_reference:
        query_blocks = ceil_div(query_len, block_size)
        padded_len = query_blocks * block_size
        # [B, H, nQ·b, d] -> [B, Hkv, nQ, G·b, d]: the G heads of a group share the chosen blocks.
        blocked = F.pad(query, (0, 0, 0, padded_len - query_len)).view(batch, kv_heads, group_size, query_blocks, block_size, head_dim)
        blocked = blocked.permute(0, 1, 3, 2, 4, 5).reshape(batch, kv_heads, query_blocks, group_size * block_size, head_dim)
        keys, values, valid = gather_reference_blocks(ref_k.to(work), ref_v.to(work), ref_lengths, block_indices, block_size)
        # The kernel takes 4-D inputs: the query blocks become its "heads".
        flat = batch * kv_heads
        ref_out, ref_lse = _flash_with_lse(blocked.reshape(flat, query_blocks, group_size * block_size, head_dim),
                                           keys.reshape(flat, query_blocks, -1, head_dim), values.reshape(flat, query_blocks, -1, head_dim),
                                           scale, valid.reshape(flat, query_blocks, 1, -1))
        ref_out = ref_out.view(batch, kv_heads, query_blocks, group_size, block_size, head_dim).permute(0, 1, 3, 2, 4, 5)
        ref_lse = ref_lse.view(batch, kv_heads, query_blocks, group_size, block_size).permute(0, 1, 3, 2, 4)
        branches.append((ref_out.reshape(batch, heads, padded_len, head_dim)[:, :, :query_len],
                         ref_lse.reshape(batch, heads, padded_len)[:, :, :query_len]))
    out, lse = merge_by_lse(branches)
    return out.to(q.dtype), lse
