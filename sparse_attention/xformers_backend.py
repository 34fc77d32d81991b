"""xformers backend (optional; used only where xformers imports and the tensors are on CUDA).

Inference only: `memory_efficient_attention_forward_requires_grad` is the xformers entry point
that returns the lse, but it has no autograd, and the branch merge needs the lse. So this
backend reports itself unavailable when any input requires grad, and training uses the fused,
Flex or dense backends instead.

Same plan as the definition (`naive.py`), with the xformers kernel doing each branch's softmax: clip branch
(H heads), static branch (Hkv heads, the G query heads of a group stacked as rows), reference
branch over the gathered selected blocks (one row-batch per (b, kv head, query block)) with an
additive mask for unused slots and padding; the three are merged by log-sum-exp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import gather_reference_blocks
from .inputs import AttentionShapes
from .merge import merge_by_lse

try:
    from xformers import ops as xops
except Exception:  # ImportError, or a broken build that fails while importing
    xops = None


def unavailable_reason(q: torch.Tensor, shapes: AttentionShapes) -> str:
    if xops is None or not hasattr(xops, "memory_efficient_attention_forward_requires_grad"):
        return "xformers is not installed (pip install xformers matching your torch)"
    if not q.is_cuda:
        return "xformers kernels need CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers kernels take fp16/bf16/fp32, not {q.dtype}"
    if shapes.needs_grad:
        return "the xformers backend is inference-only (its lse has no autograd); use triton, flex or dense for training"
    return ""


def _branch(query, key, value, bias, scale):
    """query [N, M, h, d], key/value [N, L, h, d] -> out [N, M, h, d], lse [N, h, M] fp32."""
    out, lse = xops.memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias=bias, scale=scale)
    lse = lse[..., : query.shape[1]].float()
    finite = torch.isfinite(lse)
    # A row that sees no key: xformers may leave NaN there; the merge only needs out 0, lse -inf.
    out = torch.where(finite.transpose(1, 2)[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, torch.where(finite, lse, torch.full_like(lse, float("-inf")))


def xformers_sparse_attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices, block_size, scale, need_lse=True):
    # The lse is always returned: the branch merge needs it anyway.
    inputs = (q, k, v, static_k, static_v, ref_k, ref_v)
    # dispatch offers this backend only without grad (unavailable_reason: shapes.needs_grad).
    assert not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)), "xformers backend: inference only"
    batch, heads, query_len, head_dim = q.shape
    to_rows = lambda tensor: tensor.transpose(1, 2)  # [B, H, L, d] -> xformers' [B, L, H, d]
    clip_out, clip_lse = _branch(to_rows(q), to_rows(k), to_rows(v), None, scale)
    branches = [(to_rows(clip_out).float(), clip_lse)]
    kv_heads = heads if static_k is None and ref_k is None else (static_k if static_k is not None else ref_k).shape[1]
    group_size = heads // kv_heads
    if static_k is not None:
        grouped = q.reshape(batch, kv_heads, group_size * query_len, head_dim)
        out, lse = _branch(to_rows(grouped), to_rows(static_k), to_rows(static_v), None, scale)
        branches.append((to_rows(out).reshape(batch, heads, query_len, head_dim).float(), lse.reshape(batch, heads, query_len)))
    if ref_k is not None and block_indices.shape[-1] > 0:
        query_blocks = block_indices.shape[2]
        padded_len = query_blocks * block_size
        blocked = F.pad(q, (0, 0, 0, padded_len - query_len)).view(batch, kv_heads, group_size, query_blocks, block_size, head_dim)
        rows = blocked.permute(0, 1, 3, 2, 4, 5).reshape(-1, group_size * block_size, 1, head_dim)
        keys, values, valid = gather_reference_blocks(ref_k, ref_v, ref_lengths, block_indices, block_size)
        key_count = keys.shape[3]
        # The kernel wants the bias' last dim padded to a multiple of 8 (then sliced back).
        padded_keys = -(-key_count // 8) * 8
        bias = torch.full((rows.shape[0], 1, rows.shape[1], padded_keys), float("-inf"), dtype=q.dtype, device=q.device)
        bias[..., :key_count].masked_fill_(valid.reshape(-1, 1, 1, key_count), 0.0)
        out, lse = _branch(rows, keys.reshape(-1, key_count, 1, head_dim), values.reshape(-1, key_count, 1, head_dim), bias[..., :key_count], scale)
        out = out.view(batch, kv_heads, query_blocks, group_size, block_size, head_dim).permute(0, 1, 3, 2, 4, 5)
        lse = lse.view(batch, kv_heads, query_blocks, group_size, block_size).permute(0, 1, 3, 2, 4)
        branches.append((
            out.reshape(batch, heads, padded_len, head_dim)[:, :, :query_len].float(),
            lse.reshape(batch, heads, padded_len)[:, :, :query_len],
        ))
    out, lse = merge_by_lse(branches)
    return out.to(q.dtype), lse
