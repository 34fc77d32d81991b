"""FlexAttention backend (torch.nn.attention.flex_attention), used where it exists.

Three Flex calls, merged exactly by their log-sum-exps (`merge.py`, as in the definition `naive.py`):
  clip      q·k over the Lq clip tokens, H heads, no mask;
  static    q·static_k, GQA (enable_gqa) so the Hkv static heads are never repeated;
  reference q·ref_k with a BlockMask built by `BlockMask.from_kv_blocks` straight from the routed
            block_indices: blocks wholly inside ref_lengths[b] are "full" (no mask_mod work),
            the block that straddles the length is "partial" and masked by a mask_mod.
Separate calls rather than one call over a concatenated [clip | static | ref] key sequence,
because concatenation would copy the whole (possibly million-token) reference per call, and the
clip branch's H heads would force repeating the reference's Hkv heads G times.

On CUDA the calls go through torch.compile (the fused Flex kernel); elsewhere Flex runs its
unfused eager implementation, which is only good for tests. Gradients reach q, k, v and the
static/reference keys and values through Flex's own backward (including through the lse).
"""
from __future__ import annotations

import inspect

import torch

from .inputs import AttentionShapes, ceil_div
from .merge import merge_by_lse

try:  # FlexAttention: torch >= 2.5; the differentiable lse used by the merge needs a recent one.
    from torch.nn.attention import flex_attention as _flex_module
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    _flex_module = None
    BlockMask = None
    flex_attention = None

_MIN_TORCH = (2, 6)
_FROM_KV_BLOCKS_TAKES_COMPUTE_Q_BLOCKS = BlockMask is not None and hasattr(BlockMask, "from_kv_blocks") and (
    "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
)
_compiled_flex = None


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def unavailable_reason(q: torch.Tensor, shapes: AttentionShapes) -> str:
    """"" when Flex can run these inputs, else why not."""
    if flex_attention is None or not hasattr(BlockMask, "from_kv_blocks"):
        return f"torch {torch.__version__} has no FlexAttention with BlockMask.from_kv_blocks"
    if _torch_version() < _MIN_TORCH:
        return f"the Flex backend needs torch >= {_MIN_TORCH[0]}.{_MIN_TORCH[1]} (differentiable lse); found {torch.__version__}"
    if q.is_cuda and q.dtype == torch.float64:
        return "Flex's CUDA kernels do not take float64"
    if q.is_cuda and shapes.block_size % 16 != 0:
        return f"Flex's CUDA kernels need a block size that is a multiple of 16; got {shapes.block_size}"
    if (
        q.is_cuda
        and shapes.block_size % 128 != 0
        and q.dtype in (torch.float16, torch.bfloat16)
        and shapes.needs_grad
    ):
        # Measured on H100 with torch 2.11: the forward compiles with 64-wide tiles and fp32
        # trains fine, but the fp16/bf16 backward fails to compile (NoValidChoicesError) for
        # every tile choice tried.
        return (
            f"Flex's {q.dtype} backward does not compile for block size {shapes.block_size}; "
            "use block size 128 or the triton backend for training"
        )
    return ""


def _kernel_options(block_size: int) -> dict | None:
    """Tile sizes for block sizes below Flex's default 128-wide tiles.

    Flex's fused kernel requires its tiles to divide the BlockMask block size; its default tiles
    are 128 wide, which fails for e.g. b = 64. The backward pairs (M1, N1) and (M2, N2) also need
    N1 % M1 == 0 and M2 % N2 == 0.
    """
    if block_size % 128 == 0:
        return None
    tile = 64 if block_size % 64 == 0 else (32 if block_size % 32 == 0 else 16)
    half = max(tile // 2, 16)
    return {"BLOCK_M": tile, "BLOCK_N": tile, "BLOCK_M1": half, "BLOCK_N1": tile, "BLOCK_M2": tile, "BLOCK_N2": half}


def _run_flex(query, key, value, block_mask, scale, enable_gqa, kernel_options=None):
    global _compiled_flex
    function = flex_attention
    kwargs = {"block_mask": block_mask, "scale": scale}
    if query.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        function = _compiled_flex
        if kernel_options:
            kwargs["kernel_options"] = kernel_options
    if enable_gqa:
        kwargs["enable_gqa"] = True
    aux_request = getattr(_flex_module, "AuxRequest", None)
    if aux_request is not None:
        out, aux = function(query, key, value, return_aux=aux_request(lse=True), **kwargs)
        lse = aux.lse
    else:
        out, lse = function(query, key, value, return_lse=True, **kwargs)
    return out, lse.float() if lse.dtype != torch.float64 else lse


def _compact(chosen: torch.Tensor, block_ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many blocks are chosen, and their ids first (padded with 0) in a [.., width] tensor."""
    counts = chosen.sum(dim=-1, dtype=torch.int32)
    order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices
    ids = torch.where(chosen, block_ids, torch.zeros_like(block_ids)).gather(-1, order)
    if ids.shape[-1] >= width:
        ids = ids[..., :width]
    else:
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[-1]))
    return counts, ids.to(torch.int32).contiguous()


def reference_block_mask(block_indices, ref_lengths, heads, query_len, ref_len, block_size, for_backward=True):
    """BlockMask over (Lq queries, Lr reference keys) selecting the routed blocks of each query block."""
    group_size = heads // block_indices.shape[1]
    indices = block_indices.to(torch.long).repeat_interleave(group_size, dim=1)  # [B, H, nQ, K]
    ref_blocks = ceil_div(ref_len, block_size)
    lengths = ref_lengths.to(torch.long)
    block_end = (indices + 1) * block_size
    used = indices >= 0
    full = used & (block_end <= lengths[:, None, None, None])
    partial = used & ~full & (indices * block_size < lengths[:, None, None, None])
    partial_counts, partial_ids = _compact(partial, indices, ref_blocks)
    full_counts, full_ids = _compact(full, indices, ref_blocks)

    # The mask_mod must state the whole rule, not only the length: Flex's fused kernel skips
    # unselected blocks by the block lists, but its eager path (CPU) evaluates only the mask_mod.
    selected = torch.zeros(*block_indices.shape[:3], ref_blocks + 1, dtype=torch.bool, device=indices.device)
    selected.scatter_(-1, torch.where(block_indices >= 0, block_indices.to(torch.long), ref_blocks), True)

    def selected_and_within_length(batch, head, query_index, key_index):
        chosen = selected[batch, head // group_size, query_index // block_size, key_index // block_size]
        return chosen & (key_index < lengths[batch])

    options = {}
    if not for_backward and _FROM_KV_BLOCKS_TAKES_COMPUTE_Q_BLOCKS:
        options["compute_q_blocks"] = False  # the transposed (per key block) lists serve only the backward
    return BlockMask.from_kv_blocks(
        partial_counts, partial_ids, full_counts, full_ids,
        BLOCK_SIZE=block_size, mask_mod=selected_and_within_length, seq_lengths=(query_len, ref_len), **options,
    )


def flex_sparse_attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices, block_size, scale, need_lse=True):
    # The lse is always returned: the branch merge needs it anyway.
    heads, query_len = q.shape[1], q.shape[2]
    branches = [_run_flex(q, k, v, None, scale, enable_gqa=False)]
    if static_k is not None:
        branches.append(_run_flex(q, static_k, static_v, None, scale, enable_gqa=static_k.shape[1] != heads))
    if ref_k is not None and block_indices.shape[-1] > 0:
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, static_k, static_v, ref_k, ref_v))
        mask = reference_block_mask(block_indices, ref_lengths, heads, query_len, ref_k.shape[2], block_size, for_backward=needs_grad)
        branches.append(_run_flex(q, ref_k, ref_v, mask, scale, enable_gqa=ref_k.shape[1] != heads, kernel_options=_kernel_options(block_size)))
    if len(branches) == 1:
        out, lse = branches[0]
        return out, lse
    out, lse = merge_by_lse([(branch_out.to(lse.dtype), lse) for branch_out, lse in branches])
    return out.to(q.dtype), lse
