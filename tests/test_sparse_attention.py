"""Sparse reference attention: the definition (naive.py) against brute force, every backend against
the definition (outputs, lse, gradients), routing, dispatch (and the deprecated "reference"
backend name), input errors, and the package layout (naive.py reached only through dispatch)."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_avatar.errors import UserFacingError
from sparse_avatar.sparse_attention import (
    reference_block_centroids,
    route_reference_blocks,
    set_default_backend,
    sparse_reference_attention,
)
from sparse_avatar.sparse_attention import dispatch
from sparse_avatar.sparse_attention.inputs import check_attention_inputs
from sparse_avatar.sparse_attention.naive import naive_attention


def make_inputs(batch=2, heads=4, kv_heads=2, query_len=21, static_len=3, ref_len=45, head_dim=8, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    tensors = {
        "q": randn(batch, heads, query_len, head_dim),
        "k": randn(batch, heads, query_len, head_dim),
        "v": randn(batch, heads, query_len, head_dim),
        "static_k": randn(batch, kv_heads, static_len, head_dim) if static_len is not None else None,
        "static_v": randn(batch, kv_heads, static_len, head_dim) if static_len is not None else None,
        "ref_k": randn(batch, kv_heads, ref_len, head_dim) if ref_len is not None else None,
        "ref_v": randn(batch, kv_heads, ref_len, head_dim) if ref_len is not None else None,
    }
    return tensors


def brute_force(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices, block_size, scale=None):
    """Plain softmax over [clip; static; ref] keys with a mask built by explicit loops."""
    batch, heads, query_len, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, query_len, head_dim, dtype=torch.float64)
    lse = torch.zeros(batch, heads, query_len, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            keys, values = [k[b, h]], [v[b, h]]
            if static_k is not None:
                group = h // (heads // static_k.shape[1])
                keys.append(static_k[b, group])
                values.append(static_v[b, group])
            ref_count = 0
            if ref_k is not None:
                group = h // (heads // ref_k.shape[1])
                keys.append(ref_k[b, group])
                values.append(ref_v[b, group])
                ref_count = ref_k.shape[2]
            all_keys = torch.cat(keys).double()
            all_values = torch.cat(values).double()
            prefix = all_keys.shape[0] - ref_count
            for i in range(query_len):
                allowed = torch.zeros(all_keys.shape[0], dtype=torch.bool)
                allowed[:prefix] = True
                if ref_count:
                    length = ref_count if ref_lengths is None else int(ref_lengths[b])
                    for block in block_indices[b, group, i // block_size].tolist():
                        if block >= 0:
                            for position in range(block * block_size, min((block + 1) * block_size, length)):
                                allowed[prefix + position] = True
                scores = (all_keys[allowed] @ q[b, h, i].double()) * scale
                lse[b, h, i] = torch.logsumexp(scores, 0)
                out[b, h, i] = torch.softmax(scores, 0) @ all_values[allowed]
    return out, lse


CASES = [
    # name, batch, heads, kv_heads, query_len, static_len, ref_len, block, top_k, lengths, forced
    ("basic_G2", 2, 4, 2, 21, 3, 45, 8, 2, None, None),
    ("G1_odd", 1, 2, 2, 13, 5, 31, 8, 1, None, None),
    ("G4_padding", 2, 8, 2, 17, 2, 40, 8, 2, [40, 11], None),
    ("k_exceeds_blocks", 1, 4, 1, 9, 3, 19, 8, 10, None, None),
    ("no_static", 2, 4, 2, 16, None, 33, 8, 2, [33, 1], None),
    ("static_len_zero", 1, 2, 1, 10, 0, 24, 8, 1, None, None),
    ("empty_reference_tensor", 2, 4, 2, 11, 3, 0, 8, 3, None, None),
    ("no_reference", 1, 4, 4, 11, 3, None, 8, 3, None, None),
    ("forced_blocks", 2, 4, 2, 20, 3, 50, 8, 1, [50, 30], [[0, 6], [3, -1], [3, 3]]),
    ("zero_length_row", 2, 2, 1, 9, 2, 16, 4, 2, [0, 16], None),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_naive_matches_brute_force(case):
    _, batch, heads, kv_heads, query_len, static_len, ref_len, block, top_k, lengths, forced = case
    inputs = make_inputs(batch, heads, kv_heads, query_len, static_len, ref_len)
    ref_lengths = None if lengths is None else torch.tensor(lengths)
    forced_blocks = None
    query_blocks = math.ceil(query_len / block)
    if forced is not None:  # one row of forced ids per query block, cycling through `forced`
        forced_blocks = torch.tensor([forced[i % len(forced)] for i in range(query_blocks)])[None, None]
    out, lse = sparse_reference_attention(
        **inputs, ref_lengths=ref_lengths, block_size=block, top_k=top_k, forced_blocks=forced_blocks,
        backend="naive", return_lse=True,
    )
    block_indices = None
    if inputs["ref_k"] is not None and ref_len > 0:
        centroids = reference_block_centroids(inputs["ref_k"], ref_lengths, block)
        block_indices = route_reference_blocks(inputs["q"], centroids, ref_lengths, block_size=block, top_k=top_k, forced_blocks=forced_blocks)
    expected_out, expected_lse = brute_force(**inputs, ref_lengths=ref_lengths, block_indices=block_indices, block_size=block)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-10)


def test_top_k_covering_all_blocks_equals_plain_attention():
    inputs = make_inputs(batch=2, heads=4, kv_heads=1, query_len=19, static_len=4, ref_len=37)
    ref_lengths = torch.tensor([37, 22])
    out, lse = sparse_reference_attention(**inputs, ref_lengths=ref_lengths, block_size=8, top_k=5, backend="naive", return_lse=True)
    group_size = 4
    keys = torch.cat([inputs["k"], inputs["static_k"].repeat_interleave(group_size, 1), inputs["ref_k"].repeat_interleave(group_size, 1)], 2)
    values = torch.cat([inputs["v"], inputs["static_v"].repeat_interleave(group_size, 1), inputs["ref_v"].repeat_interleave(group_size, 1)], 2)
    mask = torch.ones(2, 1, 1, keys.shape[2], dtype=torch.bool)
    mask[1, ..., 19 + 4 + 22:] = False
    expected = torch.nn.functional.scaled_dot_product_attention(inputs["q"], keys, values, attn_mask=mask)
    scores = (inputs["q"] @ keys.transpose(-1, -2)) / math.sqrt(8)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1))


def test_gradcheck_fp64_tiny():
    inputs = make_inputs(batch=1, heads=2, kv_heads=1, query_len=5, static_len=2, ref_len=7, head_dim=3)
    ref_lengths = torch.tensor([6])
    names = ["q", "k", "v", "static_k", "static_v", "ref_k", "ref_v"]
    tensors = [inputs[name].clone().requires_grad_(True) for name in names]
    block_indices = torch.tensor([[[[1, -1], [0, 1]]]], dtype=torch.int32)  # nQ = 2 blocks of 4

    def function(*args):
        out, lse = naive_attention(*args, ref_lengths, block_indices, 4, 0.7)
        return out, lse

    assert torch.autograd.gradcheck(function, tensors, eps=1e-6, atol=1e-7)


def test_routing_finds_the_planted_block():
    head_dim, block = 16, 8
    generator = torch.Generator().manual_seed(3)
    ref_k = torch.randn(1, 1, 6 * block, head_dim, generator=generator) * 0.1
    direction = torch.zeros(head_dim)
    direction[5] = 1.0
    ref_k[0, 0, 4 * block:5 * block] += 3 * direction  # block 4 points along `direction`
    q = torch.randn(1, 2, 2 * block, head_dim, generator=generator) * 0.1
    q[:, :, block:] += 2 * direction  # the second query block looks for it, the first avoids it
    q[:, :, :block] -= 2 * direction
    centroids = reference_block_centroids(ref_k, block_size=block)
    chosen = route_reference_blocks(q, centroids, block_size=block, top_k=1)
    assert chosen.dtype == torch.int32 and chosen.shape == (1, 1, 2, 1)
    assert int(chosen[0, 0, 1, 0]) == 4
    assert int(chosen[0, 0, 0, 0]) != 4


def test_routing_forced_first_no_duplicates_invalid_never_chosen():
    generator = torch.Generator().manual_seed(4)
    batch, kv_heads, block, ref_len = 2, 2, 4, 30  # nR = 8
    q = torch.randn(batch, 4, 13, 6, generator=generator)  # nQ = 4
    ref_k = torch.randn(batch, kv_heads, ref_len, 6, generator=generator)
    ref_lengths = torch.tensor([30, 9])  # second item: blocks 0..2 valid
    forced = torch.tensor([[[[5, 5, -1], [2, 7, 0], [-1, -1, -1], [6, 1, 6]]]])  # [1, 1, nQ, F]
    centroids = reference_block_centroids(ref_k, ref_lengths, block)
    chosen = route_reference_blocks(q, centroids, ref_lengths, block_size=block, top_k=3, forced_blocks=forced)
    assert chosen.shape == (batch, kv_heads, 4, 6)
    for b in range(batch):
        valid_blocks = set(range(math.ceil(int(ref_lengths[b]) / block)))
        for h in range(kv_heads):
            for i in range(4):
                row = chosen[b, h, i].tolist()
                ids = [x for x in row if x >= 0]
                assert row == ids + [-1] * (len(row) - len(ids)), "chosen ids must precede unused slots"
                assert len(ids) == len(set(ids)), "duplicates"
                assert set(ids) <= valid_blocks, "an invalid block was chosen"
                expected_forced = list(dict.fromkeys(x for x in forced[0, 0, i].tolist() if x in valid_blocks))
                assert ids[: len(expected_forced)] == expected_forced
                assert len(ids) == min(len(valid_blocks), len(expected_forced) + 3)


def test_routing_top_scores_in_descending_order():
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 8, 4, generator=generator)
    centroids = torch.randn(1, 1, 6, 4, generator=generator)
    chosen = route_reference_blocks(q, centroids, block_size=8, top_k=6)[0, 0, 0]
    pooled = q[0].mean(dim=(0, 1))
    scores = centroids[0, 0] @ pooled
    assert chosen.tolist() == torch.argsort(scores, descending=True).tolist()


def _select_reference_blocks_before_trim(q, centroids, ref_lengths, block_size, top_k, forced_blocks):
    """The routing as it was before its kernel count was trimmed (frozen copy): the trimmed one
    must return exactly the same ids."""
    from sparse_avatar.sparse_attention.blocks import valid_reference_blocks
    from sparse_avatar.sparse_attention.routing import query_block_means

    batch, heads, query_len, head_dim = q.shape
    kv_heads, ref_blocks = centroids.shape[1], centroids.shape[2]
    group_size = heads // kv_heads
    query_blocks = -(-query_len // block_size)
    forced_count = 0 if forced_blocks is None else forced_blocks.shape[-1]
    slots = top_k + forced_count
    pooled = query_block_means(q, block_size).view(batch, kv_heads, group_size, query_blocks, head_dim).mean(dim=2)
    scores = pooled @ centroids.to(pooled.dtype).transpose(-1, -2)
    block_valid = valid_reference_blocks(ref_lengths, batch, ref_blocks * block_size, block_size, q.device)
    scores = scores.masked_fill(~block_valid[:, None, None, :], float("-inf"))
    pieces = []
    if forced_count:
        forced = forced_blocks.to(dtype=torch.long).expand(batch, kv_heads, query_blocks, forced_count)
        forced_block_valid = block_valid[:, None, None, :].expand(batch, kv_heads, query_blocks, ref_blocks)
        forced_is_valid = (forced >= 0) & torch.gather(forced_block_valid, -1, forced.clamp(min=0))
        same = forced[..., :, None] == forced[..., None, :]
        earlier = torch.ones(forced_count, forced_count, dtype=torch.bool).tril(diagonal=-1)
        repeated = (same & earlier).any(dim=-1)
        forced = torch.where(forced_is_valid & ~repeated, forced, torch.full_like(forced, -1))
        scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], 1), float("-inf"))], dim=-1)
        scores = scores.scatter(-1, torch.where(forced >= 0, forced, ref_blocks), float("-inf"))[..., :ref_blocks]
        pieces.append(forced)
    chosen = min(top_k, ref_blocks)
    top_scores, top_ids = scores.topk(chosen, dim=-1)
    pieces.append(torch.where(torch.isneginf(top_scores), torch.full_like(top_ids, -1), top_ids))
    pieces.append(torch.full((batch, kv_heads, query_blocks, slots - forced_count - chosen), -1, dtype=torch.long))
    selected = torch.cat(pieces, dim=-1)
    order = torch.sort((selected < 0).to(torch.int8), dim=-1, stable=True).indices
    return torch.gather(selected, -1, order).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "batch,heads,kv_heads,query_len,ref_len,lengths,top_k,block,forced",
    [
        (2, 4, 1, 37, 70, [70, 29], 3, 8, False),   # G=4, partial query block, padded sample
        (1, 2, 2, 16, 40, None, 9, 8, False),       # G=1, top_k > nR (unused slots), no lengths
        (2, 6, 3, 23, 53, [0, 53], 2, 8, False),    # G=2, an empty reference sample
        (1, 4, 2, 20, 64, [64], 0, 16, False),      # top_k = 0
        (2, 4, 2, 25, 61, [61, 17], 3, 8, True),    # forced blocks (with repeats and invalid ids)
    ],
)
def test_routing_is_unchanged_by_the_kernel_trim(dtype, batch, heads, kv_heads, query_len, ref_len, lengths, top_k, block, forced):
    from sparse_avatar.sparse_attention.routing import select_reference_blocks

    generator = torch.Generator().manual_seed(11)
    q = torch.randn(batch, heads, query_len, 16, generator=generator).to(dtype)
    ref_k = torch.randn(batch, kv_heads, ref_len, 16, generator=generator).to(dtype)
    ref_lengths = torch.tensor(lengths) if lengths is not None else None
    centroids = reference_block_centroids(ref_k, ref_lengths, block)
    query_blocks, ref_blocks = -(-query_len // block), -(-ref_len // block)
    forced_blocks = None
    if forced:
        forced_blocks = torch.randint(-1, ref_blocks, (1, 1, query_blocks, 3), generator=generator)
        forced_blocks[..., 2] = forced_blocks[..., 0]
    # Ties too: two identical centroids and a row of equal scores.
    centroids[:, :, 1] = centroids[:, :, 0]
    got = select_reference_blocks(q, centroids, ref_lengths, block, top_k, forced_blocks)
    want = _select_reference_blocks_before_trim(q, centroids, ref_lengths, block, top_k, forced_blocks)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    zero = select_reference_blocks(torch.zeros_like(q), centroids, ref_lengths, block, top_k, forced_blocks)
    assert torch.equal(zero, _select_reference_blocks_before_trim(torch.zeros_like(q), centroids, ref_lengths, block, top_k, forced_blocks))


def test_centroids_exclude_padding_even_nan():
    ref_k = torch.arange(2 * 1 * 10 * 2, dtype=torch.float32).view(2, 1, 10, 2)
    ref_k[1, 0, 5:] = float("nan")
    centroids = reference_block_centroids(ref_k, torch.tensor([10, 5]), block_size=4)
    assert centroids.shape == (2, 1, 3, 2)
    torch.testing.assert_close(centroids[0, 0, 2], ref_k[0, 0, 8:10].mean(0))
    torch.testing.assert_close(centroids[1, 0, 1], ref_k[1, 0, 4])
    assert torch.equal(centroids[1, 0, 2], torch.zeros(2))


def test_naive_ignores_nan_in_reference_padding():
    inputs = make_inputs(batch=2, heads=2, kv_heads=1, query_len=9, static_len=2, ref_len=20, dtype=torch.float32)
    ref_lengths = torch.tensor([20, 7])
    clean_out = sparse_reference_attention(**inputs, ref_lengths=ref_lengths, block_size=4, top_k=2, backend="naive")
    inputs["ref_k"][1, :, 7:] = float("nan")
    inputs["ref_v"][1, :, 7:] = float("nan")
    for name in ("q", "ref_k", "ref_v"):
        inputs[name].requires_grad_(True)
    out = sparse_reference_attention(**inputs, ref_lengths=ref_lengths, block_size=4, top_k=2, backend="naive")
    torch.testing.assert_close(out, clean_out)
    out.sum().backward()
    assert torch.isfinite(inputs["q"].grad).all()
    assert torch.isfinite(inputs["ref_k"].grad[1, :, :7]).all()


# ---- backends against the definition --------------------------------------------------------

BACKEND_CASES = [
    # batch, heads, kv_heads, query_len, static_len, ref_len, block, top_k, lengths
    (2, 4, 2, 37, 5, 53, 8, 3, [53, 20]),
    (1, 4, 1, 16, None, 32, 8, 2, None),
    (2, 2, 2, 9, 3, 13, 4, 9, [0, 13]),
    (1, 8, 2, 11, 2, 0, 4, 2, None),
]
TENSOR_NAMES = ["q", "k", "v", "static_k", "static_v", "ref_k", "ref_v"]


def run_backend(backend, inputs, ref_lengths, block, top_k, with_grad):
    leaves = {name: (None if tensor is None else tensor.clone().requires_grad_(with_grad)) for name, tensor in inputs.items()}
    out, lse = sparse_reference_attention(**leaves, ref_lengths=ref_lengths, block_size=block, top_k=top_k, backend=backend, return_lse=True)
    grads = {}
    if with_grad:
        # A loss that weighs out and lse, so the lse gradient is checked too.
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
        ((out * weights).sum() + lse.sum()).backward()
        grads = {name: tensor.grad for name, tensor in leaves.items() if tensor is not None}
    return out, lse, grads


def flex_or_skip():
    from sparse_avatar.sparse_attention import flex

    shapes = check_attention_inputs(*make_inputs(batch=1).values(), None, 8)
    reason = flex.unavailable_reason(torch.zeros(1), shapes)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_dense_backend_matches_naive(case, dtype):
    batch, heads, kv_heads, query_len, static_len, ref_len, block, top_k, lengths = case
    inputs = make_inputs(batch, heads, kv_heads, query_len, static_len, ref_len, dtype=dtype, seed=7)
    ref_lengths = None if lengths is None else torch.tensor(lengths)
    expected = run_backend("naive", inputs, ref_lengths, block, top_k, with_grad=True)
    got = run_backend("dense", inputs, ref_lengths, block, top_k, with_grad=True)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], **tolerance)
    torch.testing.assert_close(got[1], expected[1], **tolerance)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, **tolerance, msg=f"gradient of {name}")


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_dense_backend_without_lse_uses_sdpa_and_matches_naive(case):
    batch, heads, kv_heads, query_len, static_len, ref_len, block, top_k, lengths = case
    inputs = make_inputs(batch, heads, kv_heads, query_len, static_len, ref_len, dtype=torch.float32, seed=11)
    ref_lengths = None if lengths is None else torch.tensor(lengths)
    results = {}
    for backend in ("naive", "dense"):
        leaves = {name: (None if t is None else t.clone().requires_grad_(True)) for name, t in inputs.items()}
        out = sparse_reference_attention(**leaves, ref_lengths=ref_lengths, block_size=block, top_k=top_k, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[backend] = [out] + [t.grad for t in leaves.values() if t is not None]
    for got, expected in zip(results["dense"], results["naive"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_flex_backend_matches_naive_forward(case):
    flex_or_skip()
    batch, heads, kv_heads, query_len, static_len, ref_len, block, top_k, lengths = case
    inputs = make_inputs(batch, heads, kv_heads, query_len, static_len, ref_len, dtype=torch.float32, seed=8)
    ref_lengths = None if lengths is None else torch.tensor(lengths)
    expected = run_backend("naive", inputs, ref_lengths, block, top_k, with_grad=False)
    got = run_backend("flex", inputs, ref_lengths, block, top_k, with_grad=False)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "flex", "dense", "xformers"])
def test_cuda_backends_match_naive(backend, dtype):
    """On a GPU (skipped on CPU): every backend that can run, against the definition.

    Flex is only checked here for gradients: eager Flex on CPU has no backward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    inputs = {name: (None if t is None else t.cuda()) for name, t in make_inputs(2, 8, 2, 300, 7, 1000, head_dim=64, dtype=dtype, seed=9).items()}
    ref_lengths = torch.tensor([1000, 517], device="cuda")
    reason = dispatch.available_backends(inputs["q"], shapes_of(inputs, block=64))[backend]
    with_grad = backend != "xformers"
    if reason:
        pytest.skip(reason)
    expected = run_backend("naive", inputs, ref_lengths, 64, 3, with_grad=with_grad)
    got = run_backend(backend, inputs, ref_lengths, 64, 3, with_grad=with_grad)
    tolerance = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(got[0], expected[0], **tolerance)
    torch.testing.assert_close(got[1], expected[1], **tolerance)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, **tolerance, msg=f"gradient of {name}")


# ---- dispatch --------------------------------------------------------------------------------


@pytest.fixture
def clean_dispatch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    yield monkeypatch
    set_default_backend("auto")


def shapes_of(inputs, block=8):
    return check_attention_inputs(*inputs.values(), None, block)


def test_auto_on_cpu_picks_dense_for_small_and_naive_for_large(clean_dispatch):
    small = make_inputs(dtype=torch.float32)
    assert dispatch.choose_backend("auto", small["q"], shapes_of(small))[0] == "dense"
    clean_dispatch.setattr(dispatch, "DENSE_AUTO_LIMIT", 10)
    assert dispatch.choose_backend("auto", small["q"], shapes_of(small))[0] == "naive"


def test_argument_env_var_and_default_precedence(clean_dispatch):
    inputs = make_inputs(dtype=torch.float32)
    q, shapes = inputs["q"], shapes_of(inputs)
    set_default_backend("naive")
    assert dispatch.choose_backend("auto", q, shapes)[0] == "naive"
    clean_dispatch.setenv(dispatch.ENV_VAR, "Dense")
    assert dispatch.choose_backend("auto", q, shapes)[0] == "dense"
    assert dispatch.choose_backend("naive", q, shapes)[0] == "naive"


def test_env_var_changes_what_the_front_door_runs(clean_dispatch):
    calls = []

    def spy(*args, **options):
        calls.append(args)
        from sparse_avatar.sparse_attention.naive import naive_attention as definition

        return definition(*args, **options)

    clean_dispatch.setitem(dispatch._FINDERS, "naive", lambda q, shapes: (spy, ""))
    inputs = make_inputs(dtype=torch.float32)
    sparse_reference_attention(**inputs, block_size=8)
    assert not calls
    clean_dispatch.setenv(dispatch.ENV_VAR, "naive")
    sparse_reference_attention(**inputs, block_size=8)
    assert len(calls) == 1


def test_unknown_or_unavailable_backend_is_a_clear_error(clean_dispatch):
    inputs = make_inputs(dtype=torch.float32)
    with pytest.raises(UserFacingError, match="unknown attention backend 'fastest'"):
        sparse_reference_attention(**inputs, block_size=8, backend="fastest")
    with pytest.raises(UserFacingError, match="unknown attention backend"):
        set_default_backend("sage")
    clean_dispatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(UserFacingError, match=dispatch.ENV_VAR):
        sparse_reference_attention(**inputs, block_size=8)
    clean_dispatch.delenv(dispatch.ENV_VAR)
    if not torch.cuda.is_available():
        with pytest.raises(UserFacingError, match="'triton' is not available"):
            sparse_reference_attention(**inputs, block_size=8, backend="triton")
        with pytest.raises(UserFacingError, match="'xformers' is not available"):
            sparse_reference_attention(**inputs, block_size=8, backend="xformers")


def test_comfyui_flags_map_to_backends():
    class Flags:
        use_pytorch_cross_attention = False
        use_flash_attention = False
        use_sage_attention = False

    flags = Flags()
    assert dispatch.backend_for_comfyui_flags(flags) == "auto"
    flags.use_sage_attention = True
    assert dispatch.backend_for_comfyui_flags(flags) == "auto"
    flags.use_pytorch_cross_attention = True
    assert dispatch.backend_for_comfyui_flags(flags) == "dense"


def test_available_backends_reports_reasons():
    inputs = make_inputs(dtype=torch.float32)
    report = dispatch.available_backends(inputs["q"], shapes_of(inputs))
    assert set(report) == set(dispatch.BACKEND_NAMES)
    assert report["dense"] == "" and report["naive"] == ""
    if not torch.cuda.is_available():
        assert report["triton"] and report["xformers"]


# ---- bad inputs ------------------------------------------------------------------------------


def test_bad_inputs_raise_user_facing_errors():
    inputs = make_inputs(dtype=torch.float32)
    good = dict(inputs)

    def call(**overrides):
        return sparse_reference_attention(**{**good, **overrides}, block_size=8)

    with pytest.raises(UserFacingError, match="k must have the same shape as q"):
        call(k=inputs["k"][:, :, :5])
    with pytest.raises(UserFacingError, match="multiple of the key/value heads"):
        call(q=torch.randn(2, 3, 21, 8), k=torch.randn(2, 3, 21, 8), v=torch.randn(2, 3, 21, 8))
    with pytest.raises(UserFacingError, match="pass both ref_k and ref_v"):
        call(ref_v=None)
    with pytest.raises(UserFacingError, match="same number of key/value heads"):
        call(static_k=torch.randn(2, 1, 3, 8), static_v=torch.randn(2, 1, 3, 8))
    with pytest.raises(UserFacingError, match="4-D"):
        call(q=inputs["q"][0])
    with pytest.raises(UserFacingError, match="d=8"):
        call(ref_k=torch.randn(2, 2, 45, 4), ref_v=torch.randn(2, 2, 45, 4))
    with pytest.raises(UserFacingError, match="one dtype"):
        call(ref_k=inputs["ref_k"].double())
    with pytest.raises(UserFacingError, match=r"ref_lengths must lie in \[0, Lr=45\]"):
        call(ref_lengths=torch.tensor([46, 3]))
    with pytest.raises(UserFacingError, match="ref_lengths must be an integer tensor"):
        call(ref_lengths=torch.tensor([3]))
    with pytest.raises(UserFacingError, match="block_indices must hold reference block ids"):
        call(block_indices=torch.full((2, 2, 3, 2), 6, dtype=torch.int32))
    with pytest.raises(UserFacingError, match="repeat a block id"):
        call(block_indices=torch.tensor([2, 2], dtype=torch.int32).expand(2, 2, 3, 2))
    with pytest.raises(UserFacingError, match="block_indices must be an integer tensor"):
        call(block_indices=torch.zeros(2, 2, 4, 2, dtype=torch.int32))
    with pytest.raises(UserFacingError, match="forced_blocks must be an integer tensor"):
        call(forced_blocks=torch.zeros(2, 2, 2, 1, dtype=torch.long))
    with pytest.raises(UserFacingError, match="centroids must be"):
        call(centroids=torch.zeros(2, 2, 5, 8))
    with pytest.raises(UserFacingError, match="block_size must be a positive integer"):
        sparse_reference_attention(**good, block_size=0)
    with pytest.raises(UserFacingError, match="top_k must be a non-negative integer"):
        sparse_reference_attention(**good, block_size=8, top_k=-1)
    assert issubclass(UserFacingError, ValueError)


def test_given_block_indices_and_centroids_are_used():
    inputs = make_inputs(dtype=torch.float64)
    block_indices = torch.tensor([5, -1], dtype=torch.int32).expand(2, 2, 3, 2)
    out = sparse_reference_attention(**inputs, block_size=8, block_indices=block_indices, backend="naive")
    expected, _ = brute_force(**inputs, ref_lengths=None, block_indices=block_indices, block_size=8)
    torch.testing.assert_close(out, expected)
    centroids = reference_block_centroids(inputs["ref_k"], block_size=8)
    routed = sparse_reference_attention(**inputs, block_size=8, centroids=centroids, top_k=2, backend="naive")
    torch.testing.assert_close(routed, sparse_reference_attention(**inputs, block_size=8, top_k=2, backend="naive"))


# ---- coarse branch ---------------------------------------------------------------------------


def test_coarse_branch_matches_loops_and_excludes_invalid_blocks():
    from sparse_avatar.sparse_attention import coarse_reference_attention

    inputs = make_inputs(batch=2, heads=4, kv_heads=2, query_len=11, static_len=None, ref_len=19)
    ref_lengths = torch.tensor([19, 0])
    block = 4
    centroids = reference_block_centroids(inputs["ref_k"], ref_lengths, block)
    value_centroids = reference_block_centroids(inputs["ref_v"], ref_lengths, block)
    out, lse = coarse_reference_attention(inputs["q"], centroids, value_centroids, ref_lengths, block_size=block, return_lse=True)
    assert out.shape == inputs["q"].shape and lse.shape == inputs["q"].shape[:3]
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    for h in range(4):
        for i in range(11):
            start = (i // block) * block
            query = inputs["q"][0, h, start:start + block].mean(0)
            keys = inputs["ref_k"][0, h // 2]
            key_means = torch.stack([keys[j:j + block].mean(0) for j in range(0, 19, block)])
            value_means = torch.stack([inputs["ref_v"][0, h // 2, j:j + block].mean(0) for j in range(0, 19, block)])
            weights = torch.softmax(key_means @ query / math.sqrt(8), 0)
            torch.testing.assert_close(out[0, h, i], weights @ value_means)


def test_coarse_branch_gradients_reach_queries_and_reference():
    from sparse_avatar.sparse_attention import coarse_reference_attention

    inputs = make_inputs(batch=1, heads=2, kv_heads=1, query_len=5, static_len=None, ref_len=7, head_dim=3)
    q = inputs["q"].requires_grad_(True)
    ref_k = inputs["ref_k"].requires_grad_(True)
    ref_v = inputs["ref_v"].requires_grad_(True)
    ref_lengths = torch.tensor([6])

    def function(q, ref_k, ref_v):
        centroids = reference_block_centroids(ref_k, ref_lengths, 2)
        value_centroids = reference_block_centroids(ref_v, ref_lengths, 2)
        return coarse_reference_attention(q, centroids, value_centroids, ref_lengths, block_size=2, return_lse=True)

    assert torch.autograd.gradcheck(function, (q, ref_k, ref_v), eps=1e-6, atol=1e-7)
    out, _ = function(q, ref_k, ref_v)
    out.sum().backward()
    assert ref_k.grad[0, 0, :6].abs().sum() > 0 and torch.equal(ref_k.grad[0, 0, 6], torch.zeros(3, dtype=torch.float64))


# The front door -> fused Triton kernels check runs in Triton's CPU interpreter, in the
# TRITON_INTERPRET=1 child process of tests/test_sparse_attention_triton.py
# (test_triton_backend_through_the_front_door), which starts once for all interpreter tests.


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_naive_and_dense_match_brute_force(seed):
    """Random odd sizes, lengths, top_k and forced blocks: naive and dense both equal brute force."""
    rng = torch.Generator().manual_seed(100 + seed)

    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    kv_heads, group_size = pick(1, 2), [1, 2, 4][pick(0, 2)]
    batch, block = pick(1, 2), [2, 4, 8][pick(0, 2)]
    query_len, static_len, ref_len = pick(1, 19), pick(0, 4), pick(0, 29)
    inputs = make_inputs(batch, kv_heads * group_size, kv_heads, query_len, static_len, ref_len, head_dim=pick(1, 6), seed=seed)
    ref_lengths = torch.randint(0, ref_len + 1, (batch,), generator=rng)
    ref_blocks, query_blocks = math.ceil(ref_len / block), math.ceil(query_len / block)
    forced = torch.randint(-1, max(ref_blocks, 1), (batch, 1, query_blocks, pick(0, 2)), generator=rng) if ref_blocks else None
    top_k = pick(0, 4)
    options = dict(ref_lengths=ref_lengths, block_size=block, top_k=top_k, forced_blocks=forced, return_lse=True)
    out, lse = sparse_reference_attention(**inputs, **options, backend="naive")
    dense_out, dense_lse = sparse_reference_attention(**inputs, **options, backend="dense")
    block_indices = None
    if ref_len:
        centroids = reference_block_centroids(inputs["ref_k"], ref_lengths, block)
        block_indices = route_reference_blocks(inputs["q"], centroids, ref_lengths, block_size=block, top_k=top_k, forced_blocks=forced)
    expected_out, expected_lse = brute_force(**inputs, ref_lengths=ref_lengths, block_indices=block_indices, block_size=block)
    for got_out, got_lse in ((out, lse), (dense_out, dense_lse)):
        torch.testing.assert_close(got_out, expected_out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got_lse, expected_lse, rtol=1e-9, atol=1e-9)


# ---- the deprecated backend name "reference" --------------------------------------------------


def test_reference_is_a_deprecated_alias_of_naive_warned_once(clean_dispatch, caplog):
    clean_dispatch.setattr(dispatch, "_warned_names", set())
    inputs = make_inputs(dtype=torch.float32)
    q, shapes = inputs["q"], shapes_of(inputs)
    with caplog.at_level("WARNING", logger=dispatch.__name__):
        assert dispatch.choose_backend("reference", q, shapes)[0] == "naive"
        assert dispatch.choose_backend(" Reference ", q, shapes)[0] == "naive"
        clean_dispatch.setenv(dispatch.ENV_VAR, "reference")
        assert dispatch.choose_backend("auto", q, shapes)[0] == "naive"
        clean_dispatch.delenv(dispatch.ENV_VAR)
        set_default_backend("reference")
        assert dispatch.choose_backend("auto", q, shapes)[0] == "naive"
        out = sparse_reference_attention(**inputs, block_size=8, backend="reference")
    warnings = [record for record in caplog.records if "deprecated" in record.getMessage()]
    assert len(warnings) == 1 and "'naive'" in warnings[0].getMessage()
    torch.testing.assert_close(out, sparse_reference_attention(**inputs, block_size=8, backend="naive"))
    assert "reference" not in dispatch.BACKEND_NAMES


# ---- validation once, at the entry, without host syncs --------------------------------------


def test_front_door_validation_reads_no_values_of_device_tensors():
    """On a device (here "meta", whose tensors have no values: reading one raises), the front
    door's checks look at shapes, dtypes and devices only; ref_lengths are clamped, not read."""
    meta = {name: (None if t is None else t.to("meta")) for name, t in make_inputs(dtype=torch.float32).items()}
    ref_lengths = torch.empty(2, dtype=torch.long, device="meta")
    shapes = check_attention_inputs(*meta.values(), ref_lengths, 8)
    assert shapes.ref_len == 45 and not shapes.needs_grad
    from sparse_avatar.sparse_attention.inputs import check_forced_blocks, clamp_ref_lengths

    assert clamp_ref_lengths(ref_lengths, 45).device.type == "meta"
    check_forced_blocks(torch.empty(1, 1, 3, 2, dtype=torch.long, device="meta"), 2, 2, 3, 6)
    with pytest.raises(UserFacingError, match="ref_lengths must be an integer tensor"):
        check_attention_inputs(*meta.values(), torch.empty(3, dtype=torch.long, device="meta"), 8)
    # Once per reference, reference_block_centroids does read them (one sync on a GPU).
    with pytest.raises(NotImplementedError):
        reference_block_centroids(meta["ref_k"], ref_lengths, 8)


def test_clamped_lengths_and_out_of_range_forced_ids_behave_like_valid_ones():
    """What a GPU caller gets instead of an error: lengths clamped to [0, Lr], forced ids outside
    [0, nR) treated as -1 (routing drops them, no out-of-bounds index)."""
    from sparse_avatar.sparse_attention.inputs import clamp_ref_lengths
    from sparse_avatar.sparse_attention.routing import select_reference_blocks

    lengths = torch.tensor([-3, 7, 99])
    assert clamp_ref_lengths(lengths, 45) is lengths  # CPU tensors are checked by value instead
    assert torch.equal(torch.tensor([-3, 7, 99]).clamp(0, 45), torch.tensor([0, 7, 45]))
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 16, 4, generator=generator)
    centroids = torch.randn(1, 1, 5, 4, generator=generator)
    wild = torch.tensor([[[[7, 2, -5], [5, 100, 1]]]])
    tame = torch.tensor([[[[-1, 2, -1], [-1, -1, 1]]]])
    got = select_reference_blocks(q, centroids, None, 8, 2, wild)
    assert torch.equal(got, select_reference_blocks(q, centroids, None, 8, 2, tame))
    with pytest.raises(UserFacingError, match="forced_blocks must hold reference block ids"):
        route_reference_blocks(q, centroids, block_size=8, top_k=2, forced_blocks=wild)


def test_backends_assert_instead_of_raising_user_facing_errors():
    inputs = make_inputs(dtype=torch.float64)
    with pytest.raises(AssertionError):
        naive_attention(*inputs.values(), None, None, 8)  # a reference without block_indices
    with pytest.raises(AssertionError):
        naive_attention(*inputs.values(), None, torch.zeros(2, 2, 4, 1, dtype=torch.int32), 8)  # nQ is 3


def test_layout_naive_only_through_dispatch_and_no_user_errors_in_backends():
    """naive.py (the oracle) is imported by production code only in dispatch._naive; backends,
    routing helpers and merging never raise UserFacingError (that is for the public entries)."""
    import ast
    from pathlib import Path

    package = Path(dispatch.__file__).parent
    assert not (package / "reference.py").exists()
    importers = {}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.module == "naive":
                        importers.setdefault(path.name, []).append(node.name)
            elif isinstance(node, ast.ImportFrom) and node.module == "naive" and node.col_offset == 0:
                importers.setdefault(path.name, []).append("<module>")
        if path.name in ("naive.py", "merge.py", "blocks.py", "dense.py", "flex.py", "xformers_backend.py", "triton_fused.py"):
            assert "UserFacingError" not in path.read_text(), path.name
    assert importers == {"dispatch.py": ["_naive"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", BACKEND_CASES + [(2, 4, 2, 300, 5, 700, 64, 3, [700, 450])])
def test_cpu_backend_matches_naive_when_rendering(case, dtype):
    """The CPU render path (fused flash kernel for the clip and static branches) against the
    definition, odd sizes included; it serves inference only (see the next test)."""
    batch, heads, kv_heads, query_len, static_len, ref_len, block, top_k, lengths = case
    inputs = make_inputs(batch, heads, kv_heads, query_len, static_len, ref_len, dtype=dtype, seed=13)
    ref_lengths = None if lengths is None else torch.tensor(lengths)
    with torch.no_grad():
        expected = run_backend("naive", inputs, ref_lengths, block, top_k, with_grad=False)
        got = run_backend("cpu", inputs, ref_lengths, block, top_k, with_grad=False)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], **tolerance)
    torch.testing.assert_close(got[1], expected[1], **tolerance)


def test_auto_renders_with_the_cpu_backend_and_trains_without_it(clean_dispatch):
    from sparse_avatar.sparse_attention import cpu

    if not cpu.fused_kernel_available():
        pytest.skip("this torch has no fused CPU flash-attention kernel")
    inputs = make_inputs(dtype=torch.float32)
    shapes = shapes_of(inputs)
    with torch.no_grad():
        assert dispatch.choose_backend("auto", inputs["q"], shapes)[0] == "cpu"
    # Training needs gradients through every branch's lse, which the fused kernel does not give.
    assert dispatch.choose_backend("auto", inputs["q"], shapes)[0] in ("dense", "naive")
    with pytest.raises(UserFacingError, match="for inference"):
        dispatch.choose_backend("cpu", inputs["q"], shapes)
