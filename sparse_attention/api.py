"""The front door: validate, route, pick a backend, run it.

`sparse_reference_attention` is what the model calls. Validation (`inputs.py`) and routing
(`routing.py`) happen here once, so every backend receives the same normalised inputs (see
`dispatch.py` for the backend signature), computes the same function and only asserts.
No value of a GPU tensor is read here (no host sync) unless the caller passes block_indices:
a GPU ref_lengths is clamped to [0, Lr], GPU forced ids outside [0, nR) are dropped (see
inputs.py); CPU tensors are checked by value.
"""
from __future__ import annotations

import torch

from ..errors import UserFacingError
from . import dispatch
from .inputs import check_attention_inputs, check_block_indices, check_forced_blocks, check_top_k, clamp_ref_lengths
from .routing import block_centroids, select_reference_blocks


def sparse_reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    ref_k: torch.Tensor | None = None,
    ref_v: torch.Tensor | None = None,
    ref_lengths: torch.Tensor | None = None,
    *,
    block_indices: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
    block_size: int = 128,
    top_k: int = 8,
    forced_blocks: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """One softmax over clip keys ∪ static keys ∪ the selected reference blocks.

    q, k, v [B, H, Lq, d]; static_k/v [B, Hkv, S, d] or None; ref_k/v [B, Hkv, Lr, d] or None;
    ref_lengths LongTensor [B] or None (all Lr valid). Blocks are routed here unless
    block_indices are given (centroids are computed unless given). Returns out [B, H, Lq, d] in
    q's dtype, and with return_lse=True also lse [B, H, Lq] (fp32; fp64 for fp64 inputs).
    backend: "auto" | "naive" | "dense" | "flex" | "triton" | "xformers" (see dispatch.py;
    "reference" is a deprecated alias of "naive").
    """
    shapes = check_attention_inputs(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_size)
    check_top_k(top_k)
    if scale is None:
        scale = shapes.head_dim ** -0.5
    # Backends see an absent branch as None, never as a zero-length tensor.
    if static_k is not None and shapes.static_len == 0:
        static_k = static_v = None
    if ref_k is not None and shapes.ref_len == 0:
        ref_k = ref_v = ref_lengths = None
        block_indices = None
    if ref_k is None:
        block_indices = None
        ref_lengths = None
    else:
        ref_lengths = clamp_ref_lengths(ref_lengths, shapes.ref_len)  # a GPU tensor's values are not read
        if block_indices is None:
            if centroids is None:
                centroids = block_centroids(ref_k, ref_lengths, block_size)
            elif tuple(centroids.shape) != (shapes.batch, shapes.kv_heads, shapes.ref_blocks, shapes.head_dim):
                raise UserFacingError(
                    f"centroids must be [B, Hkv, nR, d] = {(shapes.batch, shapes.kv_heads, shapes.ref_blocks, shapes.head_dim)} "
                    f"for this reference and block_size={block_size}; got {tuple(centroids.shape)}. "
                    "Recompute them with reference_block_centroids(ref_k, ref_lengths, block_size)."
                )
            if forced_blocks is not None:
                check_forced_blocks(forced_blocks, shapes.batch, shapes.kv_heads, shapes.query_blocks, shapes.ref_blocks)
            # Validated above (no host sync for GPU tensors); routing does not check again.
            block_indices = select_reference_blocks(q, centroids, ref_lengths, block_size, top_k, forced_blocks)
        else:
            check_block_indices(block_indices, shapes)
            block_indices = block_indices.to(torch.int32)
        if ref_lengths is None:
            ref_lengths = torch.full((shapes.batch,), shapes.ref_len, dtype=torch.long, device=q.device)
    attention = dispatch.resolve_backend(backend, q, shapes)
    out, lse = attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices, block_size, scale, need_lse=return_lse)
    return (out, lse) if return_lse else out
