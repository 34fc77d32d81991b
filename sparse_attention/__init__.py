"""Sparse reference attention: every clip token attends, in ONE softmax, to all clip tokens, the
static identity tokens and the top-k routed blocks of the full reference-video token sequence.

Public API (the contract the model codes against; see README.md for the math and backends):
    reference_block_centroids, route_reference_blocks, sparse_reference_attention,
    coarse_reference_attention, set_default_backend.

Layout (see README.md): naive.py is the definition (the oracle; tests, and the "naive" CPU
fallback backend through dispatch), routing.py chooses blocks, merge.py merges softmax branches,
inputs.py validates at the public entries, api.py is the front door, dispatch.py picks a backend.
"""
from .api import sparse_reference_attention
from .coarse import coarse_reference_attention
from .dispatch import set_default_backend
from .routing import reference_block_centroids, route_reference_blocks

__all__ = [
    "coarse_reference_attention",
    "reference_block_centroids",
    "route_reference_blocks",
    "sparse_reference_attention",
    "set_default_backend",
]
