"""Pick the attention backend for a call.

Every backend computes the same function (`naive.py` defines it) with one signature:

    attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices,
              block_size, scale, need_lse=True) -> (out [B,H,Lq,d] in q's dtype, lse [B,H,Lq] fp32)

(with need_lse=False a backend may return None for the lse and skip computing it)

where the front door (`api.py`) has already validated the inputs, turned empty branches into
None, filled ref_lengths (in [0, Lr]) and routed block_indices (int32 [B,Hkv,nQ,K], -1 = unused
slot). Backends trust these inputs and only assert cheap shape facts.

Which backend runs, strongest first:
  1. the `backend=` argument of `sparse_reference_attention` (anything but "auto"),
  2. the environment variable SPARSE_AVATAR_ATTENTION,
  3. `set_default_backend(name)` (for scripts; nothing in the pack calls it),
  4. "auto": fused Triton (CUDA, supported dtype/head dim) -> FlexAttention (CUDA) ->
     xformers (CUDA) -> dense SDPA; on a CPU without gradients (rendering) "cpu" (`cpu.py`:
     PyTorch's fused flash kernel for the clip and static branches), with gradients dense SDPA,
     or naive when the dense mask gets large.
A backend named explicitly (1-3) that cannot run these inputs is an error, never a silent swap.

The ComfyUI node Load Avatar Model never calls `set_default_backend`: it stores its choice on the
model (`AvatarModel.set_attention_backend`), which reaches here as the `backend=` argument (1). Its
"auto" becomes `backend_for_comfyui_flags(comfy.cli_args.args)`, so under ComfyUI started with
--use-pytorch-cross-attention the node's "auto" is "dense" and beats SPARSE_AVATAR_ATTENTION;
without that flag it stays "auto" and the environment variable decides.

"naive" (the plain-PyTorch definition) was called "reference" until "reference" came to mean
the reference video only; "reference" is still accepted, with a one-time logged warning, so
saved settings (SPARSE_AVATAR_ATTENTION=reference, node choices, scripts) keep working.
`_naive` is the one door through which production code reaches naive.py.
"""
from __future__ import annotations
# Backends are imported when first chosen: flex needs torch >= 2.5, xformers is a GPU extra, the
# Triton kernels need triton; a CPU install must import this module without any of them.

import importlib
import logging
import os
from typing import Callable

import torch

from ..errors import UserFacingError
from .inputs import AttentionShapes

ENV_VAR = "SPARSE_AVATAR_ATTENTION"
BACKEND_NAMES = ("triton", "flex", "xformers", "dense", "cpu", "naive")
AUTO = "auto"
# Old name -> backend name. Accepted everywhere a name is (argument, env var, default), with a
# logged warning once per old name per process.
DEPRECATED_NAMES = {"reference": "naive"}

logger = logging.getLogger(__name__)
_warned_names: set[str] = set()

# The dense backend materialises a [B, H, Lq, Lq+S+Lr] mask and score matrix; above this many
# elements "auto" on CPU prefers the naive backend, whose reference branch only touches the
# selected blocks (B·H·Lq·k·b scores).
DENSE_AUTO_LIMIT = 1 << 26

_default_backend = AUTO

Attention = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def _check_name(name: str, what: str) -> str:
    normalised = str(name).strip().lower()
    if normalised in DEPRECATED_NAMES:
        new_name = DEPRECATED_NAMES[normalised]
        if normalised not in _warned_names:
            _warned_names.add(normalised)
            logger.warning(
                "attention backend %r (%s) is deprecated: the plain-PyTorch backend is now called %r "
                "(\"reference\" means the reference video). Using %r; please rename it.",
                normalised, what, new_name, new_name,
            )
        normalised = new_name
    if normalised not in (AUTO, *BACKEND_NAMES):
        raise UserFacingError(
            f"unknown attention backend {name!r} ({what}); choose one of: {', '.join((AUTO, *BACKEND_NAMES))}."
        )
    return normalised


def set_default_backend(name: str) -> None:
    """Backend used when neither the call nor SPARSE_AVATAR_ATTENTION names one ("auto" to reset)."""
    global _default_backend
    _default_backend = _check_name(name, "set_default_backend")


def backend_for_comfyui_flags(flags) -> str:
    """Map ComfyUI's attention command-line flags (comfy.cli_args.args) to a backend name.

    --use-pytorch-cross-attention asks for plain PyTorch SDPA -> "dense". Flash/Sage/xformers
    flags ask for the fastest kernels -> "auto" (fused Triton, else Flex, else xformers).
    No flag -> "auto". Takes any object with those attributes, so it needs no ComfyUI import.
    """
    if getattr(flags, "use_pytorch_cross_attention", False):
        return "dense"
    return AUTO


# ---- availability --------------------------------------------------------------------------


def _load_triton() -> tuple[object | None, str]:
    try:
        module = importlib.import_module(".triton_fused", __package__)
    except Exception as error:  # absent module or a broken triton install: fall through
        return None, f"sparse_attention.triton_fused could not be imported ({type(error).__name__}: {error})"
    if not hasattr(module, "fused_sparse_attention") or not hasattr(module, "is_supported"):
        return None, "sparse_attention.triton_fused lacks fused_sparse_attention/is_supported"
    return module, ""


def _triton(q: torch.Tensor, shapes: AttentionShapes) -> tuple[Attention | None, str]:
    module, reason = _load_triton()
    if module is None:
        return None, reason
    if not module.is_supported(q, shapes.block_size):
        return None, (
            f"the fused Triton kernels do not support these inputs (device {q.device}, dtype {q.dtype}, "
            f"head dim {shapes.head_dim}, block size {shapes.block_size}); they need a CUDA tensor, "
            "fp16/bf16/fp32, head dim 64 or 128, block size 64 or 128"
        )
    fused = module.fused_sparse_attention

    def fused_attention(*args, need_lse=True):
        return fused(*args)  # the fused kernels always produce the lse (their backward uses it)

    return fused_attention, ""


def _flex(q: torch.Tensor, shapes: AttentionShapes) -> tuple[Attention | None, str]:
    from . import flex

    reason = flex.unavailable_reason(q, shapes)
    return (None, reason) if reason else (flex.flex_sparse_attention, "")


def _xformers(q: torch.Tensor, shapes: AttentionShapes) -> tuple[Attention | None, str]:
    from . import xformers_backend

    reason = xformers_backend.unavailable_reason(q, shapes)
    return (None, reason) if reason else (xformers_backend.xformers_sparse_attention, "")


def _dense(q: torch.Tensor, shapes: AttentionShapes) -> tuple[Attention | None, str]:
    from .dense import dense_sparse_attention

    return dense_sparse_attention, ""


def _cpu(q: torch.Tensor, shapes: AttentionShapes) -> tuple[Attention | None, str]:
    from . import cpu

    if q.device.type != "cpu":
        return None, f"the cpu backend runs CPU tensors; these are on {q.device}"
    if not cpu.fused_kernel_available():
        return None, "this torch has no fused CPU flash-attention kernel (aten._scaled_dot_product_flash_attention_for_cpu)"
    if torch.is_grad_enabled():
        # The fused kernel's lse has no gradient, and the exact branch merge needs one.
        return None, "the cpu backend is for inference (its fused kernel gives no gradient through the lse); run under torch.no_grad()"
    return cpu.cpu_attention, ""


def _naive(q: torch.Tensor, shapes: AttentionShapes) -> tuple[Attention | None, str]:
    # The one door from production code to the definition (the CPU fallback of "auto").
    from .naive import naive_attention

    return naive_attention, ""


_FINDERS = {"triton": _triton, "flex": _flex, "xformers": _xformers, "dense": _dense, "cpu": _cpu, "naive": _naive}


def available_backends(q: torch.Tensor, shapes: AttentionShapes) -> dict[str, str]:
    """{name: "" if it can run these inputs, else why not}, for diagnostics and tests."""
    return {name: _FINDERS[name](q, shapes)[1] for name in BACKEND_NAMES}


def requested_backend(name: str = AUTO) -> str:
    """The backend name in force for a call: argument, else env var, else the default."""
    name = _check_name(name, "backend argument")
    if name != AUTO:
        return name
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return _check_name(from_env, f"environment variable {ENV_VAR}")
    return _default_backend


def _auto(q: torch.Tensor, shapes: AttentionShapes) -> tuple[str, Attention]:
    if q.is_cuda:
        for name in ("triton", "flex", "xformers"):
            attention, _ = _FINDERS[name](q, shapes)
            if attention is not None:
                return name, attention
    else:
        attention, _ = _cpu(q, shapes)
        if attention is not None:
            return "cpu", attention
    dense_elements = shapes.batch * shapes.heads * shapes.query_len * (shapes.query_len + shapes.static_len + shapes.ref_len)
    name = "dense" if q.is_cuda or dense_elements <= DENSE_AUTO_LIMIT else "naive"
    return name, _FINDERS[name](q, shapes)[0]


def choose_backend(name: str, q: torch.Tensor, shapes: AttentionShapes) -> tuple[str, Attention]:
    """(backend name, attention function) for these inputs; UserFacingError if the named one cannot run."""
    name = requested_backend(name)
    if name == AUTO:
        return _auto(q, shapes)
    attention, reason = _FINDERS[name](q, shapes)
    if attention is None:
        raise UserFacingError(
            f"attention backend {name!r} is not available here: {reason}. "
            f"Use backend='auto' (or unset {ENV_VAR}) to pick one that is."
        )
    return name, attention


def resolve_backend(name: str, q: torch.Tensor, shapes: AttentionShapes) -> Attention:
    return choose_backend(name, q, shapes)[1]
