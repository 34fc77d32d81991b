"""GPU benchmark and GPU correctness check of sparse reference attention backends.

    python bench/sparse_attention.py --out-dir bench/results          # full run on a CUDA GPU
    python bench/sparse_attention.py --smoke --out-dir /tmp/x         # tiny CPU dry run of the script
                                                                     # (TRITON_INTERPRET=1)

Stages (each writes its files as soon as it finishes, so a run cut short keeps what it measured):
  1. sweep     (--sweep) tile configurations of the fused kernels on one shape -> sweep.json
  2. check     fused vs reference.py (fp64) on small odd shapes, fp32/fp16/bf16, forward and all
               gradients -> sparse_attention_check.json
  3. bench     the grid below -> sparse_attention.json / .md / .png

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
from sparse_avatar.sparse_attention.reference import reference_attention  # noqa: E402

HEADS, HEAD_DIM, STATIC_LEN, BLOCK = 16, 128, 64, 128


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def time_ms(fn, device, min_reps=3, target_ms=150.0):
    """Mean time of fn() in ms (CUDA events around a loop; perf_counter on CPU)."""
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
                 head_dim=HEAD_DIM, block=BLOCK, requires_grad=False):
    kv_heads = heads // group
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator).requires_grad_(requires_grad)

    q, k, v = (randn(1, heads, query_len, head_dim) for _ in range(3))
    static_k, static_v = randn(1, kv_heads, static_len, head_dim), randn(1, kv_heads, static_len, head_dim)
    ref_k, ref_v = randn(1, kv_heads, ref_len, head_dim), randn(1, kv_heads, ref_len, head_dim)
    ref_lengths = torch.full((1,), ref_len, dtype=torch.long, device=device)
    block_indices = random_block_indices(1, kv_heads, -(-query_len // block), -(-ref_len // block),
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
    results["chosen"] = {"forward": triton_fused._FORWARD_CONFIG, "dq": triton_fused._DQ_CONFIG,
                         "dkdv": triton_fused._DKDV_CONFIG}
    (out_dir / "sparse_attention_sweep.json").write_text(json.dumps(results, indent=1))
    log(f"sweep chose {results['chosen']}")
    del p, out, grad, inputs
    torch.cuda.empty_cache() if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# 2. check against reference.py
# ---------------------------------------------------------------------------------------------
def check(device, out_dir, log, smoke=False):
    """Fused vs reference.py in fp64, forward and every gradient, on small odd shapes."""
    cases = [
        # (B, H, G, Lq, S, Lr, lengths, top_k, d, block)
        (2, 8, 4, 300, 37, 1000, [1000, 611], 4, 128, 128),
        (1, 4, 1, 200, 0, 517, None, 9, 64, 64),
        (2, 8, 4, 129, 64, 0, None, 2, 128, 128),
        (1, 8, 2, 257, 5, 300, None, 8, 64, 128),
    ]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
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

        exact = run(reference_attention, torch.float64)
        for dtype in dtypes:
            triton_fused.POISON_OUTPUTS_FOR_TESTS = True
            fused = run(triton_fused.fused_sparse_attention, dtype)
            triton_fused.POISON_OUTPUTS_FOR_TESTS = False
            plain = run(reference_attention, dtype)  # same-precision inputs, fp32 accumulation
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
                # with a floor: reference.py accumulates in fp32 and keeps probabilities in fp32,
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
    (out_dir / "sparse_attention_check.json").write_text(json.dumps({"all_ok": all_ok, "rows": report}, indent=1))
    return all_ok


# ---------------------------------------------------------------------------------------------
# 3. bench
# ---------------------------------------------------------------------------------------------
def tflops(heads, head_dim, query_len, keys, static_len, ms):
    return 4 * heads * head_dim * query_len * (keys + static_len + query_len) / (ms * 1e-3) / 1e12


_STARTED = time.time()


def bench(device, dtype, out_dir, log, budget_s, smoke=False):
    groups, query_lens, ref_lens, key_counts = (4, 1), (4096, 16384), (16384, 65536, 262144, 1048576), (2048, 4096)
    heads, head_dim, block, static_len = HEADS, HEAD_DIM, BLOCK, STATIC_LEN
    flex_grid = {(4, 16384, 16384, 4096), (4, 16384, 65536, 4096), (4, 16384, 262144, 4096), (4, 16384, 1048576, 4096),
                 (1, 16384, 65536, 4096), (4, 4096, 65536, 4096), (1, 4096, 65536, 2048), (4, 4096, 262144, 2048)}
    if smoke:
        groups, query_lens, ref_lens, key_counts = (1, 4), (64,), (256, 512), (32,)
        heads, head_dim, block, static_len = 4, 16, 16, 5
        flex_grid = set()
    began = _STARTED
    rows, notes = [], []
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET smoke run)"

    def save():
        write_results(out_dir, device_name, rows, notes)

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
                            grad = torch.randn(1, heads, query_len, head_dim, device=device, dtype=dtype)

                            def forward_backward():
                                o, _ = call(backend, p, block)
                                return torch.autograd.grad(o, inputs, grad)

                            fwd_bwd = time_ms(forward_backward, device)
                        except torch.OutOfMemoryError:
                            notes.append(f"{backend} G={group} Lq={query_len} Lr={ref_len} keys={keys}: out of memory")
                            torch.cuda.empty_cache()
                            continue
                        rows.append(dict(backend=backend, G=group, Lq=query_len, Lr=ref_len, keys=keys,
                                         fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                                         tflops_fwd=tflops(heads, head_dim, query_len, keys, static_len, fwd),
                                         max_err=error))
                        log(f"{backend:5s} G={group} Lq={query_len:6d} Lr={ref_len:8d} keys={keys}: fwd {fwd:8.3f} ms "
                            f"({rows[-1]['tflops_fwd']:6.1f} TFLOP/s) fwd+bwd {fwd_bwd:8.3f} ms err {error:.2e}")
                        save()
                    del p, inputs
                # Dense SDPA over the whole reference: independent of keys; forward only.
                if over_budget or device.type != "cuda":
                    continue
                p = make_problem(group, query_len, ref_len, block, dtype, device, static_len, heads, head_dim, block)
                needed = 2 * 2 * heads * (query_len + static_len + ref_len) * head_dim * p["q"].element_size()
                if needed > 0.6 * torch.cuda.mem_get_info(device)[0]:
                    notes.append(f"dense G={group} Lq={query_len} Lr={ref_len}: skipped, needs {needed / 2**30:.1f} GiB of repeated K/V")
                    del p
                    continue
                try:
                    dense = dense_call(p)
                    fwd = time_ms(dense, device, min_reps=2, target_ms=400.0)
                except torch.OutOfMemoryError:
                    notes.append(f"dense G={group} Lq={query_len} Lr={ref_len}: out of memory")
                    dense = None
                    torch.cuda.empty_cache()
                if dense is not None:
                    rows.append(dict(backend="dense", G=group, Lq=query_len, Lr=ref_len, keys=ref_len, fwd_ms=fwd,
                                     fwd_bwd_ms=None, tflops_fwd=tflops(heads, head_dim, query_len, ref_len, static_len, fwd),
                                     max_err=None))
                    log(f"dense G={group} Lq={query_len:6d} Lr={ref_len:8d}: fwd {fwd:8.3f} ms ({rows[-1]['tflops_fwd']:6.1f} TFLOP/s)")
                    save()
                del p, dense
                torch.cuda.empty_cache()
    save()
    return rows


def write_results(out_dir, device_name, rows, notes):
    payload = {"device": device_name, "dtype": "bfloat16", "H": HEADS, "d": HEAD_DIM, "S": STATIC_LEN, "B": 1,
               "block_size": BLOCK, "config": {"forward": triton_fused._FORWARD_CONFIG, "dq": triton_fused._DQ_CONFIG,
                                               "dkdv": triton_fused._DKDV_CONFIG},
               "rows": rows, "notes": notes}
    write_text(out_dir / "sparse_attention.json", json.dumps(payload, indent=1))
    lines = [f"# Sparse reference attention on {device_name}", "",
             f"bf16, d={HEAD_DIM}, H={HEADS}, S={STATIC_LEN}, B=1, block {BLOCK}. keys = k*block reference keys per "
             "query (dense: the whole reference). tflops_fwd = 4*H*d*Lq*(keys+S+Lq)/time. max_err = max |out - exact "
             "fp32| over two query blocks (dense rows: not measured).", "",
             "| backend | G | Lq | Lr | keys | fwd ms | fwd+bwd ms | TFLOP/s fwd | max err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["G"], r["Lq"], r["keys"], r["Lr"], r["backend"])):
        fwd_bwd = f"{r['fwd_bwd_ms']:.3f}" if r["fwd_bwd_ms"] is not None else "-"
        error = f"{r['max_err']:.1e}" if r["max_err"] is not None else "-"
        lines.append(f"| {r['backend']} | {r['G']} | {r['Lq']} | {r['Lr']} | {r['keys']} | {r['fwd_ms']:.3f} | {fwd_bwd} | "
                     f"{r['tflops_fwd']:.1f} | {error} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    write_text(out_dir / "sparse_attention.md", "\n".join(lines) + "\n")
    plot(out_dir, device_name, rows)


def plot(out_dir, device_name, rows):
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
    temporary = out_dir / "sparse_attention.png.tmp.png"
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, out_dir / "sparse_attention.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--sweep", action="store_true", help="tune tile configs first (GPU only)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="stop starting new bench shapes this many seconds after the script started")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.out_dir / "sparse_attention.log"
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
        ok = check(device, args.out_dir, log, smoke=args.smoke)
    if not args.skip_bench:
        bench(device, dtype, args.out_dir, log, args.budget_s, smoke=args.smoke)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
