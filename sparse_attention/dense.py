"""Dense SDPA backend: one `scaled_dot_product_attention` call over [clip; static; whole reference]
with an explicit boolean mask that allows only the selected, valid reference positions.

Obviously equivalent to the definition and runs anywhere torch does, but it materialises a
[B, H, Lq, Lq+S+Lr] mask (and, when lse is wanted, the scores), so it suits CPU and short
references. GQA is done by repeating the static/reference heads (torch >= 2.4 has no enable_gqa).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import valid_positions
from .inputs import accumulation_dtype


def selected_reference_mask(
    block_indices: torch.Tensor, ref_lengths: torch.Tensor, query_len: int, ref_len: int, block_size: int
) -> torch.Tensor:
    """[B, Hkv, Lq, Lr] bool: query position attends to reference position (selected block and valid)."""
    batch, kv_heads, query_blocks, _ = block_indices.shape
    ref_blocks = -(-ref_len // block_size)
    indices = block_indices.to(torch.long)
    # Scatter into one spare column so unused slots (-1) land somewhere harmless.
    chosen = torch.zeros(batch, kv_heads, query_blocks, ref_blocks + 1, dtype=torch.bool, device=indices.device)
    chosen.scatter_(-1, torch.where(indices >= 0, indices, ref_blocks), True)
    chosen = chosen[..., :ref_blocks]
    per_position = chosen.repeat_interleave(block_size, dim=-1)[..., :ref_len]  # [B, Hkv, nQ, Lr]
    per_query = per_position.repeat_interleave(block_size, dim=2)[:, :, :query_len]  # [B, Hkv, Lq, Lr]
    valid = valid_positions(ref_lengths, batch, ref_len, indices.device)
    return per_query & valid[:, None, None, :]


def dense_sparse_attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices, block_size, scale, need_lse=True):
    """Returns (out, lse); lse is None when need_lse is False (then one fused SDPA call does it all)."""
    batch, heads, query_len, head_dim = q.shape
    # On CPU SDPA would accumulate fp16/bf16 in low precision; the contract asks for fp32.
    work = accumulation_dtype(q.dtype) if not q.is_cuda else q.dtype
    keys, values = [k.to(work)], [v.to(work)]
    kv_heads = heads
    for branch_k, branch_v in ((static_k, static_v), (ref_k, ref_v)):
        if branch_k is not None:
            kv_heads = branch_k.shape[1]
    group_size = heads // kv_heads
    masks = [torch.ones(batch, kv_heads, query_len, query_len + (0 if static_k is None else static_k.shape[2]), dtype=torch.bool, device=q.device)]
    if static_k is not None:
        keys.append(static_k.to(work).repeat_interleave(group_size, dim=1))
        values.append(static_v.to(work).repeat_interleave(group_size, dim=1))
    if ref_k is not None:
        keys.append(ref_k.to(work).repeat_interleave(group_size, dim=1))
        values.append(ref_v.to(work).repeat_interleave(group_size, dim=1))
        masks.append(selected_reference_mask(block_indices, ref_lengths, query_len, ref_k.shape[2], block_size))
    all_keys, all_values = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    mask = torch.cat(masks, dim=-1).repeat_interleave(group_size, dim=1)  # [B, H, Lq, Lk]
    query = q.to(work)
    if not need_lse:
        out = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=mask, scale=scale)
        return out.to(q.dtype), None
    # SDPA does not return the lse: take both from one explicit score matrix (every row has
    # its clip keys, so no row is fully masked).
    exact = accumulation_dtype(q.dtype)
    scores = ((query.to(exact) @ all_keys.to(exact).transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ all_values.to(exact)
    return out.to(q.dtype), lse
