"""The fused Triton kernels against the definition of correct, on CPU under TRITON_INTERPRET=1.

Triton decides when it is first imported whether kernels are interpreted, and other test modules
may import it first, so the kernel tests run in a child pytest process started with
TRITON_INTERPRET=1 (``test_kernels_in_interpreter_subprocess``); in this process they skip. Set
TRITON_INTERPRET=1 yourself to run them directly.
Shapes are tiny (block 16, d 16/32): the interpreter runs every tile as numpy arrays.
Every output is poisoned with NaN first, so an element a kernel forgot to write fails the test.
bf16 is not tested here: the interpreter's bf16 is not faithful (the GPU run tests it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from sparse_avatar.sparse_attention.naive import naive_attention  # noqa: E402

BLOCK = 16
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(INTERPRETING, reason="this is the parent of the interpreter run")
def test_kernels_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-2000:]


@pytest.fixture(scope="module")
def fused():
    from sparse_avatar.sparse_attention import triton_fused

    assert type(triton_fused._fwd_kernel).__name__ == "InterpretedFunction"
    triton_fused.POISON_OUTPUTS_FOR_TESTS = True
    yield triton_fused
    triton_fused.POISON_OUTPUTS_FOR_TESTS = False


def brute_force(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices, block_size, scale):
    """Plain masked softmax over [clip; static; ref] keys with a dense per-query mask, in fp64."""
    batch, heads, lq, d = q.shape
    kv_heads = ref_k.shape[1] if ref_k is not None else (static_k.shape[1] if static_k is not None else heads)
    group = heads // kv_heads

    def per_head(t):  # [B, Hkv, L, d] -> [B, H, L, d]
        return t.double().repeat_interleave(group, dim=1)

    keys, values, masks = [k.double()], [v.double()], [torch.ones(batch, heads, lq, lq, dtype=torch.bool)]
    if static_k is not None:
        keys.append(per_head(static_k))
        values.append(per_head(static_v))
        masks.append(torch.ones(batch, heads, lq, static_k.shape[2], dtype=torch.bool))
    if ref_k is not None and ref_k.shape[2] > 0:
        lr = ref_k.shape[2]
        lengths = torch.full((batch,), lr) if ref_lengths is None else ref_lengths.long()
        position_block = torch.arange(lr) // block_size
        query_block = torch.arange(lq) // block_size
        chosen = block_indices.long()  # [B, Hkv, nQ, K]
        # selected[b, hkv, qblock, rblock]
        selected = (chosen[..., None] == position_block.unique()[None, None, None, None, :]).any(-2)
        mask = selected[:, :, query_block][..., position_block]  # [B, Hkv, Lq, Lr]
        mask = mask & (torch.arange(lr)[None, None, None, :] < lengths[:, None, None, None])
        keys.append(per_head(ref_k))
        values.append(per_head(ref_v))
        masks.append(mask.repeat_interleave(group, dim=1))
    keys, values, mask = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, 3)
    scores = (q.double() @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.softmax(scores, -1) @ values
    return out, lse


def random_block_indices(batch, kv_heads, lq, lr, ref_lengths, top_k, generator, block_size=BLOCK):
    """Distinct valid blocks first, -1 after; sometimes fewer valid blocks than slots."""
    num_query_blocks = -(-lq // block_size)
    indices = torch.full((batch, kv_heads, num_query_blocks, top_k), -1, dtype=torch.int32)
    for b in range(batch):
        valid_blocks = -(-int(ref_lengths[b]) // block_size)
        for h in range(kv_heads):
            for m in range(num_query_blocks):
                chosen = torch.randperm(valid_blocks, generator=generator)[:top_k]
                indices[b, h, m, : len(chosen)] = chosen.to(torch.int32)
    return indices


CASES = {
    # name: (B, H, G, Lq, S, Lr, ref_lengths or None, top_k, d[, block_size (default BLOCK)])
    "odd_sizes_g1": (1, 2, 1, 37, 5, 53, None, 2, 16),
    "gqa4_padding": (2, 4, 4, 20, 3, 70, [70, 29], 3, 32),
    "topk_exceeds_blocks": (1, 4, 2, 16, 0, 40, None, 6, 16),
    "empty_reference": (1, 2, 1, 25, 4, 0, None, 2, 16),
    "no_static_no_reference": (1, 2, 1, 19, 0, 0, None, 1, 16),
    # Routing blocks of 32 over 16-wide tiles: several query/key tiles per routing block.
    "block32_subtiles_gqa4": (1, 4, 4, 45, 2, 100, [83], 2, 16, 32),
}


def make_inputs(case, dtype, seed=0):
    batch, heads, group, lq, static_len, lr, lengths, top_k, d = case[:9]
    block_size = case[9] if len(case) > 9 else BLOCK
    generator = torch.Generator().manual_seed(seed)
    kv_heads = heads // group

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    q, k, v = (randn(batch, heads, lq, d) for _ in range(3))
    static_k = randn(batch, kv_heads, static_len, d) if static_len else None
    static_v = randn(batch, kv_heads, static_len, d) if static_len else None
    ref_k = randn(batch, kv_heads, lr, d) if lr else None
    ref_v = randn(batch, kv_heads, lr, d) if lr else None
    ref_lengths = torch.tensor(lengths) if lengths is not None else (torch.full((batch,), lr) if lr else None)
    if ref_k is not None and lengths is not None:
        # Garbage beyond the valid length must not leak into outputs or gradients.
        pad = torch.arange(lr)[None, :] >= ref_lengths[:, None]
        ref_k[pad[:, None, :, None].expand_as(ref_k)] = 1e4
        ref_v[pad[:, None, :, None].expand_as(ref_v)] = 1e4
    block_indices = random_block_indices(batch, kv_heads, lq, lr, ref_lengths, top_k, generator, block_size) if lr else None
    return q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices


def _with_grad(tensors):
    return [t.clone().requires_grad_(True) if t is not None and t.is_floating_point() else t for t in tensors]


def _max_abs_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_and_gradients_match_brute_force(fused, case_name, dtype):
    case = CASES[case_name]
    block_size = case[9] if len(case) > 9 else BLOCK
    inputs = make_inputs(case, dtype)
    q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices = inputs
    scale = q.shape[-1] ** -0.5
    grad_inputs = _with_grad(inputs)
    out, lse = fused.fused_sparse_attention(*grad_inputs, block_size, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()

    expected_inputs = _with_grad([t.double() if t is not None and t.is_floating_point() else t for t in inputs])
    expected_out, expected_lse = brute_force(*expected_inputs, block_size, scale)

    # FlagAttention's rule: the kernel's error against fp64 may be at most ~2x that of the same
    # computation done plainly in the input precision (naive.py upcasts to fp32, so for fp16
    # we bound by the rounding of the output itself instead).
    out_tolerance = 2e-5 if dtype == torch.float32 else 2e-3
    assert _max_abs_error(out, expected_out) < out_tolerance
    assert _max_abs_error(lse, expected_lse) < 1e-4

    # Use lse in the loss as well: its gradient enters the backward through delta.
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=generator).double()
    grad_lse = torch.randn(lse.shape, generator=generator).double()
    (out.double() * grad_out).sum().add((lse.double() * grad_lse).sum()).backward()
    (expected_out * grad_out).sum().add((expected_lse * grad_lse).sum()).backward()

    grad_tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    names = ["q", "k", "v", "static_k", "static_v", "ref_k", "ref_v"]
    for name, got, want in zip(names, grad_inputs[:7], expected_inputs[:7]):
        if got is None:
            continue
        assert got.grad is not None, name
        assert torch.isfinite(got.grad).all(), f"d{name} has NaN/inf (unwritten or leaked padding)"
        scale_of_grad = max(1.0, want.grad.abs().max().item())
        assert _max_abs_error(got.grad, want.grad) / scale_of_grad < grad_tolerance, name
    if ref_lengths is not None and grad_inputs[5] is not None:
        pad = torch.arange(ref_k.shape[2])[None, :] >= ref_lengths[:, None]
        assert (grad_inputs[5].grad.transpose(1, 2)[pad] == 0).all(), "padding got a gradient"


# The static-key dK/dV is split over query chunks (partials in an fp32 workspace, summed after).
# Odd sizes: Lq not a multiple of the 16-row tiles, S odd and above one 16-key tile, G = 1, 2, 4,
# a padded sample; chunk counts: automatic, 1 (the unsplit walk), 3 (uneven chunks) and more
# chunks than query tiles (one tile each).
STATIC_SPLIT_CASES = {
    "g1_s19_lq45": (1, 2, 1, 45, 19, 37, None, 2, 16),
    "g2_s5_lq29_b2_padded": (2, 4, 2, 29, 5, 50, [50, 21], 2, 16),
    "g4_s33_lq29_d32": (1, 4, 4, 29, 33, 40, None, 2, 32),
}
STATIC_SPLIT_RUNS = [(case, dtype, chunks) for case in STATIC_SPLIT_CASES
                     for dtype, chunks in ((torch.float32, None), (torch.float32, 3), (torch.float16, None))]
STATIC_SPLIT_RUNS += [("g1_s19_lq45", torch.float32, 1), ("g4_s33_lq29_d32", torch.float32, 1000),
                      ("g4_s33_lq29_d32", torch.float16, 3)]


@pytest.fixture
def static_chunks(fused):
    yield lambda value: setattr(fused, "_STATIC_CHUNKS", value)
    fused._STATIC_CHUNKS = None


@needs_interpreter
@pytest.mark.parametrize("case_name,dtype,chunks", STATIC_SPLIT_RUNS,
                         ids=[f"{c}-{str(d).replace('torch.', '')}-{n or 'auto'}" for c, d, n in STATIC_SPLIT_RUNS])
def test_split_static_backward_matches_naive_py(fused, static_chunks, case_name, dtype, chunks):
    """Every gradient (q, k, v, static k/v, reference k/v) against naive.py in fp64."""
    static_chunks(chunks)
    inputs = make_inputs(STATIC_SPLIT_CASES[case_name], dtype, seed=7)
    scale = inputs[0].shape[-1] ** -0.5
    grad_inputs = _with_grad(inputs)
    out, lse = fused.fused_sparse_attention(*grad_inputs, BLOCK, scale)
    expected_inputs = _with_grad([t.double() if t is not None and t.is_floating_point() else t for t in inputs])
    expected_out, expected_lse = naive_attention(*expected_inputs, BLOCK, scale)
    generator = torch.Generator().manual_seed(2)
    grad_out = torch.randn(out.shape, generator=generator).double()
    grad_lse = torch.randn(lse.shape, generator=generator).double()
    (out.double() * grad_out).sum().add((lse.double() * grad_lse).sum()).backward()
    (expected_out * grad_out).sum().add((expected_lse * grad_lse).sum()).backward()
    grad_tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name, got, want in zip(["q", "k", "v", "static_k", "static_v", "ref_k", "ref_v"], grad_inputs[:7], expected_inputs[:7]):
        assert got.grad is not None and got.grad.dtype == dtype, name
        assert torch.isfinite(got.grad).all(), f"d{name} has NaN/inf (unwritten or leaked padding)"
        scale_of_grad = max(1.0, want.grad.abs().max().item())
        assert _max_abs_error(got.grad, want.grad) / scale_of_grad < grad_tolerance, (name, _max_abs_error(got.grad, want.grad))


@needs_interpreter
def test_static_dkdv_does_not_depend_on_the_chunking(fused, static_chunks):
    """The chunked partial sums equal the unsplit walk up to fp32 summation order."""
    q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices = make_inputs(
        (1, 4, 2, 45, 21, 0, None, 1, 16), torch.float32, seed=5)
    scale = 0.25
    out, lse = fused.fused_sparse_attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices, BLOCK, scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    delta = (grad_out * out).sum(-1).contiguous()
    results = []
    for chunks in (1, 2, 5, 64):
        static_chunks(chunks)
        results.append(fused.static_dkdv(q, static_k, static_v, grad_out, lse, delta, scale))
    for dsk, dsv in results[1:]:
        torch.testing.assert_close(dsk, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dsv, results[0][1], rtol=1e-5, atol=1e-5)


def test_static_chunk_choice_fills_the_gpu_without_empty_chunks():
    from sparse_avatar.sparse_attention import triton_fused as fused

    cpu = torch.device("cpu")  # counts as _DEFAULT_SM_COUNT (132) SMs
    # The shape: B=1, Hkv=4, S=64 (one key tile), G=4, Lq=16384 in 64-row tiles.
    chunks, per_chunk = fused.static_query_chunks(1, 4, 1, 4 * 256, 64, 128, cpu)
    assert chunks * 4 >= 2 * 132 and per_chunk >= fused._STATIC_MIN_TILES_PER_CHUNK
    assert (chunks - 1) * per_chunk < 4 * 256 <= chunks * per_chunk  # covers every tile, none empty
    # Few query tiles: never fewer than the minimum per chunk (but at least one chunk).
    assert fused.static_query_chunks(1, 1, 1, 3, 64, 128, cpu) == (1, 3)
    assert fused.static_query_chunks(1, 1, 1, 9, 64, 128, cpu) == (3, 3)
    # Many (b, kv head) programs already: no split.
    assert fused.static_query_chunks(64, 16, 1, 4 * 256, 64, 128, cpu)[0] == 1
    # The workspace cap.
    chunks, _ = fused.static_query_chunks(1, 1, 1, 10**6, 4096, 128, cpu)
    assert chunks * 2 * 4 * 4096 * 128 <= fused._STATIC_WORKSPACE_BYTES
    for total in range(1, 60):
        for want in (1, 2, 3, 7, 100):
            fused._STATIC_CHUNKS = want
            try:
                chunks, per_chunk = fused.static_query_chunks(1, 1, 1, total, 8, 16, cpu)
            finally:
                fused._STATIC_CHUNKS = None
            assert (chunks - 1) * per_chunk < total <= chunks * per_chunk


@needs_interpreter
def test_matches_naive_py_with_duplicates_and_unsorted_ids(fused):
    """Against naive.py itself; duplicate ids in one row are attended once by the kernel, so
    the definition gets the de-duplicated row."""
    case = (1, 4, 2, 33, 2, 64, None, 3, 16)
    q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, _ = make_inputs(case, torch.float32, seed=3)
    unique = torch.tensor([[[[3, 0, -1], [1, -1, 2], [-1, -1, -1]], [[2, 1, 0], [0, -1, -1], [3, 2, 1]]]], dtype=torch.int32)
    with_duplicates = unique.clone()
    with_duplicates[0, 0, 0, 2] = 3
    with_duplicates[0, 1, 1, 1] = 0
    scale = 0.3
    out, lse = fused.fused_sparse_attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths,
                                            with_duplicates, BLOCK, scale)
    expected_out, expected_lse = naive_attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths,
                                                 unique, BLOCK, scale)
    assert _max_abs_error(out, expected_out) < 2e-5
    assert _max_abs_error(lse, expected_lse) < 2e-5


def _compact_block_indices_torch(block_indices, ref_lengths, num_ref_blocks, block_size):
    """The compaction as plain torch ops (what the kernel replaced): the oracle."""
    batch = block_indices.shape[0]
    ids = block_indices.long()
    sentinel = num_ref_blocks
    starts_valid = (ids >= 0) & (ids * block_size < ref_lengths.view(batch, 1, 1, 1))
    ids = torch.where(starts_valid, ids, torch.full_like(ids, sentinel))
    ids, _ = torch.sort(ids, dim=-1)
    duplicate = torch.zeros_like(starts_valid)
    duplicate[..., 1:] = ids[..., 1:] == ids[..., :-1]
    ids = torch.where(duplicate, torch.full_like(ids, sentinel), ids)
    ids, _ = torch.sort(ids, dim=-1)
    valid = ids < sentinel
    full = valid & ((ids + 1) * block_size <= ref_lengths.view(batch, 1, 1, 1))
    return (torch.where(valid, ids, torch.full_like(ids, -1)).to(torch.int32),
            valid.sum(-1, dtype=torch.int32), full.sum(-1, dtype=torch.int32))


@needs_interpreter
@pytest.mark.parametrize("k_sel", [1, 3, 8, 17, 64, 70])  # 70: above the kernel's width, torch fallback
def test_compaction_kernel_matches_the_torch_version(fused, k_sel):
    generator = torch.Generator().manual_seed(k_sel)
    batch, kv_heads, query_blocks, ref_blocks, block = 3, 2, 5, 9, 16
    ids = torch.randint(-1, ref_blocks + 2, (batch, kv_heads, query_blocks, k_sel), generator=generator)
    ids[..., -1] = ids[..., 0]  # repeats
    ids[0, 0, 0] = -1
    ref_lengths = torch.tensor([ref_blocks * block, 5 * block + 3, 0], dtype=torch.int32)  # full, partial, empty
    got = fused._compact_block_indices(ids.to(torch.int32), ref_lengths, ref_blocks, block)
    want = _compact_block_indices_torch(ids, ref_lengths, ref_blocks, block)
    for g, w in zip(got, want):
        assert g.dtype == torch.int32 and torch.equal(g, w)
    # a broadcast (expanded, stride-0) index tensor as the wrapper passes it
    shared = ids[:1, :1].expand(batch, kv_heads, query_blocks, k_sel)
    for g, w in zip(fused._compact_block_indices(shared, ref_lengths, ref_blocks, block),
                    _compact_block_indices_torch(shared, ref_lengths, ref_blocks, block)):
        assert torch.equal(g, w)


@needs_interpreter
def test_inverse_index_lists_every_selecting_query_block(fused):
    indices = torch.tensor([[[[2, 0, -1], [0, -1, -1], [1, 2, 0]]]], dtype=torch.int32)  # B=1, Hkv=1, nQ=3
    counts = (indices >= 0).sum(-1, dtype=torch.int32)
    offsets, query_blocks = fused._inverse_block_index(indices, counts, num_ref_blocks=4)
    rows = [query_blocks[offsets[r]:offsets[r + 1]].tolist() for r in range(4)]
    assert rows == [[0, 1, 2], [2], [0, 2], []]


@needs_interpreter
def test_is_supported_follows_device_dtype_head_dim_and_block(fused):
    q = torch.zeros(1, 1, 4, 16)
    assert fused.is_supported(q, 16)  # interpreter: small test shapes allowed
    assert not fused.is_supported(q.double(), 16)
    assert not fused.is_supported(torch.zeros(1, 1, 4, 24), 16)
    assert not fused.is_supported(q, 48)


@needs_interpreter
def test_triton_backend_through_the_front_door(fused):
    """The front door's normalised inputs (None branches, filled lengths, routed ids) suit the
    fused kernels: sparse_reference_attention with backend="triton" equals backend="naive",
    outputs, lse and every gradient (moved here from test_sparse_attention.py, which started its
    own interpreter process for it)."""
    from sparse_avatar.sparse_attention import sparse_reference_attention

    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    q, k, v = randn(2, 4, 21, 16), randn(2, 4, 21, 16), randn(2, 4, 21, 16)
    static_k, static_v, ref_k, ref_v = randn(2, 2, 3, 16), randn(2, 2, 3, 16), randn(2, 2, 45, 16), randn(2, 2, 45, 16)
    lengths = torch.tensor([45, 20])
    cases = [(static_k, static_v, ref_k, ref_v, lengths), (None, None, ref_k, ref_v, lengths), (static_k, static_v, None, None, None),
             (static_k, static_v, ref_k[:, :, :0], ref_v[:, :, :0], None)]
    for case_static_k, case_static_v, case_ref_k, case_ref_v, ref_lengths in cases:
        results = {}
        for backend in ("naive", "triton"):
            leaves = [None if t is None else t.clone().requires_grad_(True) for t in (q, k, v, case_static_k, case_static_v, case_ref_k, case_ref_v)]
            out, lse = sparse_reference_attention(*leaves, ref_lengths, block_size=16, top_k=2, backend=backend, return_lse=True)
            (out.square().sum() + lse.sum()).backward()
            results[backend] = [out, lse] + [t.grad for t in leaves if t is not None and t.numel()]
        worst = max((a - b).abs().max().item() for a, b in zip(results["naive"], results["triton"]))
        assert worst < 1e-4, worst
