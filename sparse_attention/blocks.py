"""Reference blocks and positions: which are valid, and gathering the selected ones.

Shared by the definition (`naive.py`), the backends and routing; plain tensor code, no checks
(the public entries have validated, see `inputs.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import ceil_div


def valid_positions(ref_lengths: torch.Tensor | None, batch: int, padded_len: int, device: torch.device) -> torch.Tensor:
    """[B, padded_len] bool: True where a reference position holds a real token."""
    positions = torch.arange(padded_len, device=device)
    if ref_lengths is None:  # all valid; positions past Lr (block padding) are the caller's business
        return torch.ones(batch, padded_len, dtype=torch.bool, device=device)
    return positions[None, :] < ref_lengths.to(device=device, dtype=torch.long)[:, None]


def valid_reference_blocks(ref_lengths: torch.Tensor | None, batch: int, ref_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    """[B, nR] bool: True for blocks holding at least one valid reference token."""
    block_starts = torch.arange(ceil_div(ref_len, block_size), device=device) * block_size
    lengths = torch.full((batch,), ref_len, device=device, dtype=torch.long) if ref_lengths is None else ref_lengths.to(device=device, dtype=torch.long)
    return block_starts[None, :] < lengths[:, None]


def gather_reference_blocks(
    ref_k: torch.Tensor, ref_v: torch.Tensor, ref_lengths: torch.Tensor | None, block_indices: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values and validity of the selected blocks, per query block.

    Returns keys/values [B, Hkv, nQ, K·b, d] and valid [B, Hkv, nQ, K·b] (False for unused slots
    and for positions at or beyond the reference length). Invalid keys/values are zeroed so that
    garbage in padding cannot reach outputs or gradients.
    """
    batch, kv_heads, ref_len, head_dim = ref_k.shape
    ref_blocks = ceil_div(ref_len, block_size)
    padding = (0, 0, 0, ref_blocks * block_size - ref_len)
    key_blocks = F.pad(ref_k, padding).view(batch, kv_heads, ref_blocks, block_size, head_dim)
    value_blocks = F.pad(ref_v, padding).view(batch, kv_heads, ref_blocks, block_size, head_dim)
    indices = block_indices.to(device=ref_k.device, dtype=torch.long)
    query_blocks, slots = indices.shape[2], indices.shape[3]
    safe = indices.clamp(min=0)
    batch_index = torch.arange(batch, device=ref_k.device)[:, None, None, None]
    head_index = torch.arange(kv_heads, device=ref_k.device)[None, :, None, None]
    keys = key_blocks[batch_index, head_index, safe]  # [B, Hkv, nQ, K, b, d]
    values = value_blocks[batch_index, head_index, safe]
    positions = safe[..., None] * block_size + torch.arange(block_size, device=ref_k.device)
    lengths = torch.full((batch,), ref_len, device=ref_k.device, dtype=torch.long) if ref_lengths is None else ref_lengths.to(device=ref_k.device, dtype=torch.long)
    valid = (indices >= 0)[..., None] & (positions < lengths[:, None, None, None, None]) & (positions < ref_len)
    zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
    keys = torch.where(valid[..., None], keys, zero)
    values = torch.where(valid[..., None], values, zero)
    flat = (batch, kv_heads, query_blocks, slots * block_size)
    return keys.reshape(*flat, head_dim), values.reshape(*flat, head_dim), valid.reshape(flat)
