"""GPU benchmark and GPU correctness check of sparse reference attention backends.

    python bench/sparse_attention.py --out-dir bench/results          # full run on a CUDA GPU
    python bench/sparse_attention.py --quick --out-dir /tmp/sa        # the grid in ~3 min (no dense,
                                                                     # Flex on 9 shapes) -> *_quick.*
    python bench/sparse_attention.py --smoke --out-dir /tmp/x         # tiny CPU dry run of the script
                                                                     # (TRITON_INTERPRET=1)

Stages (each writes its files as soon as it finishes, so a run cut short keeps what it measured):
  1. sweep     (--sweep) tile configurations of the fused kernels on one shape -> sweep.json
  2. check     fused vs naive.py (fp64) on small odd shapes, fp32/fp16/bf16, forward and all
               gradients -> sparse_attention_check.json
  3. bench     the grid below -> sparse_attention.json / .md / .png; fused rows also time the
               static-key dK/dV alone (split as shipped vs unsplit), the routing and the front door;
               a torch.profiler table of the fused fwd+bwd kernels at the issue's shape; a summary
               against issue 11's attention targets

Grid (bf16, d=128, H=16, S=64 static tokens, B=1, block 128): G in {1,4}, Lq in {4096,16384},
Lr in {16k,64k,256k,1M}, keys = k*128 in {2048,4096}. Backends: "fused" (triton_fused), "flex"
(the shipped Flex backend, sparse_attention/flex.py, on the same selected blocks; a subset of the
grid because every new shape costs a torch.compile) and "dense" (one SDPA call over clip + static +
the WHOLE reference, heads repeated for GQA; where memory allows). Blocks are chosen at random
(distinct per query block and kv head): the kernels' cost does not depend on which blocks.

tflops_fwd = 4*H*d*Lq*(keys + S + Lq) / fwd time (the work the sparse problem needs; for dense rows
keys = Lr). max_err = max |out - exact fp32| over two query blocks (first and last), all heads,
computed by gathering the selected blocks in plain PyTorch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
import _checkout  # noqa: F401,E402  (sparse_avatar importable from a bare checkout)

from sparse_avatar.files import write_text  # noqa: E402
from sparse_avatar.sparse_attention import triton_fused  # noqa: E402
from sparse_avatar.sparse_attention.naive import naive_attention  # noqa: E402

HEADS, HEAD_DIM, STATIC_LEN, BLOCK = 16, 128, 64, 128


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
_TARGET_MS = 150.0  # time measured per number (--quick: 80)


def time_ms(fn, device, min_reps=3, target_ms=None):
    """Mean time of fn() in ms (CUDA events around a loop; perf_counter on CPU)."""
    target_ms = _TARGET_MS if target_ms is None else target_ms * _TARGET_MS / 150.0
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        reps = max(min_reps, min(200, int(target_ms / once)))
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    began = time.perf_counter()
    for _ in range(min_reps):
        fn()
    return (time.perf_counter() - began) * 1000 / min_reps


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def random_block_indices(batch, kv_heads, query_blocks, ref_blocks, top_k, device, generator=None):
    """Distinct random blocks per (batch, kv head, query block): argsort of random keys."""
    top_k = min(top_k, ref_blocks)
    scores = torch.rand(batch, kv_heads, query_blocks, ref_blocks, device=device, generator=generator)
    return scores.topk(top_k, dim=-1).indices.to(torch.int32).contiguous()


def make_problem(group, query_len, ref_len, keys, dtype, device, static_len=STATIC_LEN, heads=HEADS,
                 head_dim=HEAD_DIM, block=BLOCK, requires_grad=False, batch=1):
    kv_heads = heads // group
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator).requires_grad_(requires_grad)

    q, k, v = (randn(batch, heads, query_len, head_dim) for _ in range(3))
    static_k, static_v = randn(batch, kv_heads, static_len, head_dim), randn(batch, kv_heads, static_len, head_dim)
    ref_k, ref_v = randn(batch, kv_heads, ref_len, head_dim), randn(batch, kv_heads, ref_len, head_dim)
    ref_lengths = torch.full((batch,), ref_len, dtype=torch.long, device=device)
    block_indices = random_block_indices(batch, kv_heads, -(-query_len // block), -(-ref_len // block),
                                         keys // block, device, generator)
    return dict(q=q, k=k, v=v, static_k=static_k, static_v=static_v, ref_k=ref_k, ref_v=ref_v,
                ref_lengths=ref_lengths, block_indices=block_indices)


def call(backend, p, block=BLOCK):
    args = (p["q"], p["k"], p["v"], p["static_k"], p["static_v"], p["ref_k"], p["ref_v"], p["ref_lengths"],
            p["block_indices"], block, p["q"].shape[-1] ** -0.5)
    if backend == "fused":
        return triton_fused.fused_sparse_attention(*args)
    if backend == "flex":
        from sparse_avatar.sparse_attention import flex

        return flex.flex_sparse_attention(*args)
    raise ValueError(backend)


def dense_call(p):
    """SDPA over clip + static + the whole reference (heads repeated: the clip branch has H heads)."""
    q = p["q"]
    group = q.shape[1] // p["ref_k"].shape[1]
    keys = torch.cat([p["k"], p["static_k"].repeat_interleave(group, 1), p["ref_k"].repeat_interleave(group, 1)], 2)
    values = torch.cat([p["v"], p["static_v"].repeat_interleave(group, 1), p["ref_v"].repeat_interleave(group, 1)], 2)
    return lambda: F.scaled_dot_product_attention(q, keys, values)


def exact_rows(p, query_block, block=BLOCK):
    """fp32 output of the sparse problem for one query block (all heads), by explicit gathering."""
    q = p["q"][0].float()
    heads, query_len, head_dim = q.shape
    kv_heads = p["ref_k"].shape[1]
    group = heads // kv_heads
    rows = slice(query_block * block, min((query_block + 1) * block, query_len))
    ids = p["block_indices"][0, :, query_block].long()  # [Hkv, K]
    ids = ids.clamp(min=0)
    positions = (ids[..., None] * block + torch.arange(block, device=ids.device)).flatten(1)  # [Hkv, K*b]
    positions = positions.clamp(max=p["ref_k"].shape[2] - 1)
    valid = (p["block_indices"][0, :, query_block].long()[..., None] >= 0).expand(-1, -1, block).flatten(1)
    valid = valid & (positions < int(p["ref_lengths"][0]))
    ref_k = torch.gather(p["ref_k"][0].float(), 1, positions[..., None].expand(-1, -1, head_dim))
    ref_v = torch.gather(p["ref_v"][0].float(), 1, positions[..., None].expand(-1, -1, head_dim))
    keys = torch.cat([p["k"][0].float(), p["static_k"][0].float().repeat_interleave(group, 0),
                      ref_k.repeat_interleave(group, 0)], 1)
    values = torch.cat([p["v"][0].float(), p["static_v"][0].float().repeat_interleave(group, 0),
                        ref_v.repeat_interleave(group, 0)], 1)
    mask = torch.cat([torch.ones(heads, query_len + p["static_k"].shape[2], dtype=torch.bool, device=q.device),
                      valid.repeat_interleave(group, 0)], 1)
    scores = (q[:, rows] @ keys.transpose(-1, -2)) * head_dim ** -0.5
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ values, rows


def max_error_on_rows(out, p, block=BLOCK):
    query_blocks = -(-p["q"].shape[2] // block)
    error = 0.0
    for query_block in sorted({0, query_blocks - 1}):
        expected, rows = exact_rows(p, query_block, block)
        error = max(error, (out[0, :, rows].float() - expected).abs().max().item())
    return error


# ---------------------------------------------------------------------------------------------
# 1. sweep
# ---------------------------------------------------------------------------------------------
FORWARD_CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=5),
]
DQ_CANDIDATES = [
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
]
DKDV_STATIC_CANDIDATES = [
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
]
DKDV_CANDIDATES = [
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
]


def sweep(device, dtype, out_dir, log):
    """Try tile configurations on G=4, Lq=16384, Lr=262144, keys=4096; keep the fastest."""
    p = make_problem(4, 16384, 262144, 4096, dtype, device, requires_grad=True)
    results = {"forward": [], "dq": [], "dkdv": []}

    def forward():
        return call("fused", p)

    for config in FORWARD_CANDIDATES:
        triton_fused._FORWARD_CONFIG = dict(config)
        try:
            ms = time_ms(forward, device)
        except Exception as error:  # a config may not fit in shared memory / registers
            log(f"sweep forward {config}: failed ({type(error).__name__}: {str(error)[:200]})")
            continue
        results["forward"].append({**config, "ms": ms})
        log(f"sweep forward {config}: {ms:.3f} ms")
    best_forward = min(results["forward"], key=lambda r: r["ms"])
    triton_fused._FORWARD_CONFIG = {k: best_forward[k] for k in FORWARD_CANDIDATES[0]}

    out, _ = forward()
    grad = torch.randn_like(out)
    inputs = [p[name] for name in ("q", "k", "v", "static_k", "static_v", "ref_k", "ref_v")]

    def forward_backward():
        o, _ = forward()
        return torch.autograd.grad(o, inputs, grad)

    for key, candidates, attr in (("dq", DQ_CANDIDATES, "_DQ_CONFIG"), ("dkdv", DKDV_CANDIDATES, "_DKDV_CONFIG")):
        for config in candidates:
            setattr(triton_fused, attr, dict(config))
            try:
                ms = time_ms(forward_backward, device)
            except Exception as error:
                log(f"sweep {key} {config}: failed ({type(error).__name__}: {str(error)[:200]})")
                continue
            results[key].append({**config, "fwd_bwd_ms": ms})
            log(f"sweep {key} {config}: fwd+bwd {ms:.3f} ms")
        best = min(results[key], key=lambda r: r["fwd_bwd_ms"])
        setattr(triton_fused, attr, {k: best[k] for k in candidates[0]})
    results["dkdv_static"] = []
    with torch.no_grad():
        out, lse = forward()
        delta = (grad.float() * out.float()).sum(-1).contiguous()
    q, static_k, static_v = p["q"].detach(), p["static_k"].detach(), p["static_v"].detach()
    for config in DKDV_STATIC_CANDIDATES:
        triton_fused._DKDV_STATIC_CONFIG = dict(config)
        try:
            ms = time_ms(lambda: triton_fused.static_dkdv(q, static_k, static_v, grad, lse, delta, q.shape[-1] ** -0.5), device)
        except Exception as error:
            log(f"sweep dkdv_static {config}: failed ({type(error).__name__}: {str(error)[:200]})")
            continue
        results["dkdv_static"].append({**config, "ms": ms})
        log(f"sweep dkdv_static {config}: {ms:.3f} ms")
    best = min(results["dkdv_static"], key=lambda r: r["ms"])
    triton_fused._DKDV_STATIC_CONFIG = {k: best[k] for k in DKDV_STATIC_CANDIDATES[0]}
    results["chosen"] = {"forward": triton_fused._FORWARD_CONFIG, "dq": triton_fused._DQ_CONFIG,
                         "dkdv": triton_fused._DKDV_CONFIG, "dkdv_static": triton_fused._DKDV_STATIC_CONFIG}
    (out_dir / "sparse_attention_sweep.json").write_text(json.dumps(results, indent=1))
    log(f"sweep chose {results['chosen']}")
    del p, out, grad, inputs, lse, delta
    torch.cuda.empty_cache() if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# 2. check against naive.py (the definition)
# ---------------------------------------------------------------------------------------------
def check(device, out_dir, log, smoke=False, quick=False, stem="sparse_attention"):
    """Fused vs naive.py in fp64, forward and every gradient, on small odd shapes."""
    cases = [
        # (B, H, G, Lq, S, Lr, lengths, top_k, d, block)
        (2, 8, 4, 300, 37, 1000, [1000, 611], 4, 128, 128),
        (1, 4, 1, 200, 0, 517, None, 9, 64, 64),
        (2, 8, 4, 129, 64, 0, None, 2, 128, 128),
        (1, 8, 2, 257, 5, 300, None, 8, 64, 128),
    ]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if quick:
        # The odd-S GQA case with a padded sample (several chunks of query tiles for the static
        # keys) and a d=64 one (the small-head tiles); fp32 kernels compile slowly (and their tiles
        # do not depend on d), so fp16/bf16 only.
        cases = [cases[0], cases[3]]
        dtypes = [torch.float16, torch.bfloat16]
    if smoke:
        cases = [(1, 4, 4, 40, 3, 70, [50], 3, 16, 16)]
        dtypes = [torch.float32]
    report = []
    all_ok = True
    for case in cases:
        batch, heads, group, lq, static_len, lr, lengths, top_k, d, block = case
        kv_heads = heads // group
        generator = torch.Generator(device=device).manual_seed(1)
        base = {
            "q": torch.randn(batch, heads, lq, d, device=device, dtype=torch.float64, generator=generator),
            "k": torch.randn(batch, heads, lq, d, device=device, dtype=torch.float64, generator=generator),
            "v": torch.randn(batch, heads, lq, d, device=device, dtype=torch.float64, generator=generator),
            "static_k": torch.randn(batch, kv_heads, static_len, d, device=device, dtype=torch.float64, generator=generator) if static_len else None,
            "static_v": torch.randn(batch, kv_heads, static_len, d, device=device, dtype=torch.float64, generator=generator) if static_len else None,
            "ref_k": torch.randn(batch, kv_heads, lr, d, device=device, dtype=torch.float64, generator=generator) if lr else None,
            "ref_v": torch.randn(batch, kv_heads, lr, d, device=device, dtype=torch.float64, generator=generator) if lr else None,
        }
        ref_lengths = (torch.tensor(lengths, device=device) if lengths else torch.full((batch,), lr, device=device)) if lr else None
        block_indices = None
        if lr:
            block_indices = random_block_indices(batch, kv_heads, -(-lq // block), -(-lr // block), top_k, device, generator)
            # Blocks beyond a shorter reference hold no valid key; the router never picks them.
            too_far = block_indices.long() * block >= ref_lengths.view(batch, 1, 1, 1)
            block_indices = torch.where(too_far, torch.full_like(block_indices, -1), block_indices)
        names = ["q", "k", "v", "static_k", "static_v", "ref_k", "ref_v"]
        grad_out = torch.randn(batch, heads, lq, d, device=device, dtype=torch.float64, generator=generator)

        def run(fn, dtype):
            tensors = [None if base[n] is None else base[n].detach().to(dtype).requires_grad_(True) for n in names]
            out, lse = fn(*tensors, ref_lengths, block_indices, block, d ** -0.5)
            (out.double() * grad_out).sum().backward()
            return out.double(), lse.double(), [None if t is None else t.grad.double() for t in tensors]

        exact = run(naive_attention, torch.float64)
        for dtype in dtypes:
            triton_fused.POISON_OUTPUTS_FOR_TESTS = True
            fused = run(triton_fused.fused_sparse_attention, dtype)
            triton_fused.POISON_OUTPUTS_FOR_TESTS = False
            plain = run(naive_attention, dtype)  # same-precision inputs, fp32 accumulation
            row = {"case": case, "dtype": str(dtype).replace("torch.", "")}
            ok = True
            for index, name in enumerate(["out", "lse"] + ["d" + n for n in names]):
                want = exact[index] if index < 2 else exact[2][index - 2]
                got = fused[index] if index < 2 else fused[2][index - 2]
                same_precision = plain[index] if index < 2 else plain[2][index - 2]
                if want is None:
                    continue
                if want.numel() == 0:
                    continue
                magnitude = max(want.abs().max().item(), 1e-6)
                error = (got - want).abs().max().item() / magnitude
                baseline = (same_precision - want).abs().max().item() / magnitude
                finite = bool(torch.isfinite(got).all())
                # FlagAttention's rule (kernel error <= 2x the plain same-precision computation's)
                # with a floor: naive.py accumulates in fp32 and keeps probabilities in fp32,
                # while the kernel rounds P to the input dtype before P@V as every flash kernel does.
                floor = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
                passed = finite and error <= max(2 * baseline, floor)
                ok &= passed
                row[name] = {"rel_err": error, "same_precision_rel_err": baseline, "ok": passed}
            row["ok"] = ok
            all_ok &= ok
            report.append(row)
            log(f"check {case} {row['dtype']}: {'ok' if ok else 'FAILED'} "
                + " ".join(f"{k}={v['rel_err']:.1e}" for k, v in row.items() if isinstance(v, dict)))
    (out_dir / f"{stem}_check.json").write_text(json.dumps({"all_ok": all_ok, "rows": report}, indent=1))
    return all_ok


# ---------------------------------------------------------------------------------------------
# 3. bench
# ---------------------------------------------------------------------------------------------
def tflops(heads, head_dim, query_len, keys, static_len, ms):
    return 4 * heads * head_dim * query_len * (keys + static_len + query_len) / (ms * 1e-3) / 1e12


_STARTED = time.time()

GRID = dict(groups=(4, 1), query_lens=(4096, 16384), ref_lens=(16384, 65536, 262144, 1048576), key_counts=(2048, 4096))
# Flex compiles per shape (clip and static per (G, Lq), the reference branch per Lr as well), so
# it runs on a subset unless --flex all. "subset": the shapes of the H100 run; "quick": one Lr
# per (G, Lq) with both key counts (same compiled kernels), plus the issue's headline shapes.
FLEX_SHAPES = {
    "subset": {(4, 16384, 16384, 4096), (4, 16384, 65536, 4096), (4, 16384, 262144, 4096), (4, 16384, 1048576, 4096),
               (1, 16384, 65536, 4096), (4, 4096, 65536, 4096), (1, 4096, 65536, 2048), (4, 4096, 262144, 2048)},
    "quick": {(g, lq, 65536, keys) for g in (4, 1) for lq in (4096, 16384) for keys in (2048, 4096)}
    | {(4, 16384, 262144, 4096)},
    "none": set(),
}
ISSUE_SHAPE = (4, 16384, 262144, 4096)  # G, Lq, Lr, keys of the issue's forward target


def gpu_ms(fn, device, iterations=5):
    """CUDA time of fn()'s kernels per call (torch.profiler), whatever the host costs; None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for event in prof.key_averages():
        if "CUDA" in str(getattr(event, "device_type", "")):
            total += (getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0) or 0.0)
    return total / 1000 / iterations


def fused_breakdown(p, grad, block, top_k, device):
    """The static-key dK/dV alone (split as shipped, and unsplit = the old B*Hkv-program walk),
    the routing (block scores + top-k on cached centroids), the centroids, the front door, and
    fwd+bwd when every query block selects the same blocks (the reference dK/dV's worst case: one
    program per selected key tile walks all G*Lq queries)."""
    from sparse_avatar.sparse_attention import sparse_reference_attention
    # block_centroids: reference_block_centroids without its once-per-reference ref_lengths check
    # (a host sync), so the column times the computation.
    from sparse_avatar.sparse_attention.routing import block_centroids, select_reference_blocks

    q, static_k, static_v = p["q"].detach(), p["static_k"].detach(), p["static_v"].detach()
    scale = q.shape[-1] ** -0.5
    result = {}
    with torch.no_grad():
        out, lse = call("fused", p, block)
        delta = (grad.float() * out.float()).sum(-1).contiguous()
        config = triton_fused._static_tile_config(static_k.shape[2], q.shape[-1], q.dtype)
        num_k_tiles = -(-static_k.shape[2] // config["BLOCK_N"])
        query_tiles = (q.shape[1] // static_k.shape[1]) * -(-q.shape[2] // config["BLOCK_M"])
        result["static_chunks"] = triton_fused.static_query_chunks(
            q.shape[0], static_k.shape[1], num_k_tiles, query_tiles, static_k.shape[2], q.shape[-1], device)[0]
        def static():
            return triton_fused.static_dkdv(q, static_k, static_v, grad, lse, delta, scale)

        result["static_bwd_ms"] = time_ms(static, device)
        result["static_bwd_gpu_ms"] = gpu_ms(static, device)
        triton_fused._STATIC_CHUNKS = 1
        try:
            result["static_bwd_unsplit_ms"] = time_ms(
                lambda: triton_fused.static_dkdv(q, static_k, static_v, grad, lse, delta, scale), device, min_reps=2, target_ms=60.0)
        finally:
            triton_fused._STATIC_CHUNKS = None
        del out, lse, delta
        ref_k, ref_v, ref_lengths = p["ref_k"].detach(), p["ref_v"].detach(), p["ref_lengths"]
        result["centroids_ms"] = time_ms(lambda: block_centroids(ref_k, ref_lengths, block), device)
        centroids = block_centroids(ref_k, ref_lengths, block)
        def route():
            return select_reference_blocks(q, centroids, ref_lengths, block, top_k, None)

        result["routing_ms"] = time_ms(route, device)
        result["routing_gpu_ms"] = gpu_ms(route, device)
        # validation (its host syncs) + routing + the fused forward, as the model calls it
        result["front_door_fwd_ms"] = time_ms(lambda: sparse_reference_attention(
            q, p["k"].detach(), p["v"].detach(), static_k, static_v, ref_k, ref_v, ref_lengths, centroids=centroids,
            block_size=block, top_k=top_k, backend="triton"), device)
    same = dict(p, block_indices=p["block_indices"][:, :, :1].expand_as(p["block_indices"]).contiguous())
    inputs = [p[n] for n in ("q", "k", "v", "static_k", "static_v", "ref_k", "ref_v")]

    def same_blocks_step():
        o, _ = call("fused", same, block)
        return torch.autograd.grad(o, inputs, grad)

    result["fwd_bwd_same_blocks_ms"] = time_ms(same_blocks_step, device, min_reps=2, target_ms=60.0)
    return result


def profile_backward(p, grad, block, device, log):
    """CUDA time per kernel of one fused fwd+bwd (torch.profiler, mean of 3 iterations)."""
    inputs = [p[n] for n in ("q", "k", "v", "static_k", "static_v", "ref_k", "ref_v")]

    def step():
        o, _ = call("fused", p, block)
        return torch.autograd.grad(o, inputs, grad)

    step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    iterations = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us and getattr(event, "device_type", None) is not None and "CUDA" in str(event.device_type):
            kernels[event.key] = kernels.get(event.key, 0.0) + device_us / 1000 / iterations
    ours = {k: v for k, v in kernels.items() if k.startswith("_") and "kernel" in k}
    result = {"kernels_ms": dict(sorted(ours.items(), key=lambda kv: -kv[1])),
              "other_cuda_ms": sum(v for k, v in kernels.items() if k not in ours)}
    log("fwd+bwd kernels (ms per step): " + ", ".join(f"{k} {v:.3f}" for k, v in result["kernels_ms"].items())
        + f", other {result['other_cuda_ms']:.3f}")
    return result


def bench(device, dtype, out_dir, log, budget_s, smoke=False, flex="subset", dense=True, stem="sparse_attention"):
    groups, query_lens, ref_lens, key_counts = GRID["groups"], GRID["query_lens"], GRID["ref_lens"], GRID["key_counts"]
    heads, head_dim, block, static_len = HEADS, HEAD_DIM, BLOCK, STATIC_LEN
    flex_grid = set(GRID_ALL) if flex == "all" else FLEX_SHAPES[flex]
    issue_shape = ISSUE_SHAPE
    if smoke:
        groups, query_lens, ref_lens, key_counts = (1, 4), (64,), (256, 512), (32,)
        heads, head_dim, block, static_len = 4, 16, 16, 5
        flex_grid = set()
        issue_shape = None
    began = _STARTED
    rows, notes, extra = [], [], {}
    if not smoke:
        extra["training_shapes"] = bench_training_shapes(device, dtype, log)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET smoke run)"

    def save():
        write_results(out_dir, device_name, rows, notes, extra, stem)

    for group in groups:
        for query_len in query_lens:
            for ref_len in ref_lens:
                over_budget = time.time() - began > budget_s
                for keys in key_counts:
                    if over_budget:
                        notes.append(f"skipped G={group} Lq={query_len} Lr={ref_len} keys={keys}: time budget")
                        continue
                    p = make_problem(group, query_len, ref_len, keys, dtype, device, static_len, heads, head_dim,
                                     block, requires_grad=True)
                    inputs = [p[n] for n in ("q", "k", "v", "static_k", "static_v", "ref_k", "ref_v")]
                    grad = torch.randn(1, heads, query_len, head_dim, device=device, dtype=dtype)
                    for backend in ("fused", "flex"):
                        if backend == "flex" and (group, query_len, ref_len, keys) not in flex_grid:
                            continue
                        try:
                            with torch.no_grad():
                                out, _ = call(backend, p, block)
                            error = max_error_on_rows(out, p, block)
                            del out
                            with torch.no_grad():
                                fwd = time_ms(lambda: call(backend, p, block), device)

                            def forward_backward():
                                o, _ = call(backend, p, block)
                                return torch.autograd.grad(o, inputs, grad)

                            fwd_bwd = time_ms(forward_backward, device)
                            parts = fused_breakdown(p, grad, block, keys // block, device) if backend == "fused" else {}
                            if backend == "fused" and (group, query_len, ref_len, keys) == issue_shape:
                                extra["profile"] = {"shape": dict(G=group, Lq=query_len, Lr=ref_len, keys=keys),
                                                    **profile_backward(p, grad, block, device, log)}
                        except torch.OutOfMemoryError:
                            notes.append(f"{backend} G={group} Lq={query_len} Lr={ref_len} keys={keys}: out of memory")
                            torch.cuda.empty_cache()
                            continue
                        rows.append(dict(backend=backend, G=group, Lq=query_len, Lr=ref_len, keys=keys,
                                         fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                                         tflops_fwd=tflops(heads, head_dim, query_len, keys, static_len, fwd),
                                         max_err=error, **parts))
                        line = (f"{backend:5s} G={group} Lq={query_len:6d} Lr={ref_len:8d} keys={keys}: fwd {fwd:8.3f} ms "
                                f"({rows[-1]['tflops_fwd']:6.1f} TFLOP/s) fwd+bwd {fwd_bwd:8.3f} ms err {error:.2e}")
                        if parts:
                            line += (f" | static bwd {parts['static_bwd_ms']:.3f} ms ({parts['static_chunks']} chunks; "
                                     f"unsplit {parts['static_bwd_unsplit_ms']:.3f}) routing {parts['routing_ms']:.3f} ms "
                                     f"({100 * parts['routing_ms'] / fwd:.1f}% of fwd; GPU {parts['routing_gpu_ms'] or 0:.3f}) "
                                     f"front door fwd {parts['front_door_fwd_ms']:.3f}"
                                     f" fwd+bwd same blocks {parts['fwd_bwd_same_blocks_ms']:.3f}")
                        log(line)
                        save()
                    del p, inputs, grad
                # Dense SDPA over the whole reference: independent of keys; forward only.
                if over_budget or device.type != "cuda" or not dense:
                    continue
                p = make_problem(group, query_len, ref_len, block, dtype, device, static_len, heads, head_dim, block)
                needed = 2 * 2 * heads * (query_len + static_len + ref_len) * head_dim * p["q"].element_size()
                if needed > 0.6 * torch.cuda.mem_get_info(device)[0]:
                    notes.append(f"dense G={group} Lq={query_len} Lr={ref_len}: skipped, needs {needed / 2**30:.1f} GiB of repeated K/V")
                    del p
                    continue
                try:
                    dense_fn = dense_call(p)
                    fwd = time_ms(dense_fn, device, min_reps=2, target_ms=400.0)
                except torch.OutOfMemoryError:
                    notes.append(f"dense G={group} Lq={query_len} Lr={ref_len}: out of memory")
                    dense_fn = None
                    torch.cuda.empty_cache()
                if dense_fn is not None:
                    rows.append(dict(backend="dense", G=group, Lq=query_len, Lr=ref_len, keys=ref_len, fwd_ms=fwd,
                                     fwd_bwd_ms=None, tflops_fwd=tflops(heads, head_dim, query_len, ref_len, static_len, fwd),
                                     max_err=None))
                    log(f"dense G={group} Lq={query_len:6d} Lr={ref_len:8d}: fwd {fwd:8.3f} ms ({rows[-1]['tflops_fwd']:6.1f} TFLOP/s)")
                    save()
                del p, dense_fn
                torch.cuda.empty_cache() if device.type == "cuda" else None
    save()
    return rows


# The attention of a training step (bench/training.py's defaults: batch 4, 16 target frames of
# 256 tokens, 64 reference frames) for the `small` and `base` configs (model/configs.py).
TRAINING_SHAPES = [
    dict(config="small", B=4, H=8, G=4, d=64, S=32, Lq=4096, Lr=16384, top_k=8),
    dict(config="base", B=4, H=16, G=4, d=128, S=64, Lq=4096, Lr=16384, top_k=8),
]


def bench_training_shapes(device, dtype, log, block=BLOCK):
    """Fused fwd, fwd+bwd and the static dK/dV (split vs unsplit) at training shapes."""
    rows = []
    for shape in TRAINING_SHAPES:
        p = make_problem(shape["G"], shape["Lq"], shape["Lr"], shape["top_k"] * block, dtype, device, shape["S"],
                         shape["H"], shape["d"], block, requires_grad=True, batch=shape["B"])
        inputs = [p[n] for n in ("q", "k", "v", "static_k", "static_v", "ref_k", "ref_v")]
        grad = torch.randn_like(p["q"])
        with torch.no_grad():
            fwd = time_ms(lambda: call("fused", p, block), device)

        def forward_backward():
            o, _ = call("fused", p, block)
            return torch.autograd.grad(o, inputs, grad)

        fwd_bwd = time_ms(forward_backward, device)
        row = dict(shape, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, **fused_breakdown(p, grad, block, shape["top_k"], device))
        rows.append(row)
        log(f"training shape {shape}: fwd {fwd:.3f} ms fwd+bwd {fwd_bwd:.3f} ms static bwd {row['static_bwd_ms']:.3f} "
            f"({row['static_chunks']} chunks; unsplit {row['static_bwd_unsplit_ms']:.3f}) routing {row['routing_ms']:.3f} "
            f"fwd+bwd same blocks {row['fwd_bwd_same_blocks_ms']:.3f}")
        del p, inputs, grad
    return rows


GRID_ALL = {(g, lq, lr, keys) for g in GRID["groups"] for lq in GRID["query_lens"] for lr in GRID["ref_lens"]
            for keys in GRID["key_counts"]}


def target_summary(rows):
    """The issue's attention targets, judged on these rows (lines of markdown)."""
    fused = {(r["G"], r["Lq"], r["Lr"], r["keys"]): r for r in rows if r["backend"] == "fused"}
    flex = {(r["G"], r["Lq"], r["Lr"], r["keys"]): r for r in rows if r["backend"] == "flex"}
    lines = []
    both = sorted(set(fused) & set(flex))
    if both:
        lines += ["| G | Lq | Lr | keys | fwd fused/flex speedup | fwd+bwd speedup |", "|---|---|---|---|---|---|"]
        for shape in both:
            lines.append(f"| {' | '.join(map(str, shape))} | {flex[shape]['fwd_ms'] / fused[shape]['fwd_ms']:.2f}x | "
                         f"{flex[shape]['fwd_bwd_ms'] / fused[shape]['fwd_bwd_ms']:.2f}x |")
        lines.append("")
        worst = min(both, key=lambda s: flex[s]["fwd_bwd_ms"] / fused[s]["fwd_bwd_ms"])
        ratio = flex[worst]["fwd_bwd_ms"] / fused[worst]["fwd_bwd_ms"]
        lines.append(f"- fwd+bwd >= 1.2x Flex at every shape with a Flex row ({len(both)} of {len(fused)}): "
                     f"{'met' if ratio >= 1.2 else 'missed'} (worst {ratio:.2f}x at G,Lq,Lr,keys={worst})")
    if ISSUE_SHAPE in fused:
        r = fused[ISSUE_SHAPE]
        speedup = f", {flex[ISSUE_SHAPE]['fwd_ms'] / r['fwd_ms']:.2f}x Flex (target 1.3x)" if ISSUE_SHAPE in flex else ""
        lines.append(f"- forward at G,Lq,Lr,keys={ISSUE_SHAPE}: {r['tflops_fwd']:.0f} TFLOP/s (target 500){speedup}")
    for key, what in (("routing_gpu_ms", "GPU time"), ("routing_ms", "wall time per call (host-bound where small)")):
        with_routing = [r for r in fused.values() if r.get(key) is not None]
        if not with_routing:
            continue
        worst = max(with_routing, key=lambda r: r[key] / r["fwd_ms"])
        share = worst[key] / worst["fwd_ms"]
        lines.append(f"- routing < 10% of the attention forward at every shape, by {what}: "
                     f"{'met' if share < 0.1 else 'missed'} (worst {100 * share:.1f}%: {worst[key]:.3f} ms vs fwd "
                     f"{worst['fwd_ms']:.3f} ms at G={worst['G']} Lq={worst['Lq']} Lr={worst['Lr']} keys={worst['keys']}); "
                     f"of fwd+bwd at most {100 * max(r[key] / r['fwd_bwd_ms'] for r in with_routing):.1f}%")
    for measure in ("fwd_ms", "fwd_bwd_ms"):
        ratios = []
        for (g, lq, lr, keys), r in fused.items():
            if lr == max(GRID["ref_lens"]) and (g, lq, min(GRID["ref_lens"]), keys) in fused:
                ratios.append((r[measure] / fused[(g, lq, min(GRID["ref_lens"]), keys)][measure], (g, lq, keys)))
        if ratios:
            worst = max(ratios)
            label = "fwd" if measure == "fwd_ms" else "fwd+bwd (not a target)"
            lines.append(f"- {label} time at Lr=1M <= 1.5x Lr=16k: {'met' if worst[0] <= 1.5 else 'missed'} "
                         f"(worst {worst[0]:.2f}x at G,Lq,keys={worst[1]})")
    return lines


def write_results(out_dir, device_name, rows, notes, extra=None, stem="sparse_attention"):
    extra = extra or {}
    payload = {"device": device_name, "dtype": "bfloat16", "H": HEADS, "d": HEAD_DIM, "S": STATIC_LEN, "B": 1,
               "block_size": BLOCK, "config": {"forward": triton_fused._FORWARD_CONFIG, "dq": triton_fused._DQ_CONFIG,
                                               "dkdv": triton_fused._DKDV_CONFIG,
                                               "dkdv_static": triton_fused._DKDV_STATIC_CONFIG,
                                               "d<=64": triton_fused._SMALL_HEAD_CONFIGS},
               "rows": rows, "notes": notes, **extra}
    write_text(out_dir / f"{stem}.json", json.dumps(payload, indent=1))

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [f"# Sparse reference attention on {device_name}", "",
             f"bf16, d={HEAD_DIM}, H={HEADS}, S={STATIC_LEN}, B=1, block {BLOCK}. keys = k*block reference keys per "
             "query (dense: the whole reference). tflops_fwd = 4*H*d*Lq*(keys+S+Lq)/time. max_err = max |out - exact "
             "fp32| over two query blocks (dense rows: not measured). Fused rows also time, on their own: the static-key "
             "dK/dV (split over query chunks as shipped, and unsplit = B*Hkv programs walking all G*Lq queries, the old "
             "layout), the routing (block scores + top-k on cached centroids) and the front door "
             "(`sparse_reference_attention(..., backend='triton')`: validation + routing + fused forward), and fwd+bwd "
             "with every query block on the same blocks (the reference dK/dV's serial worst case). Times are wall "
             "time per call in a loop: where a call is host-bound (small shapes) they measure the host.", "",
             "| backend | G | Lq | Lr | keys | fwd ms | fwd+bwd ms | TFLOP/s fwd | max err | static bwd ms (chunks) "
             "| static bwd GPU ms | static unsplit ms | routing ms (% fwd) | routing GPU ms (% fwd) | front door fwd ms "
             "| fwd+bwd same blocks ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["G"], r["Lq"], r["keys"], r["Lr"], r["backend"])):
        static = f"{r['static_bwd_ms']:.3f} ({r['static_chunks']})" if r.get("static_bwd_ms") is not None else "-"
        routing = (f"{r['routing_ms']:.3f} ({100 * r['routing_ms'] / r['fwd_ms']:.0f}%)"
                   if r.get("routing_ms") is not None else "-")
        routing_gpu = (f"{r['routing_gpu_ms']:.3f} ({100 * r['routing_gpu_ms'] / r['fwd_ms']:.0f}%)"
                       if r.get("routing_gpu_ms") is not None else "-")
        lines.append(f"| {r['backend']} | {r['G']} | {r['Lq']} | {r['Lr']} | {r['keys']} | {r['fwd_ms']:.3f} | "
                     f"{fmt(r['fwd_bwd_ms'], '.3f')} | {r['tflops_fwd']:.1f} | {fmt(r['max_err'], '.1e')} | {static} | "
                     f"{fmt(r.get('static_bwd_gpu_ms'), '.3f')} | {fmt(r.get('static_bwd_unsplit_ms'), '.3f')} | {routing} | "
                     f"{routing_gpu} | {fmt(r.get('front_door_fwd_ms'), '.3f')} | "
                     f"{fmt(r.get('fwd_bwd_same_blocks_ms'), '.3f')} |")
    summary = target_summary(rows)
    if summary:
        lines += ["", "## Against the issue's targets (these rows)", ""] + summary
    if extra.get("training_shapes"):
        lines += ["", "## Training shapes (fused; B, H, G, d, S, Lq, Lr, top_k as in bench/training.py's defaults)", "",
                  "| config | B | H | G | d | S | Lq | Lr | k | fwd ms | fwd+bwd ms | static bwd ms (chunks) | static bwd GPU ms "
                  "| static unsplit ms | routing ms | routing GPU ms | fwd+bwd same blocks ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in extra["training_shapes"]:
            lines.append(f"| {r['config']} | {r['B']} | {r['H']} | {r['G']} | {r['d']} | {r['S']} | {r['Lq']} | {r['Lr']} | "
                         f"{r['top_k']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['static_bwd_ms']:.3f} "
                         f"({r['static_chunks']}) | {fmt(r['static_bwd_gpu_ms'], '.3f')} | {r['static_bwd_unsplit_ms']:.3f} | "
                         f"{r['routing_ms']:.3f} | {fmt(r['routing_gpu_ms'], '.3f')} | {r['fwd_bwd_same_blocks_ms']:.3f} |")
    if extra.get("profile"):
        prof = extra["profile"]
        lines += ["", f"## CUDA time per kernel of one fused fwd+bwd at {prof['shape']} (torch.profiler)", "",
                  "| kernel | ms |", "|---|---|"]
        lines += [f"| {name} | {ms:.3f} |" for name, ms in prof["kernels_ms"].items()]
        lines.append(f"| everything else (torch ops: delta, compaction, inverse index, static sum, casts) | "
                     f"{prof['other_cuda_ms']:.3f} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    write_text(out_dir / f"{stem}.md", "\n".join(lines) + "\n")
    plot(out_dir, device_name, rows, stem)


def plot(out_dir, device_name, rows, stem="sparse_attention"):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    query_lens = sorted({r["Lq"] for r in rows})
    if not query_lens:
        return
    figure, axes = plt.subplots(1, len(query_lens), figsize=(6 * len(query_lens), 4.5), squeeze=False)
    for axis, query_len in zip(axes[0], query_lens):
        series = {}
        for r in rows:
            if r["Lq"] != query_len:
                continue
            label = f"{r['backend']} G={r['G']}" + ("" if r["backend"] == "dense" else f" keys={r['keys']}")
            series.setdefault(label, []).append((r["Lr"], r["fwd_ms"]))
        for label, points in sorted(series.items()):
            points.sort()
            style = {"fused": "-o", "flex": "--s", "dense": ":^"}[label.split()[0]]
            axis.plot([x for x, _ in points], [y for _, y in points], style, label=label, markersize=4)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("reference tokens Lr")
        axis.set_ylabel("forward time (ms)")
        axis.set_title(f"Lq={query_len}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"Sparse reference attention forward, bf16 d=128 H=16 — {device_name}")
    figure.tight_layout()
    temporary = out_dir / f"{stem}.png.tmp.png"
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, out_dir / f"{stem}.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--sweep", action="store_true", help="tune tile configs first (GPU only)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new bench shapes this many seconds after the script started "
                             "(default 450, --quick 170)")
    parser.add_argument("--flex", choices=("subset", "quick", "all", "none"), default=None,
                        help="which grid shapes also run Flex (default subset; --quick: quick)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense SDPA rows")
    parser.add_argument("--quick", action="store_true",
                        help="the whole grid for fused (with static-bwd, routing and front-door times), Flex on "
                             "the 'quick' shapes, no dense rows, a reduced GPU check; files sparse_attention_quick.*")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    stem = "sparse_attention_quick" if args.quick else "sparse_attention"
    global _TARGET_MS
    _TARGET_MS = 80.0 if args.quick else _TARGET_MS
    budget_s = args.budget_s if args.budget_s is not None else (170.0 if args.quick else 450.0)
    flex = args.flex or ("quick" if args.quick else "subset")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.out_dir / f"{stem}.log"
    log_file = log_path.open("a")

    def log(message):
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment (Triton reads it at import)", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        dtype = torch.float32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for a CPU dry run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        dtype = torch.bfloat16
        from torch import _dynamo

        # Every benchmark shape is a new Flex compile; keep them all compiled instead of falling
        # back to eager Flex (which would materialise the full score matrix).
        _dynamo.config.cache_size_limit = 1024
        if hasattr(_dynamo.config, "accumulated_cache_size_limit"):
            _dynamo.config.accumulated_cache_size_limit = 4096
        log(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
            f"triton {__import__('triton').__version__}")
    ok = True
    if args.sweep and not args.smoke:
        sweep(device, dtype, args.out_dir, log)
    if not args.skip_check:
        ok = check(device, args.out_dir, log, smoke=args.smoke, quick=args.quick, stem=stem)
        log(f"check: {'all ok' if ok else 'FAILED'} ({time.time() - _STARTED:.0f} s since start)")
    if not args.skip_bench:
        bench(device, dtype, args.out_dir, log, budget_s, smoke=args.smoke, flex=flex,
              dense=not (args.no_dense or args.quick), stem=stem)
        log(f"bench done ({time.time() - _STARTED:.0f} s since start)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
