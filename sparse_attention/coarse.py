"""The coarse reference branch (optional, VSA-style): a gradient path for routing.

Top-k routing is a discrete choice, so the centroids that drive it get no gradient from the
sparse branch. The coarse branch attends each query block's mean over ALL reference block
centroids (keys = block means of K, values = block means of V), a cheap nQ×nR softmax. Its output,
broadcast back to the block's tokens, can be added by the model with a learned gate (zero-init),
which teaches the keys to make their block means informative -- the same scores routing uses.
"""
from __future__ import annotations

import torch

from ..errors import UserFacingError
from .blocks import valid_reference_blocks
from .inputs import accumulation_dtype, ceil_div, check_block_size, check_ref_lengths, clamp_ref_lengths
from .merge import attend_with_lse
from .routing import query_block_means


def coarse_reference_attention(
    q: torch.Tensor,
    centroids: torch.Tensor,
    value_centroids: torch.Tensor,
    ref_lengths: torch.Tensor | None = None,
    *,
    block_size: int = 128,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Block-mean queries attend over reference block centroids.

    q [B, H, Lq, d]; centroids = reference_block_centroids(ref_k, ...) and value_centroids =
    reference_block_centroids(ref_v, ...), both [B, Hkv, nR, d]. Each query head uses its own
    block-mean query (routing pools the G heads; here each head may look elsewhere). Blocks with
    no valid token are excluded; a batch item without any valid block gets zeros.
    Returns out [B, H, Lq, d] in q's dtype (every token of a query block gets its block's row),
    and with return_lse=True also lse [B, H, Lq] (fp32). Differentiable with respect to q,
    centroids and value_centroids (hence to ref_k and ref_v when those were computed from them
    with grad enabled).
    """
    check_block_size(block_size)
    for name, tensor in (("q", q), ("centroids", centroids), ("value_centroids", value_centroids)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or not tensor.is_floating_point():
            raise UserFacingError(f"{name} must be a floating-point 4-D tensor; got {getattr(tensor, 'shape', type(tensor).__name__)}.")
    batch, heads, query_len, head_dim = q.shape
    if centroids.shape != value_centroids.shape or centroids.shape[0] != batch or centroids.shape[3] != head_dim:
        raise UserFacingError(
            f"centroids and value_centroids must both be [B={batch}, Hkv, nR, d={head_dim}]; "
            f"got {tuple(centroids.shape)} and {tuple(value_centroids.shape)}."
        )
    kv_heads, ref_blocks = centroids.shape[1], centroids.shape[2]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise UserFacingError(f"query heads H={heads} must be a multiple of the centroids' key/value heads Hkv={kv_heads}.")
    check_ref_lengths(ref_lengths, batch, ref_blocks * block_size, q.device)  # values on the CPU only (no host sync)
    ref_lengths = clamp_ref_lengths(ref_lengths, ref_blocks * block_size)
    scale = head_dim ** -0.5 if scale is None else scale
    group_size = heads // kv_heads
    query_blocks = ceil_div(query_len, block_size)
    work = accumulation_dtype(q.dtype)

    block_queries = query_block_means(q, block_size).reshape(batch, kv_heads, group_size * query_blocks, head_dim)
    block_valid = valid_reference_blocks(ref_lengths, batch, ref_blocks * block_size, block_size, q.device)
    out, lse = attend_with_lse(block_queries, centroids.to(work), value_centroids.to(work), block_valid[:, None, None, :], scale)
    out = out.view(batch, heads, query_blocks, head_dim).repeat_interleave(block_size, dim=2)[:, :, :query_len]
    lse = lse.view(batch, heads, query_blocks).repeat_interleave(block_size, dim=2)[:, :, :query_len]
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
