"""Softmax branches with their log-sum-exp, and the exact merge of branches over disjoint keys.

A branch (clip keys, static keys, the selected reference blocks) is `(out_x, lse_x)`; merging by
`lse = logsumexp_x lse_x`, `out = sum_x exp(lse_x - lse) * out_x` gives the ONE softmax over the
union of their keys. Used by the definition (`naive.py`), the Flex and xformers backends and the
coarse branch.
"""
from __future__ import annotations

import torch


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
