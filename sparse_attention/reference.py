"""Sparse reference attention in plain PyTorch: the definition of correct.

Every backend (dense SDPA, FlexAttention, xformers, the fused Triton kernels) is tested against
this file. It favours obviousness over speed: each branch (clip keys, static keys, selected
reference blocks) is a separate masked softmax, and the three are merged exactly through their
log-sum-exps, so the result is ONE softmax over the union of the keys.

Memory is O(B·H·Lq·k·b) for the reference branch (the gathered blocks are materialised), which is
fine for tests and small CPU runs; use a faster backend for long sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserFacingError
from .inputs import (
    ceil_div,
    check_attention_inputs,
    check_block_indices,
    check_block_size,
    check_ref_lengths,
    check_top_k,
)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs; fp64 stays fp64 so gradcheck can run on the definition."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def reference_block_centroids(ref_k: torch.Tensor, ref_lengths: torch.Tensor | None = None, block_size: int = 128) -> torch.Tensor:
    """Mean of the valid keys of each reference block.

    ref_k [B, Hkv, Lr, d] -> centroids [B, Hkv, nR, d] in fp32 (fp64 for fp64 keys). Positions at
    or beyond ref_lengths[b] are excluded; a block with no valid key gets a zero centroid (routing
    never selects it anyway). Differentiable with respect to ref_k (the coarse branch uses that).
    """
    check_block_size(block_size)
    if not isinstance(ref_k, torch.Tensor) or ref_k.dim() != 4 or not ref_k.is_floating_point():
        got = f"shape {tuple(ref_k.shape)}, dtype {ref_k.dtype}" if isinstance(ref_k, torch.Tensor) else type(ref_k).__name__
        raise UserFacingError(f"ref_k must be a floating-point tensor [B, Hkv, Lr, d]; got {got}.")
    batch, kv_heads, ref_len, head_dim = ref_k.shape
    check_ref_lengths(ref_lengths, batch, ref_len, ref_k.device)
    ref_blocks = ceil_div(ref_len, block_size)
    padded_len = ref_blocks * block_size
    keys = F.pad(ref_k.to(accumulation_dtype(ref_k.dtype)), (0, 0, 0, padded_len - ref_len))
    valid = valid_positions(ref_lengths, batch, padded_len, ref_k.device) & (torch.arange(padded_len, device=ref_k.device) < ref_len)
    # where, not multiply: padding may hold garbage (even NaN) that must not leak into the mean.
    keys = torch.where(valid[:, None, :, None], keys, torch.zeros((), dtype=keys.dtype, device=keys.device))
    sums = keys.view(batch, kv_heads, ref_blocks, block_size, head_dim).sum(dim=3)
    counts = valid.view(batch, ref_blocks, block_size).sum(dim=-1).clamp(min=1).to(sums.dtype)
    return sums / counts[:, None, :, None]


def query_block_means(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """q [B, H, Lq, d] -> [B, H, nQ, d] fp32: mean of the real queries of each block (last block may be partial).

    Reduces in q's storage with an fp32 accumulator, so no fp32 copy of q is made (routing runs
    at every layer and step and should cost next to nothing).
    """
    batch, heads, query_len, head_dim = q.shape
    work = accumulation_dtype(q.dtype)
    full_blocks, tail = divmod(query_len, block_size)
    parts = []
    if full_blocks:
        whole = q[:, :, : full_blocks * block_size].reshape(batch, heads, full_blocks, block_size, head_dim)
        parts.append(whole.sum(dim=3, dtype=work) / block_size)
    if tail:
        parts.append(q[:, :, full_blocks * block_size:].sum(dim=2, keepdim=True, dtype=work) / tail)
    if not parts:
        return q.new_zeros((batch, heads, 0, head_dim), dtype=work)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def check_forced_blocks(forced_blocks: torch.Tensor, batch: int, kv_heads: int, query_blocks: int, ref_blocks: int) -> None:
    shape = tuple(forced_blocks.shape) if isinstance(forced_blocks, torch.Tensor) else None
    ok = (
        shape is not None
        and len(shape) == 4
        and shape[0] in (1, batch)
        and shape[1] in (1, kv_heads)
        and shape[2] == query_blocks
        and not forced_blocks.is_floating_point()
        and forced_blocks.dtype != torch.bool
    )
    if not ok:
        got = f"shape {shape}, dtype {forced_blocks.dtype}" if shape is not None else type(forced_blocks).__name__
        raise UserFacingError(
            f"forced_blocks must be an integer tensor [B, Hkv, nQ, F] = [{batch}, {kv_heads}, {query_blocks}, F] "
            f"(B and Hkv may be 1 to broadcast; -1 = no block); got {got}."
        )
    if forced_blocks.numel():
        low, high = torch.stack([forced_blocks.min(), forced_blocks.max()]).tolist()  # one host sync
        if low < -1 or high >= ref_blocks:
            raise UserFacingError(
                f"forced_blocks must hold reference block ids in [0, nR={ref_blocks}) or -1; got values from {low} to {high}."
            )


@torch.no_grad()
def route_reference_blocks(
    q: torch.Tensor,
    centroids: torch.Tensor,
    ref_lengths: torch.Tensor | None = None,
    *,
    block_size: int = 128,
    top_k: int = 8,
    forced_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose, for each query block and key/value head, the reference blocks it attends to.

    q [B, H, Lq, d]; centroids [B, Hkv, nR, d]. The block mean of q, pooled over the G query heads
    of each group, is scored against the centroids; blocks without valid tokens are never chosen.
    Returns int32 [B, Hkv, nQ, top_k + F]: the (valid, de-duplicated) forced blocks first, then the
    best-scoring blocks in descending score; chosen ids come before the unused slots (-1).
    Runs without gradient: the discrete choice has none (see coarse_reference_attention).
    """
    check_block_size(block_size)
    check_top_k(top_k)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise UserFacingError("q must be a tensor [B, H, Lq, d].")
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 4:
        raise UserFacingError("centroids must be a tensor [B, Hkv, nR, d] (from reference_block_centroids).")
    batch, heads, query_len, head_dim = q.shape
    if centroids.shape[0] != batch or centroids.shape[3] != head_dim:
        raise UserFacingError(
            f"centroids must be [B={batch}, Hkv, nR, d={head_dim}] to match q {tuple(q.shape)}; got {tuple(centroids.shape)}."
        )
    kv_heads, ref_blocks = centroids.shape[1], centroids.shape[2]
    if kv_heads < 1 or heads % kv_heads != 0:
        raise UserFacingError(f"query heads H={heads} must be a multiple of the centroids' key/value heads Hkv={kv_heads}.")
    if ref_lengths is not None:
        check_ref_lengths(ref_lengths, batch, ref_blocks * block_size, q.device)
    if forced_blocks is not None:
        check_forced_blocks(forced_blocks, batch, kv_heads, ceil_div(query_len, block_size), ref_blocks)
    return select_reference_blocks(q, centroids, ref_lengths, block_size, top_k, forced_blocks)


@torch.no_grad()
def select_reference_blocks(q, centroids, ref_lengths, block_size, top_k, forced_blocks) -> torch.Tensor:
    """route_reference_blocks without the input checks, for callers that validated already.

    The checks of ref_lengths and forced_blocks values cost a host sync each, which the front
    door should pay once per call, not twice.
    """
    batch, heads, query_len, head_dim = q.shape
    kv_heads, ref_blocks = centroids.shape[1], centroids.shape[2]
    group_size = heads // kv_heads
    query_blocks = ceil_div(query_len, block_size)
    forced_count = 0 if forced_blocks is None else forced_blocks.shape[-1]
    slots = top_k + forced_count
    device = q.device

    # This runs in every layer at every step, so it avoids kernels that cannot change the result
    # (each small kernel costs a launch): no mean over a single head, no mask when every block
    # is valid, no reordering when top-k's own descending order already puts unused slots last.
    pooled = query_block_means(q, block_size)
    if group_size > 1:
        pooled = pooled.view(batch, kv_heads, group_size, query_blocks, head_dim).mean(dim=2)
    scores = pooled @ centroids.to(pooled.dtype).transpose(-1, -2)  # [B, Hkv, nQ, nR]
    if ref_lengths is not None:
        block_starts = torch.arange(0, ref_blocks * block_size, block_size, device=device)
        block_empty = block_starts >= ref_lengths.to(device=device, dtype=torch.long)[:, None]  # [B, nR]
        scores.masked_fill_(block_empty[:, None, None, :], float("-inf"))

    if not forced_count:
        chosen = min(top_k, ref_blocks)
        top_scores, top_ids = scores.topk(chosen, dim=-1)  # descending: -inf (unusable) slots last
        top_ids.masked_fill_(torch.isneginf(top_scores), -1)
        if slots > chosen:
            top_ids = torch.cat([top_ids, top_ids.new_full((batch, kv_heads, query_blocks, slots - chosen), -1)], dim=-1)
        return top_ids.to(torch.int32)

    block_valid = valid_reference_blocks(ref_lengths, batch, ref_blocks * block_size, block_size, device)  # [B, nR]
    # Forced blocks first (valid ones, each once), then the top-k of the others.
    forced = forced_blocks.to(device=device, dtype=torch.long).expand(batch, kv_heads, query_blocks, forced_count)
    if ref_blocks:
        forced_block_valid = block_valid[:, None, None, :].expand(batch, kv_heads, query_blocks, ref_blocks)
        forced_is_valid = (forced >= 0) & torch.gather(forced_block_valid, -1, forced.clamp(min=0))
    else:
        forced_is_valid = torch.zeros_like(forced, dtype=torch.bool)
    # A later copy of an id already forced earlier in the row is dropped.
    same = forced[..., :, None] == forced[..., None, :]
    earlier = torch.ones(forced_count, forced_count, dtype=torch.bool, device=device).tril(diagonal=-1)
    repeated = (same & earlier).any(dim=-1)
    forced = torch.where(forced_is_valid & ~repeated, forced, torch.full_like(forced, -1))
    # Forced blocks must not be picked a second time by top-k: give them -inf (the extra
    # column swallows the scatter of the -1 slots).
    scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], 1), float("-inf"))], dim=-1)
    scores = scores.scatter(-1, torch.where(forced >= 0, forced, ref_blocks), float("-inf"))[..., :ref_blocks]
    pieces = [forced]

    chosen = min(top_k, ref_blocks)
    top_scores, top_ids = scores.topk(chosen, dim=-1)
    pieces.append(torch.where(torch.isneginf(top_scores), torch.full_like(top_ids, -1), top_ids))
    pieces.append(torch.full((batch, kv_heads, query_blocks, slots - forced_count - chosen), -1, dtype=torch.long, device=device))
    selected = torch.cat(pieces, dim=-1)
    # Chosen ids first, unused slots last, order otherwise kept (kernels may stop at the first -1).
    order = torch.sort((selected < 0).to(torch.int8), dim=-1, stable=True).indices
    return torch.gather(selected, -1, order).to(torch.int32)


def attend_with_lse(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(queries·keysᵀ·scale) · values over the allowed keys, and its log-sum-exp.

    queries [..., M, d], keys/values [..., N, d], key_mask broadcastable to [..., M, N] (True =
    attend). A row with no allowed key gets output 0 and lse -inf, with finite gradients, so the
    branch simply drops out of the log-sum-exp merge.
    """
    row_shape = queries.shape[:-1]
    if keys.shape[-2] == 0:
        return queries.new_zeros(queries.shape), queries.new_full(row_shape, float("-inf"))
    scores = (queries @ keys.transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    # The row max only stabilises exp(); it cancels exactly, so it needs no gradient.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    normaliser = weights.sum(dim=-1)
    has_keys = normaliser > 0
    safe_normaliser = torch.where(has_keys, normaliser, torch.ones_like(normaliser))
    out = (weights @ values) / safe_normaliser[..., None]
    lse = torch.where(has_keys, row_max[..., 0] + torch.log(safe_normaliser), torch.full_like(normaliser, float("-inf")))
    return out, lse


def merge_by_lse(branches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine softmax branches over disjoint key sets into the softmax over their union."""
    lse = torch.logsumexp(torch.stack([branch_lse for _, branch_lse in branches]), dim=0)
    out = sum(torch.exp(branch_lse - lse)[..., None] * branch_out for branch_out, branch_lse in branches)
    return out, lse


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


def reference_attention(
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
    required whenever a non-empty reference is given.
    """
    shapes = check_attention_inputs(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_size)
    has_reference = ref_k is not None and shapes.ref_len > 0
    if has_reference:
        if block_indices is None:
            raise UserFacingError("block_indices are required with a reference; get them from route_reference_blocks.")
        check_block_indices(block_indices, shapes)
    if scale is None:
        scale = shapes.head_dim ** -0.5
    work = accumulation_dtype(q.dtype)
    batch, heads, query_len, head_dim = q.shape
    kv_heads, group_size = shapes.kv_heads, shapes.group_size
    query = q.to(work)

    branches = [attend_with_lse(query, k.to(work), v.to(work), None, scale)]

    if static_k is not None and shapes.static_len > 0:
        grouped = query.reshape(batch, kv_heads, group_size * query_len, head_dim)
        static_out, static_lse = attend_with_lse(grouped, static_k.to(work), static_v.to(work), None, scale)
        branches.append((static_out.view(batch, heads, query_len, head_dim), static_lse.view(batch, heads, query_len)))

    if has_reference and block_indices.shape[-1] > 0:
        query_blocks = shapes.query_blocks
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
