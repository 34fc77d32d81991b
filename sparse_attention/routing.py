"""Routing: which reference blocks each query block attends to.

Block centroids (once per reference), query block means, scores, top-k with forced blocks first.
Production code (the front door, the model through `reference_block_centroids`) and the tests
both route here; the definition of the attention itself is `naive.py`. Vectorised, no Python
loops over blocks, no host sync in `select_reference_blocks` (the per-call part).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserFacingError
from .blocks import valid_positions, valid_reference_blocks
from .inputs import (
    accumulation_dtype,
    ceil_div,
    check_block_size,
    check_forced_blocks,
    check_ref_lengths,
    check_top_k,
    clamp_ref_lengths,
)


def block_centroids(ref_k: torch.Tensor, ref_lengths: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """reference_block_centroids without the input checks (the front door has validated)."""
    batch, kv_heads, ref_len, head_dim = ref_k.shape
    ref_blocks = ceil_div(ref_len, block_size)
    padded_len = ref_blocks * block_size
    keys = F.pad(ref_k.to(accumulation_dtype(ref_k.dtype)), (0, 0, 0, padded_len - ref_len))
    valid = valid_positions(ref_lengths, batch, padded_len, ref_k.device) & (torch.arange(padded_len, device=ref_k.device) < ref_len)
    # where, not multiply: padding may hold garbage (even NaN) that must not leak into the mean.
    keys = torch.where(valid[:, None, :, None], keys, torch.zeros((), dtype=keys.dtype, device=keys.device))
    sums = keys.view(batch, kv_heads, ref_blocks, block_size, head_dim).sum(dim=3)
    counts = valid.view(batch, ref_blocks, block_size).sum(dim=-1).clamp(min=1).to(sums.dtype)
    return sums / counts[:, None, :, None]


def reference_block_centroids(ref_k: torch.Tensor, ref_lengths: torch.Tensor | None = None, block_size: int = 128) -> torch.Tensor:
    """Mean of the valid keys of each reference block.

    ref_k [B, Hkv, Lr, d] -> centroids [B, Hkv, nR, d] in fp32 (fp64 for fp64 keys). Positions at
    or beyond ref_lengths[b] are excluded; a block with no valid key gets a zero centroid (routing
    never selects it anyway). ref_lengths values are checked (one host sync on a GPU).
    Differentiable with respect to ref_k (the coarse branch uses that).
    """
    check_block_size(block_size)
    if not isinstance(ref_k, torch.Tensor) or ref_k.dim() != 4 or not ref_k.is_floating_point():
        got = f"shape {tuple(ref_k.shape)}, dtype {ref_k.dtype}" if isinstance(ref_k, torch.Tensor) else type(ref_k).__name__
        raise UserFacingError(f"ref_k must be a floating-point tensor [B, Hkv, Lr, d]; got {got}.")
    # Once per reference (the model calls this when it builds a reference's caches), so the
    # values are read here even on a GPU: one host sync per reference, not per layer and step.
    check_ref_lengths(ref_lengths, ref_k.shape[0], ref_k.shape[2], ref_k.device, read_values=True)
    return block_centroids(ref_k, ref_lengths, block_size)


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
    Values of GPU index tensors are not read (no host sync): ref_lengths are clamped to
    [0, nR·b], forced ids outside [0, nR) count as -1; on the CPU both are checked.
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
    check_ref_lengths(ref_lengths, batch, ref_blocks * block_size, q.device)  # values on the CPU only
    ref_lengths = clamp_ref_lengths(ref_lengths, ref_blocks * block_size)  # a GPU tensor: clamped, not read
    if forced_blocks is not None:
        check_forced_blocks(forced_blocks, batch, kv_heads, ceil_div(query_len, block_size), ref_blocks)
    return select_reference_blocks(q, centroids, ref_lengths, block_size, top_k, forced_blocks)


@torch.no_grad()
def select_reference_blocks(q, centroids, ref_lengths, block_size, top_k, forced_blocks) -> torch.Tensor:
    """route_reference_blocks without the input checks, for callers that validated already.

    Forced ids outside [0, nR) (and blocks without valid tokens) are dropped like -1, so GPU
    callers need not read the ids' values (a host sync) to make them safe.
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
        in_range = (forced >= 0) & (forced < ref_blocks)
        forced_is_valid = in_range & torch.gather(forced_block_valid, -1, forced.clamp(0, ref_blocks - 1))
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
