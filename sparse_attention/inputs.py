"""Input validation for the public entries, and the call's sizes.

The public entries (`sparse_reference_attention`, `route_reference_blocks`,
`reference_block_centroids`, `coarse_reference_attention`) validate here, once per call; the
backends and the internal routing trust what they are given and only `assert` cheap shape facts.
Problems are reported as `UserFacingError` (a `ValueError`) naming the tensor, the shape it has
and the shape it should have.

Values of index tensors cost a host sync to read on a GPU, which on the H200 made the front door
2-3x slower than the fused forward it wraps. So:
  - ref_lengths: shape, dtype and device are always checked; the values are checked where that
    is free (a CPU tensor) and once per reference (`reference_block_centroids`, which the model
    calls when it builds a reference's caches); a GPU tensor at the front door is clamped to
    [0, Lr] on the device instead (`clamp_ref_lengths`), never read.
  - forced_blocks: shape and dtype always; values on the CPU only; on a GPU ids outside
    [0, nR) are treated like -1 (routing drops them).
  - block_indices given by the caller (never by the model): checked by value, one sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserFacingError


@dataclass(frozen=True)
class AttentionShapes:
    """Sizes of one sparse reference attention call (see sparse_attention/README.md)."""

    batch: int
    heads: int  # H: query heads (and clip key/value heads)
    kv_heads: int  # Hkv: static/reference key/value heads
    head_dim: int
    query_len: int  # Lq
    static_len: int  # S (0 when there are no static tokens)
    ref_len: int  # Lr (0 when there is no reference)
    block_size: int
    needs_grad: bool = False  # grad mode on and some input requires grad (a backward will run)

    @property
    def group_size(self) -> int:
        """G: query heads sharing one key/value head."""
        return self.heads // self.kv_heads

    @property
    def query_blocks(self) -> int:
        return ceil_div(self.query_len, self.block_size)

    @property
    def ref_blocks(self) -> int:
        return ceil_div(self.ref_len, self.block_size)


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs; fp64 stays fp64 so gradcheck can run on the definition."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise UserFacingError(f"block_size must be a positive integer (e.g. 128); got {block_size!r}.")


def check_top_k(top_k: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise UserFacingError(f"top_k must be a non-negative integer (e.g. 8); got {top_k!r}.")


def _check_4d(name: str, tensor: torch.Tensor, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise UserFacingError(f"{name} must be a torch.Tensor laid out as {layout}; got {type(tensor).__name__}.")
    if tensor.dim() != 4:
        raise UserFacingError(f"{name} must be 4-D {layout}; got {_describe(tensor)}.")
    if not tensor.is_floating_point():
        raise UserFacingError(f"{name} must be a floating-point tensor (fp32, fp16 or bf16); got {_describe(tensor)}.")


def check_ref_lengths(
    ref_lengths: torch.Tensor | None, batch: int, ref_len: int, device: torch.device, *, read_values: bool = False
) -> None:
    """Shape, dtype and device of ref_lengths; its values too when it lives on the CPU (free) or
    when read_values=True (one host sync on a GPU: for once-per-reference callers)."""
    if ref_lengths is None:
        return
    if not isinstance(ref_lengths, torch.Tensor) or ref_lengths.dim() != 1 or ref_lengths.shape[0] != batch:
        got = _describe(ref_lengths) if isinstance(ref_lengths, torch.Tensor) else type(ref_lengths).__name__
        raise UserFacingError(f"ref_lengths must be an integer tensor of shape [B]=[{batch}]; got {got}.")
    if ref_lengths.is_floating_point() or ref_lengths.is_complex() or ref_lengths.dtype == torch.bool:
        raise UserFacingError(f"ref_lengths must hold integers (torch.long); got {ref_lengths.dtype}.")
    if ref_lengths.device != device:
        raise UserFacingError(f"ref_lengths is on {ref_lengths.device} but the queries are on {device}; move it with .to(q.device).")
    if batch and (read_values or ref_lengths.device.type == "cpu"):
        low, high = torch.stack([ref_lengths.min(), ref_lengths.max()]).tolist()  # a host sync off the CPU
        if low < 0 or high > ref_len:
            raise UserFacingError(f"ref_lengths must lie in [0, Lr={ref_len}]; got values from {low} to {high}.")


def clamp_ref_lengths(ref_lengths: torch.Tensor | None, ref_len: int) -> torch.Tensor | None:
    """ref_lengths whose values were not read (a GPU tensor), clamped to [0, Lr] on its device:
    one small kernel, no host sync. Every backend then sees lengths in range."""
    if ref_lengths is None or ref_lengths.device.type == "cpu":
        return ref_lengths
    return ref_lengths.clamp(0, ref_len)


def check_forced_blocks(forced_blocks: torch.Tensor, batch: int, kv_heads: int, query_blocks: int, ref_blocks: int) -> None:
    """Integer [B|1, Hkv|1, nQ, F]; ids in [-1, nR) checked on a CPU tensor only (on a GPU,
    routing drops ids outside [0, nR) like -1, without a host sync)."""
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
    if forced_blocks.numel() and forced_blocks.device.type == "cpu":
        low, high = torch.stack([forced_blocks.min(), forced_blocks.max()]).tolist()
        if low < -1 or high >= ref_blocks:
            raise UserFacingError(
                f"forced_blocks must hold reference block ids in [0, nR={ref_blocks}) or -1; got values from {low} to {high}."
            )


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    static_k: torch.Tensor | None,
    static_v: torch.Tensor | None,
    ref_k: torch.Tensor | None,
    ref_v: torch.Tensor | None,
    ref_lengths: torch.Tensor | None,
    block_size: int,
) -> AttentionShapes:
    """Validate one call's tensors and return its sizes; raise UserFacingError on any mismatch.

    Reads no tensor values except those of a CPU ref_lengths (see the module docstring)."""
    check_block_size(block_size)
    _check_4d("q", q, "[B, H, Lq, d]")
    batch, heads, query_len, head_dim = q.shape
    for name, tensor in (("k", k), ("v", v)):
        _check_4d(name, tensor, "[B, H, Lq, d]")
        if tensor.shape != q.shape:
            raise UserFacingError(
                f"{name} must have the same shape as q {tuple(q.shape)} (clip keys/values use all H heads); got {_describe(tensor)}."
            )

    kv_heads = None
    lengths = {}
    for branch, key, value, length_name in (("static", static_k, static_v, "S"), ("ref", ref_k, ref_v, "Lr")):
        if (key is None) != (value is None):
            raise UserFacingError(f"pass both {branch}_k and {branch}_v, or neither.")
        if key is None:
            lengths[branch] = 0
            continue
        layout = f"[B, Hkv, {length_name}, d]"
        _check_4d(f"{branch}_k", key, layout)
        _check_4d(f"{branch}_v", value, layout)
        if key.shape != value.shape:
            raise UserFacingError(f"{branch}_k and {branch}_v must have the same shape; got {tuple(key.shape)} and {tuple(value.shape)}.")
        if key.shape[0] != batch or key.shape[3] != head_dim:
            raise UserFacingError(
                f"{branch}_k must be {layout} with B={batch} and d={head_dim} like q; got {_describe(key)}."
            )
        if kv_heads is not None and key.shape[1] != kv_heads:
            raise UserFacingError(
                f"static and reference branches must have the same number of key/value heads; got {kv_heads} and {key.shape[1]}."
            )
        kv_heads = key.shape[1]
        lengths[branch] = key.shape[2]

    if kv_heads is None:
        kv_heads = heads
    if kv_heads < 1 or heads % kv_heads != 0:
        raise UserFacingError(
            f"the number of query heads H={heads} must be a multiple of the key/value heads Hkv={kv_heads} "
            "(grouped-query attention); choose kv_heads that divides heads."
        )

    for name, tensor in (("k", k), ("v", v), ("static_k", static_k), ("static_v", static_v), ("ref_k", ref_k), ("ref_v", ref_v)):
        if tensor is None:
            continue
        if tensor.dtype != q.dtype:
            raise UserFacingError(f"{name} has dtype {tensor.dtype} but q has {q.dtype}; cast all attention inputs to one dtype.")
        if tensor.device != q.device:
            raise UserFacingError(f"{name} is on {tensor.device} but q is on {q.device}; put all attention inputs on one device.")

    check_ref_lengths(ref_lengths, batch, lengths["ref"], q.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, static_k, static_v, ref_k, ref_v)
    )
    return AttentionShapes(
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        query_len=query_len,
        static_len=lengths["static"],
        ref_len=lengths["ref"],
        block_size=block_size,
        needs_grad=needs_grad,
    )


def check_block_indices(block_indices: torch.Tensor, shapes: AttentionShapes) -> None:
    """Block indices must be integer [B, Hkv, nQ, K] with ids in [-1, nR), none repeated in a row.

    Reads the values (one host sync on a GPU): only for caller-given block_indices, which the
    model never passes; a wrong id would index out of bounds in some backends."""
    expected = (shapes.batch, shapes.kv_heads, shapes.query_blocks)
    if (
        not isinstance(block_indices, torch.Tensor)
        or block_indices.dim() != 4
        or tuple(block_indices.shape[:3]) != expected
    ):
        got = _describe(block_indices) if isinstance(block_indices, torch.Tensor) else type(block_indices).__name__
        raise UserFacingError(
            f"block_indices must be an integer tensor [B, Hkv, nQ, K] = [{expected[0]}, {expected[1]}, {expected[2]}, K] "
            f"(from route_reference_blocks); got {got}."
        )
    if block_indices.is_floating_point() or block_indices.dtype == torch.bool:
        raise UserFacingError(f"block_indices must hold integers (int32); got {block_indices.dtype}.")
    if block_indices.numel():
        ordered = block_indices.sort(dim=-1).values
        repeated = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()
        low, high, has_repeats = torch.stack([block_indices.min(), block_indices.max(), repeated.to(block_indices.dtype)]).tolist()
        if low < -1 or high >= shapes.ref_blocks:
            raise UserFacingError(
                f"block_indices must hold reference block ids in [0, nR={shapes.ref_blocks}) or -1 for an unused slot; "
                f"got values from {low} to {high}."
            )
        if has_repeats:
            # A repeated block would be counted twice by some backends and once by others.
            raise UserFacingError("block_indices repeat a block id within one query block; each id may appear once (use -1 for unused slots).")
