"""Fused Triton kernels for sparse reference attention (forward and backward).

One softmax over three key sets, in a single pass per (batch, query head, query tile):
    clip keys (H heads, all Lq)  ∪  static keys (Hkv heads, all S)  ∪  the selected reference
    blocks (Hkv heads, compact int32 ``block_indices [B, Hkv, nQ, K]``, -1 = none; positions at or
    beyond ``ref_lengths[b]`` masked).
The definition of correct is ``naive.py``; this file must agree with it (tests in
``tests/test_sparse_attention_triton.py``, run on CPU under ``TRITON_INTERPRET=1``).

Structure follows the classic flash-attention layout (forward with online softmax in base 2;
backward = delta preprocessing, a dQ kernel that repeats the forward loop, and a dK/dV kernel that
owns its key tile and loops over the queries that attended to it, so no atomics are needed).
The static keys are few (S ~ 64) but seen by all G*Lq queries of their group, so their dK/dV is
split over query chunks instead: a (chunks, B*Hkv*static tiles) grid writes fp32 partials to a
workspace that is summed over chunks afterwards (deterministic, no atomics).
For reference blocks the dK/dV kernel needs "which query blocks selected this block": an inverse
index in CSR form built with sort + searchsorted on the device (no dense nQ x nR mask, no host
sync).

Grid order: programs are numbered with the query head fastest, so the G heads of one GQA group
(which read the same reference blocks) and neighbouring query tiles of one head (which read the
same clip keys) run at the same time and share those tiles through L2.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: the pack runs without it (dispatch falls back to other backends).
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    _HAVE_TRITON = False


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# Tests set this to fill every output with NaN before the kernels run, so an element a kernel
# forgot to write shows up as NaN instead of as a plausible stale value.
POISON_OUTPUTS_FOR_TESTS = False

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_supported(q: torch.Tensor, block_size: int) -> bool:
    """Whether the fused kernels can run these inputs (device, dtype, head dim, block size)."""
    if not _HAVE_TRITON:
        return False
    interpreting = _interpreting()
    if not (q.is_cuda or interpreting):
        return False
    if q.dtype not in _SUPPORTED_DTYPES:
        return False
    head_dims = (16, 32, 64, 128) if interpreting else (64, 128)
    block_sizes = (16, 32, 64, 128) if interpreting else (64, 128)
    return q.shape[-1] in head_dims and block_size in block_sizes


# --------------------------------------------------------------------------------------------
# Tile sizes. BLOCK_M (query rows per program) and BLOCK_N (keys per inner step) must divide the
# routing block size so that a query tile lies inside one routing block and a key tile inside one
# reference block. Tuned on H100 (bf16, d=128); see bench/results/sparse_attention_sweep.json (H100, Lq 16k, Lr 256k, 4096 keys, G=4).
# --------------------------------------------------------------------------------------------
_FORWARD_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
_DQ_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
_DKDV_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
# Static keys: S is small (32-64), so the key tile is cut to S's power of two (a 128-wide tile
# would be half padding at S=64); not yet swept on a GPU.
_DKDV_STATIC_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}

# Static dK/dV split: the number of query chunks is chosen so that about
# _STATIC_PROGRAMS_PER_SM * (number of SMs) programs run, each walking at least
# _STATIC_MIN_TILES_PER_CHUNK query tiles (loading its key tile and storing its partials costs about
# one tile step), with the fp32 workspace [n_chunks, B, Hkv, S, d] x 2 capped at
# _STATIC_WORKSPACE_BYTES. _STATIC_CHUNKS, when set, overrides the choice (tests, bench: 1 = the old
# layout of B*Hkv programs walking all G*Lq queries).
_STATIC_PROGRAMS_PER_SM = 4
_STATIC_MIN_TILES_PER_CHUNK = 4
_STATIC_WORKSPACE_BYTES = 256 << 20
_STATIC_CHUNKS: int | None = None
_DEFAULT_SM_COUNT = 132


# d <= 64 (the `small` config): measured on an H200 at B=4, H=8, G=4, d=64, S=32, Lq=4096,
# Lr=16384, k=8 (bf16), per fwd+bwd: dK/dV 4.54 ms with the d=128 tiles capped to 4 warps (as before)
# vs 0.97 ms with 64x64 tiles; dQ 0.575 ms capped vs 0.446 ms with 8 warps. Swept again on an H200
# at the world trainer's step (B=16, Lr=12288, bench/step_probe.py --sweep, one kernel's tiles
# changed at a time, fwd+bwd 8.43 ms with the settings before): dK/dV's 64x64 kept (best of 22);
# the forward, until then the d=128 tiles capped to 4 warps, 1.89 -> 1.78 ms with 64x64 tiles and
# 4 stages; dQ 8.43 -> 7.88 ms fwd+bwd with 4 warps (bench/results/step_probe_h200.md).
_SMALL_HEAD_CONFIGS = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
    "dq": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
}


def _tile_config(base: dict, block_size: int, head_dim: int, dtype: torch.dtype, small_head: dict | None = None) -> dict:
    """The tiles for one kernel; small_head: the config to use instead for d <= 64 (no warp cap)."""
    use_small = small_head is not None and head_dim <= 64
    config = dict(small_head if use_small else base)
    if dtype == torch.float32:
        # fp32 tiles take twice the shared memory; fp32 is the exactness path, not the fast one.
        config.update(BLOCK_M=min(config["BLOCK_M"], 64), BLOCK_N=min(config["BLOCK_N"], 32), num_warps=4,
                      num_stages=min(config["num_stages"], 2))
    if _interpreting():
        # The interpreter runs tiles as numpy arrays: small tiles keep tests fast and make the
        # multi-tile paths (sub-tiles of a reference block, clip tails) actually run.
        config.update(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    config["BLOCK_M"] = min(config["BLOCK_M"], block_size)
    config["BLOCK_N"] = min(config["BLOCK_N"], block_size)
    if head_dim <= 64 and not use_small and not _interpreting():
        config["num_warps"] = min(config["num_warps"], 4)
    return config


if _HAVE_TRITON:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # fp32 inputs are the "exact" path: no TF32 rounding there.
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _online_softmax_step(acc, l_i, m_i, q, k, v, key_valid, qk_scale_log2,
                             MASKED: tl.constexpr, IEEE: tl.constexpr):
        """Fold one key tile into the running (acc, row sum l_i, row max m_i), base-2 domain."""
        scores = _dot(q, tl.trans(k), IEEE) * qk_scale_log2
        if MASKED:
            scores = tl.where(key_valid[None, :], scores, float("-inf"))
        # m_i is finite after the first clip tile (every query sees >= 1 clip key), so a fully
        # masked later tile gives p = 0 and alpha = 1, never NaN.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return acc, l_i, m_new

    @triton.jit
    def _fwd_kernel(
        Q, K, V, SK, SV, RK, RV, REF_LEN, BLOCK_IDX, SEL_COUNT, FULL_COUNT, OUT, LSE,
        stride_qb, stride_qh, stride_ql,
        stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl,
        stride_skb, stride_skh, stride_skl,
        stride_svb, stride_svh, stride_svl,
        stride_rkb, stride_rkh, stride_rkl,
        stride_rvb, stride_rvh, stride_rvl,
        stride_ob, stride_oh, stride_ol,
        H, HKV, Lq, S, NUM_Q_TILES, NQ_ROUTE, K_SEL,
        qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROUTE_BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = pid % H
        m_tile = (pid // H) % NUM_Q_TILES
        b = pid // (H * NUM_Q_TILES)
        hkv = h // (H // HKV)
        b64 = b.to(tl.int64)

        offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_valid = offs_m < Lq

        q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # 1) clip keys: full tiles unmasked, then the tail tile masked.
        k_base = K + b64 * stride_kb + h * stride_kh
        v_base = V + b64 * stride_vb + h * stride_vh
        clip_full = (Lq // BLOCK_N) * BLOCK_N
        for n_start in range(0, clip_full, BLOCK_N):
            cols = n_start + offs_n
            k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :])
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, cols < Lq, qk_scale_log2,
                                                 False, IEEE)
        for n_start in tl.range(clip_full, Lq, BLOCK_N, num_stages=1):
            cols = n_start + offs_n
            key_valid = cols < Lq
            k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, key_valid, qk_scale_log2,
                                                 True, IEEE)

        # 2) static keys (few: always masked).
        sk_base = SK + b64 * stride_skb + hkv * stride_skh
        sv_base = SV + b64 * stride_svb + hkv * stride_svh
        for n_start in tl.range(0, S, BLOCK_N, num_stages=1):
            cols = n_start + offs_n
            key_valid = cols < S
            k = tl.load(sk_base + cols[:, None] * stride_skl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            v = tl.load(sv_base + cols[:, None] * stride_svl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, key_valid, qk_scale_log2,
                                                 True, IEEE)

        # 3) selected reference blocks, compacted by the wrapper: ascending, duplicates and -1
        # removed; the first FULL_COUNT lie wholly inside ref_lengths[b] (no mask needed), the
        # rest (at most one) straddle or pass the end.
        route_row = (b64 * HKV + hkv) * NQ_ROUTE + (m_tile * BLOCK_M) // ROUTE_BLOCK
        num_selected = tl.load(SEL_COUNT + route_row)
        num_full = tl.load(FULL_COUNT + route_row)
        ref_len = tl.load(REF_LEN + b)
        rk_base = RK + b64 * stride_rkb + hkv * stride_rkh
        rv_base = RV + b64 * stride_rvb + hkv * stride_rvh
        for j in range(0, num_full):
            block = tl.load(BLOCK_IDX + route_row * K_SEL + j).to(tl.int64)
            for sub in tl.static_range(0, ROUTE_BLOCK, BLOCK_N):
                cols = block * ROUTE_BLOCK + sub + offs_n
                k = tl.load(rk_base + cols[:, None] * stride_rkl + offs_d[None, :])
                v = tl.load(rv_base + cols[:, None] * stride_rvl + offs_d[None, :])
                acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, cols < ref_len,
                                                     qk_scale_log2, False, IEEE)
        for j in tl.range(num_full, num_selected, num_stages=1):
            block = tl.load(BLOCK_IDX + route_row * K_SEL + j).to(tl.int64)
            for sub in tl.static_range(0, ROUTE_BLOCK, BLOCK_N):
                cols = block * ROUTE_BLOCK + sub + offs_n
                key_valid = cols < ref_len
                k = tl.load(rk_base + cols[:, None] * stride_rkl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
                v = tl.load(rv_base + cols[:, None] * stride_rvl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
                acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, key_valid,
                                                     qk_scale_log2, True, IEEE)

        acc = acc / l_i[:, None]
        o_ptrs = OUT + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=row_valid[:, None])
        # LSE is contiguous [B, H, Lq], natural log.
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + (b64 * H + h) * Lq + offs_m, lse, mask=row_valid)

    @triton.jit
    def _dq_step(dq, q, do, lse_log2, delta, k, v, key_valid, qk_scale_log2,
                 MASKED: tl.constexpr, IEEE: tl.constexpr):
        scores = _dot(q, tl.trans(k), IEEE) * qk_scale_log2
        p = tl.math.exp2(scores - lse_log2[:, None])
        if MASKED:
            p = tl.where(key_valid[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
        return dq

    @triton.jit
    def _dq_kernel(
        Q, K, V, SK, SV, RK, RV, REF_LEN, BLOCK_IDX, SEL_COUNT, FULL_COUNT, DO, LSE, DELTA, DQ,
        stride_qb, stride_qh, stride_ql,
        stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl,
        stride_skb, stride_skh, stride_skl,
        stride_svb, stride_svh, stride_svl,
        stride_rkb, stride_rkh, stride_rkl,
        stride_rvb, stride_rvh, stride_rvl,
        stride_dob, stride_doh, stride_dol,
        stride_dqb, stride_dqh, stride_dql,
        H, HKV, Lq, S, NUM_Q_TILES, NQ_ROUTE, K_SEL,
        sm_scale, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROUTE_BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = pid % H
        m_tile = (pid // H) % NUM_Q_TILES
        b = pid // (H * NUM_Q_TILES)
        hkv = h // (H // HKV)
        b64 = b.to(tl.int64)

        offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_valid = offs_m < Lq

        q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                    mask=row_valid[:, None], other=0.0)
        do = tl.load(DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :],
                     mask=row_valid[:, None], other=0.0)
        row_offset = (b64 * H + h) * Lq + offs_m
        lse_log2 = tl.load(LSE + row_offset, mask=row_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_offset, mask=row_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        k_base = K + b64 * stride_kb + h * stride_kh
        v_base = V + b64 * stride_vb + h * stride_vh
        clip_full = (Lq // BLOCK_N) * BLOCK_N
        for n_start in range(0, clip_full, BLOCK_N):
            cols = n_start + offs_n
            k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :])
            dq = _dq_step(dq, q, do, lse_log2, delta, k, v, cols < Lq, qk_scale_log2, False, IEEE)
        for n_start in tl.range(clip_full, Lq, BLOCK_N, num_stages=1):
            cols = n_start + offs_n
            key_valid = cols < Lq
            k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            dq = _dq_step(dq, q, do, lse_log2, delta, k, v, key_valid, qk_scale_log2, True, IEEE)

        sk_base = SK + b64 * stride_skb + hkv * stride_skh
        sv_base = SV + b64 * stride_svb + hkv * stride_svh
        for n_start in tl.range(0, S, BLOCK_N, num_stages=1):
            cols = n_start + offs_n
            key_valid = cols < S
            k = tl.load(sk_base + cols[:, None] * stride_skl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            v = tl.load(sv_base + cols[:, None] * stride_svl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            dq = _dq_step(dq, q, do, lse_log2, delta, k, v, key_valid, qk_scale_log2, True, IEEE)

        route_row = (b64 * HKV + hkv) * NQ_ROUTE + (m_tile * BLOCK_M) // ROUTE_BLOCK
        num_selected = tl.load(SEL_COUNT + route_row)
        num_full = tl.load(FULL_COUNT + route_row)
        ref_len = tl.load(REF_LEN + b)
        rk_base = RK + b64 * stride_rkb + hkv * stride_rkh
        rv_base = RV + b64 * stride_rvb + hkv * stride_rvh
        for j in range(0, num_full):
            block = tl.load(BLOCK_IDX + route_row * K_SEL + j).to(tl.int64)
            for sub in tl.static_range(0, ROUTE_BLOCK, BLOCK_N):
                cols = block * ROUTE_BLOCK + sub + offs_n
                k = tl.load(rk_base + cols[:, None] * stride_rkl + offs_d[None, :])
                v = tl.load(rv_base + cols[:, None] * stride_rvl + offs_d[None, :])
                dq = _dq_step(dq, q, do, lse_log2, delta, k, v, cols < ref_len, qk_scale_log2, False, IEEE)
        for j in tl.range(num_full, num_selected, num_stages=1):
            block = tl.load(BLOCK_IDX + route_row * K_SEL + j).to(tl.int64)
            for sub in tl.static_range(0, ROUTE_BLOCK, BLOCK_N):
                cols = block * ROUTE_BLOCK + sub + offs_n
                key_valid = cols < ref_len
                k = tl.load(rk_base + cols[:, None] * stride_rkl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
                v = tl.load(rv_base + cols[:, None] * stride_rvl + offs_d[None, :], mask=key_valid[:, None], other=0.0)
                dq = _dq_step(dq, q, do, lse_log2, delta, k, v, key_valid, qk_scale_log2, True, IEEE)

        dq = dq * sm_scale
        tl.store(DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_valid[:, None])

    @triton.jit
    def _dkdv_step(dk, dv, k, v, key_valid, Q, DO, LSE, DELTA, q_base, do_base, row_base,
                   stride_ql, stride_dol, m_start, Lq, qk_scale_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
        """Add one query tile's contribution to this key tile's dK, dV (transposed layout)."""
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_valid = offs_m < Lq
        q = tl.load(Q + q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_valid[:, None], other=0.0)
        do = tl.load(DO + do_base + offs_m[:, None] * stride_dol + offs_d[None, :], mask=row_valid[:, None], other=0.0)
        # Rows past Lq get lse = +inf, so their probabilities are exactly 0.
        lse_log2 = tl.load(LSE + row_base + offs_m, mask=row_valid, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=row_valid, other=0.0)
        scores_t = _dot(k, tl.trans(q), IEEE) * qk_scale_log2
        # Mask before exp2: padding keys may hold garbage whose exp would overflow.
        scores_t = tl.where(key_valid[:, None], scores_t, float("-inf"))
        p_t = tl.math.exp2(scores_t - lse_log2[None, :])
        dv += _dot(p_t.to(do.dtype), do, IEEE)
        dp_t = _dot(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, IEEE)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(
        Q, KEY, VAL, REF_LEN, CSR_OFFSETS, CSR_QUERY_BLOCKS, DO, LSE, DELTA, DKEY, DVAL,
        stride_qb, stride_qh, stride_ql,
        stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl,
        stride_dob, stride_doh, stride_dol,
        stride_dkb, stride_dkh, stride_dkl,
        stride_dvb, stride_dvh, stride_dvl,
        H, KV_HEADS, Lq, L_KEYS, NUM_K_TILES, NUM_ROUTE_BLOCKS,
        sm_scale, qk_scale_log2,
        KIND: tl.constexpr,  # 0 = clip (H heads), 2 = reference (Hkv); static keys: _dkdv_static_kernel
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROUTE_BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kv_head = pid % KV_HEADS
        n_tile = (pid // KV_HEADS) % NUM_K_TILES
        b = pid // (KV_HEADS * NUM_K_TILES)
        b64 = b.to(tl.int64)
        group = H // KV_HEADS

        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        in_tensor = offs_n < L_KEYS
        if KIND == 2:
            key_valid = offs_n < tl.load(REF_LEN + b)
        else:
            key_valid = in_tensor
        k = tl.load(KEY + b64 * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                    mask=in_tensor[:, None], other=0.0)
        v = tl.load(VAL + b64 * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                    mask=in_tensor[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        if KIND == 0:
            # Clip keys belong to one query head and are seen by all of its queries.
            q_base = b64 * stride_qb + kv_head * stride_qh
            do_base = b64 * stride_dob + kv_head * stride_doh
            row_base = (b64 * H + kv_head) * Lq
            for m_start in range(0, Lq, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, key_valid, Q, DO, LSE, DELTA, q_base, do_base, row_base,
                                    stride_ql, stride_dol, m_start, Lq, qk_scale_log2,
                                    HEAD_DIM, BLOCK_M, IEEE)
        else:
            # Reference keys: only the query blocks that selected this block (inverse index).
            route_block = (n_tile * BLOCK_N) // ROUTE_BLOCK
            csr_row = (b64 * KV_HEADS + kv_head) * NUM_ROUTE_BLOCKS + route_block
            start = tl.load(CSR_OFFSETS + csr_row)
            end = tl.load(CSR_OFFSETS + csr_row + 1)
            for e in range(start, end):
                query_block = tl.load(CSR_QUERY_BLOCKS + e)
                for g in range(0, group):
                    h = kv_head * group + g
                    q_base = b64 * stride_qb + h * stride_qh
                    do_base = b64 * stride_dob + h * stride_doh
                    row_base = (b64 * H + h) * Lq
                    for sub in tl.static_range(0, ROUTE_BLOCK, BLOCK_M):
                        dk, dv = _dkdv_step(dk, dv, k, v, key_valid, Q, DO, LSE, DELTA, q_base, do_base,
                                            row_base, stride_ql, stride_dol, query_block * ROUTE_BLOCK + sub,
                                            Lq, qk_scale_log2, HEAD_DIM, BLOCK_M, IEEE)

        dk = dk * sm_scale
        tl.store(DKEY + b64 * stride_dkb + kv_head * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :],
                 dk.to(DKEY.dtype.element_ty), mask=in_tensor[:, None])
        tl.store(DVAL + b64 * stride_dvb + kv_head * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :],
                 dv.to(DVAL.dtype.element_ty), mask=in_tensor[:, None])

    @triton.jit
    def _compact_kernel(IDX, REF_LEN, OUT, SEL_COUNT, FULL_COUNT, ROWS_PER_BATCH, K,
                        ROUTE_BLOCK: tl.constexpr, K_POW2: tl.constexpr):
        """One (b, hkv, query block) row of block ids: keep the ids >= 0 whose block starts inside
        ref_lengths[b], drop repeats, write them ascending (then -1), count them and the ones that
        lie wholly inside. Quadratic in K (K <= a few dozen): no sort needed."""
        row = tl.program_id(0).to(tl.int64)
        ref_len = tl.load(REF_LEN + row // ROWS_PER_BATCH)
        offs = tl.arange(0, K_POW2)
        in_row = offs < K
        ids = tl.load(IDX + row * K + offs, mask=in_row, other=-1)
        valid = in_row & (ids >= 0) & (ids.to(tl.int64) * ROUTE_BLOCK < ref_len)
        earlier_copy = (ids[:, None] == ids[None, :]) & valid[None, :] & (offs[None, :] < offs[:, None])
        keep = valid & (tl.sum(earlier_copy.to(tl.int32), 1) == 0)
        position = tl.sum((keep[None, :] & (ids[None, :] < ids[:, None])).to(tl.int32), 1)
        count = tl.sum(keep.to(tl.int32), 0)
        full = keep & ((ids.to(tl.int64) + 1) * ROUTE_BLOCK <= ref_len)
        tl.store(OUT + row * K + position, ids, mask=keep)
        tl.store(OUT + row * K + offs, tl.full([K_POW2], -1, tl.int32), mask=in_row & (offs >= count))
        tl.store(SEL_COUNT + row, count)
        tl.store(FULL_COUNT + row, tl.sum(full.to(tl.int32), 0))

    @triton.jit
    def _dkdv_static_kernel(
        Q, SK, SV, DO, LSE, DELTA, DK_PART, DV_PART,
        stride_qb, stride_qh, stride_ql,
        stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl,
        stride_dob, stride_doh, stride_dol,
        BATCH, H, KV_HEADS, Lq, S, NUM_K_TILES, NUM_M_TILES, TILES_PER_CHUNK,
        sm_scale, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Partial dK, dV of one static key tile over one chunk of its G·Lq queries.

        Grid (n_chunks, B·Hkv·NUM_K_TILES). The G·NUM_M_TILES query tiles of a kv group (head g
        major, tile minor) are cut into chunks of TILES_PER_CHUNK; program (c, .) sums chunk c's
        contribution in fp32 and stores it, already scaled, at DK_PART/DV_PART [n_chunks, B, Hkv,
        S, d] (contiguous fp32). The host sums over chunks: no atomics, deterministic.
        """
        chunk = tl.program_id(0)
        pid = tl.program_id(1)
        kv_head = pid % KV_HEADS
        n_tile = (pid // KV_HEADS) % NUM_K_TILES
        b = pid // (KV_HEADS * NUM_K_TILES)
        b64 = b.to(tl.int64)
        group = H // KV_HEADS

        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        key_valid = offs_n < S
        k = tl.load(SK + b64 * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                    mask=key_valid[:, None], other=0.0)
        v = tl.load(SV + b64 * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                    mask=key_valid[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        tile_start = chunk * TILES_PER_CHUNK
        tile_end = tl.minimum(tile_start + TILES_PER_CHUNK, group * NUM_M_TILES)
        for tile in range(tile_start, tile_end):
            g = tile // NUM_M_TILES
            h = kv_head * group + g
            m_start = (tile - g * NUM_M_TILES) * BLOCK_M
            dk, dv = _dkdv_step(dk, dv, k, v, key_valid, Q, DO, LSE, DELTA,
                                b64 * stride_qb + h * stride_qh, b64 * stride_dob + h * stride_doh,
                                (b64 * H + h) * Lq, stride_ql, stride_dol, m_start, Lq, qk_scale_log2,
                                HEAD_DIM, BLOCK_M, IEEE)

        part_rows = ((chunk.to(tl.int64) * BATCH + b64) * KV_HEADS + kv_head) * S + offs_n
        part_offsets = part_rows[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DK_PART + part_offsets, dk * sm_scale, mask=key_valid[:, None])
        tl.store(DV_PART + part_offsets, dv, mask=key_valid[:, None])


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def _new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS_FOR_TESTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# The compaction kernel compares every pair of a row's K ids (K_POW2^2 values per program): fine
# for routed rows (top_k + forced, a few dozen); wider caller-given rows use the torch version.
_COMPACT_KERNEL_MAX_K = 64


def _compact_block_indices_torch(block_indices, ref_lengths, num_ref_blocks, block_size):
    """_compact_block_indices in torch ops (sort, mark repeats, sort again): for rows wider than
    _COMPACT_KERNEL_MAX_K."""
    batch = block_indices.shape[0]
    ids = block_indices.long()
    sentinel = num_ref_blocks  # sorts after every real block id
    starts_valid = (ids >= 0) & (ids * block_size < ref_lengths.view(batch, 1, 1, 1))
    ids = torch.where(starts_valid, ids, torch.full_like(ids, sentinel))
    ids, _ = torch.sort(ids, dim=-1)
    duplicate = torch.zeros_like(starts_valid)
    duplicate[..., 1:] = ids[..., 1:] == ids[..., :-1]
    ids = torch.where(duplicate, torch.full_like(ids, sentinel), ids)
    ids, _ = torch.sort(ids, dim=-1)
    valid = ids < sentinel
    full = valid & ((ids + 1) * block_size <= ref_lengths.view(batch, 1, 1, 1))
    compact = torch.where(valid, ids, torch.full_like(ids, -1)).to(torch.int32).contiguous()
    return compact, valid.sum(-1, dtype=torch.int32).contiguous(), full.sum(-1, dtype=torch.int32).contiguous()


def _compact_block_indices(block_indices, ref_lengths, num_ref_blocks, block_size):
    """Sort each query block's selection ascending, drop -1 and duplicates, count them.

    Returns (indices int32 [B,Hkv,nQ,K] with the valid ids first, selected_count int32
    [B,Hkv,nQ], full_count int32 [B,Hkv,nQ]) where the first full_count ids are blocks lying
    wholly inside ref_lengths[b]. Ids of blocks that start at or beyond ref_lengths[b] are dropped
    (they hold no valid key; with ref_lengths <= Lr that includes ids >= nR). One kernel (this
    runs on every forward: the torch version was ~25 small ops, 0.5 ms of host time per call on an
    H200 host), on the device, no host sync.
    """
    batch, kv_heads, num_query_blocks, k_sel = block_indices.shape
    if k_sel > _COMPACT_KERNEL_MAX_K:
        return _compact_block_indices_torch(block_indices, ref_lengths, num_ref_blocks, block_size)
    ids = block_indices.to(torch.int32).contiguous()
    compact = torch.empty_like(ids)
    selected_count = torch.empty(ids.shape[:3], dtype=torch.int32, device=ids.device)
    full_count = torch.empty_like(selected_count)
    rows = batch * kv_heads * num_query_blocks
    if rows:
        _compact_kernel[(rows,)](
            ids, ref_lengths, compact, selected_count, full_count, kv_heads * num_query_blocks, k_sel,
            ROUTE_BLOCK=block_size, K_POW2=max(2, triton.next_power_of_2(k_sel)), num_warps=1,
        )
    return compact, selected_count, full_count


def _inverse_block_index(compact_indices, selected_count, num_ref_blocks):
    """CSR of (b, hkv, ref block) -> query blocks that selected it, built with sort + searchsorted.

    Returns (offsets int64 [B*Hkv*nR + 1], query_blocks int32 [B*Hkv*nQ*K]); the query blocks of
    row r are query_blocks[offsets[r]:offsets[r+1]] in ascending order.
    """
    batch, kv_heads, num_query_blocks, k_sel = compact_indices.shape
    device = compact_indices.device
    num_rows = batch * kv_heads * num_ref_blocks
    ids = compact_indices.long()
    row_of_head = torch.arange(batch * kv_heads, device=device).view(batch, kv_heads, 1, 1) * num_ref_blocks
    csr_row = torch.where(ids >= 0, row_of_head + ids, torch.full_like(ids, num_rows))
    query_block = torch.arange(num_query_blocks, device=device).view(1, 1, num_query_blocks, 1)
    composite = (csr_row * num_query_blocks + query_block).flatten()
    composite, _ = torch.sort(composite)
    sorted_rows = composite // num_query_blocks
    offsets = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=device))
    query_blocks = (composite % num_query_blocks).to(torch.int32)
    return offsets.contiguous(), query_blocks.contiguous()


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _static_tile_config(static_len: int, head_dim: int, dtype: torch.dtype) -> dict:
    # The routing block does not constrain the static branch; 128 only caps the tiles.
    config = _tile_config(_DKDV_STATIC_CONFIG, 128, head_dim, dtype)
    config["BLOCK_N"] = max(16, min(config["BLOCK_N"], triton.next_power_of_2(max(static_len, 1))))
    return config


def static_query_chunks(batch: int, kv_heads: int, num_k_tiles: int, num_query_tiles: int,
                        static_len: int, head_dim: int, device: torch.device) -> tuple[int, int]:
    """(n_chunks, query tiles per chunk) for the static dK/dV split; num_query_tiles = G * ceil(Lq / BLOCK_M).

    Every chunk gets at least one tile (n_chunks is recomputed from the rounded-up chunk length).
    """
    if num_query_tiles <= 0:
        return 1, 0
    if _STATIC_CHUNKS is not None:
        chunks = int(_STATIC_CHUNKS)
    else:
        programs_per_chunk = max(1, batch * kv_heads * num_k_tiles)
        chunks = -(-_STATIC_PROGRAMS_PER_SM * _sm_count(device) // programs_per_chunk)
        chunks = min(chunks, -(-num_query_tiles // _STATIC_MIN_TILES_PER_CHUNK))
        bytes_per_chunk = 2 * 4 * batch * kv_heads * static_len * head_dim
        chunks = min(chunks, max(1, _STATIC_WORKSPACE_BYTES // max(1, bytes_per_chunk)))
    chunks = max(1, min(chunks, num_query_tiles))
    tiles_per_chunk = -(-num_query_tiles // chunks)
    return -(-num_query_tiles // tiles_per_chunk), tiles_per_chunk


def static_dkdv(q, static_k, static_v, grad_out, lse, delta, scale):
    """dK, dV of the static keys ([B, Hkv, S, d] in static_k's dtype), split over query chunks.

    lse [B, H, Lq] (natural log) and delta [B, H, Lq] fp32 contiguous, as the backward computes
    them. Exposed for the benchmark, which times this branch on its own.
    """
    batch, heads, lq, head_dim = q.shape
    kv_heads, static_len = static_k.shape[1], static_k.shape[2]
    config = _static_tile_config(static_len, head_dim, q.dtype)
    num_k_tiles = -(-static_len // config["BLOCK_N"])
    num_m_tiles = -(-lq // config["BLOCK_M"])
    group = heads // kv_heads
    chunks, tiles_per_chunk = static_query_chunks(batch, kv_heads, num_k_tiles, group * num_m_tiles,
                                                  static_len, head_dim, q.device)
    # Every element of the workspace is written by exactly one program (chunks are never empty).
    parts = torch.empty((2, chunks, batch, kv_heads, static_len, head_dim), dtype=torch.float32, device=q.device)
    _dkdv_static_kernel[(chunks, batch * kv_heads * num_k_tiles)](
        q, static_k, static_v, grad_out, lse, delta, parts[0], parts[1],
        *_strides(q), *_strides(static_k), *_strides(static_v), *_strides(grad_out),
        batch, heads, kv_heads, lq, static_len, num_k_tiles, num_m_tiles, tiles_per_chunk,
        scale, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], IEEE=q.dtype == torch.float32,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    summed = parts[:, 0] if chunks == 1 else parts.sum(1)
    return summed[0].to(static_k.dtype), summed[1].to(static_v.dtype)


class _FusedSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices, block_size, scale):
        batch, heads, lq, head_dim = q.shape
        kv_heads = static_k.shape[1]
        static_len = static_k.shape[2]
        ref_len_max = ref_k.shape[2]
        num_ref_blocks = -(-ref_len_max // block_size)
        num_route_q = -(-lq // block_size)
        compact, selected_count, full_count = _compact_block_indices(
            block_indices, ref_lengths, num_ref_blocks, block_size)
        k_sel = compact.shape[-1]

        out = _new_output(q.shape, q.dtype, q.device)
        lse = _new_output((batch, heads, lq), torch.float32, q.device)
        config = _tile_config(_FORWARD_CONFIG, block_size, head_dim, q.dtype, _SMALL_HEAD_CONFIGS["fwd"])
        num_q_tiles = -(-lq // config["BLOCK_M"])
        grid = (batch * heads * num_q_tiles,)
        if lq > 0:
            _fwd_kernel[grid](
                q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, compact, selected_count,
                full_count, out, lse,
                *_strides(q), *_strides(k), *_strides(v), *_strides(static_k), *_strides(static_v),
                *_strides(ref_k), *_strides(ref_v), *_strides(out),
                heads, kv_heads, lq, static_len, num_q_tiles, num_route_q, k_sel,
                scale * _LOG2E,
                HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                ROUTE_BLOCK=block_size, IEEE=q.dtype == torch.float32,
                num_warps=config["num_warps"], num_stages=config["num_stages"],
            )
        ctx.save_for_backward(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, compact,
                              selected_count, full_count, out, lse)
        ctx.block_size = block_size
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        (q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, compact, selected_count, full_count,
         out, lse) = ctx.saved_tensors
        block_size, scale = ctx.block_size, ctx.scale
        batch, heads, lq, head_dim = q.shape
        kv_heads = static_k.shape[1]
        static_len = static_k.shape[2]
        ref_len_max = ref_k.shape[2]
        num_ref_blocks = -(-ref_len_max // block_size)
        num_route_q = -(-lq // block_size)
        k_sel = compact.shape[-1]
        ieee = q.dtype == torch.float32

        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = _last_dim_contiguous(grad_out)
        # delta_i = sum_j P_ij dP_ij = rowsum(dO * O); a gradient on lse enters as -dlse, since
        # d lse_i / d s_ij = P_ij.
        delta = (grad_out.float() * out.float()).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.float()
        delta = delta.contiguous()

        dq = _new_output(q.shape, q.dtype, q.device)
        dk = _new_output(k.shape, k.dtype, k.device)
        dv = _new_output(v.shape, v.dtype, v.device)
        dsk = _new_output(static_k.shape, static_k.dtype, static_k.device)
        dsv = _new_output(static_v.shape, static_v.dtype, static_v.device)
        drk = _new_output(ref_k.shape, ref_k.dtype, ref_k.device)
        drv = _new_output(ref_v.shape, ref_v.dtype, ref_v.device)
        if lq == 0:
            return (dq, dk, dv, dsk.zero_(), dsv.zero_(), drk.zero_(), drv.zero_(),
                    None, None, None, None)

        config = _tile_config(_DQ_CONFIG, block_size, head_dim, q.dtype, _SMALL_HEAD_CONFIGS["dq"])
        num_q_tiles = -(-lq // config["BLOCK_M"])
        _dq_kernel[(batch * heads * num_q_tiles,)](
            q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, compact, selected_count, full_count,
            grad_out, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(static_k), *_strides(static_v),
            *_strides(ref_k), *_strides(ref_v), *_strides(grad_out), *_strides(dq),
            heads, kv_heads, lq, static_len, num_q_tiles, num_route_q, k_sel,
            scale, scale * _LOG2E,
            HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            ROUTE_BLOCK=block_size, IEEE=ieee,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )

        config = _tile_config(_DKDV_CONFIG, block_size, head_dim, q.dtype, _SMALL_HEAD_CONFIGS["dkdv"])
        csr_offsets, csr_query_blocks = _inverse_block_index(compact, selected_count, num_ref_blocks)
        if static_len > 0:
            dsk, dsv = static_dkdv(q, static_k, static_v, grad_out, lse, delta, scale)
        for kind, key, val, dkey, dval, kv_count, length in (
            (0, k, v, dk, dv, heads, lq),
            (2, ref_k, ref_v, drk, drv, kv_heads, ref_len_max),
        ):
            num_k_tiles = -(-length // config["BLOCK_N"])
            if num_k_tiles == 0:
                continue
            _dkdv_kernel[(batch * kv_count * num_k_tiles,)](
                q, key, val, ref_lengths, csr_offsets, csr_query_blocks, grad_out, lse, delta, dkey, dval,
                *_strides(q), *_strides(key), *_strides(val), *_strides(grad_out),
                *_strides(dkey), *_strides(dval),
                heads, kv_count, lq, length, num_k_tiles, num_ref_blocks,
                scale, scale * _LOG2E,
                KIND=kind, HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                ROUTE_BLOCK=block_size, IEEE=ieee,
                num_warps=config["num_warps"], num_stages=config["num_stages"],
            )
        return dq, dk, dv, dsk, dsv, drk, drv, None, None, None, None


def fused_sparse_attention(q, k, v, static_k, static_v, ref_k, ref_v, ref_lengths, block_indices,
                           block_size, scale):
    """Sparse reference attention in fused Triton kernels; returns (out [B,H,Lq,d], lse [B,H,Lq] fp32).

    Shapes as in the package contract (sparse_attention/__init__.py); static_* and ref_* may be
    None, ref_lengths None means all Lr valid, block_indices int [B,Hkv,nQ,K] with -1 = none (may
    be None only when there is no reference). Differentiable in q, k, v, static_*, ref_* (and
    through lse). Check ``is_supported(q, block_size)`` first.
    """
    # Internal checks only (cheap, no host sync): the front door has validated the inputs.
    assert _HAVE_TRITON, "the fused backend needs Triton (dispatch checks is_supported first)"
    assert q.dim() == 4, f"q must be [B, H, Lq, d]; got shape {tuple(q.shape)}"
    batch, heads, lq, head_dim = q.shape
    assert k.shape == q.shape and v.shape == q.shape, f"clip k and v must match q {tuple(q.shape)}; got {tuple(k.shape)} and {tuple(v.shape)}"
    for name, tensor in (("static_k", static_k), ("static_v", static_v), ("ref_k", ref_k), ("ref_v", ref_v)):
        assert tensor is None or tensor.dtype == q.dtype, f"{name} has dtype {tensor.dtype} but q has {q.dtype}"
    if ref_k is not None:
        kv_heads = ref_k.shape[1]
    elif static_k is not None:
        kv_heads = static_k.shape[1]
    elif block_indices is not None and block_indices.dim() == 4:
        kv_heads = block_indices.shape[1]
    else:
        kv_heads = heads
    assert kv_heads > 0 and heads % kv_heads == 0, f"{heads} query heads cannot be grouped onto {kv_heads} key/value heads"

    def empty_kv():
        return q.new_zeros((batch, kv_heads, 0, head_dim))

    if static_k is None or static_v is None:
        assert (static_k is None) == (static_v is None), "pass both static_k and static_v, or neither"
        static_k_in, static_v_in = empty_kv(), empty_kv()
    else:
        static_k_in, static_v_in = static_k, static_v
    if ref_k is None or ref_v is None:
        assert (ref_k is None) == (ref_v is None), "pass both ref_k and ref_v, or neither"
        ref_k_in, ref_v_in = empty_kv(), empty_kv()
    else:
        ref_k_in, ref_v_in = ref_k, ref_v
    for name, tensor in (("static_k", static_k_in), ("static_v", static_v_in), ("ref_k", ref_k_in), ("ref_v", ref_v_in)):
        assert tensor.dim() == 4 and tensor.shape[0] == batch and tensor.shape[1] == kv_heads and tensor.shape[3] == head_dim, (
            f"{name} must be [B={batch}, Hkv={kv_heads}, L, d={head_dim}]; got {tuple(tensor.shape)}")
    assert static_k_in.shape == static_v_in.shape and ref_k_in.shape == ref_v_in.shape, "k/v shapes of a branch differ"

    ref_len_max = ref_k_in.shape[2]
    num_route_q = -(-lq // block_size)
    if ref_lengths is None:
        ref_lengths = torch.full((batch,), ref_len_max, dtype=torch.int32, device=q.device)
    else:
        ref_lengths = ref_lengths.to(device=q.device, dtype=torch.int32).clamp(0, ref_len_max).contiguous()
    if ref_len_max == 0 or block_indices is None:
        assert ref_len_max == 0, "block_indices are required with a reference (route_reference_blocks)"
        block_indices = torch.full((batch, kv_heads, num_route_q, 1), -1, dtype=torch.int32, device=q.device)
    assert block_indices.dim() == 4 and block_indices.shape[0] == batch and block_indices.shape[2] == num_route_q, (
        f"block_indices must be [B={batch}, Hkv={kv_heads}, nQ={num_route_q}, K]; got {tuple(block_indices.shape)}")
    block_indices = block_indices.to(q.device).expand(batch, kv_heads, num_route_q, block_indices.shape[3])
    if block_indices.shape[3] == 0:
        block_indices = torch.full((batch, kv_heads, num_route_q, 1), -1, dtype=torch.int32, device=q.device)
    # Ids outside [0, nR) or starting at/after ref_lengths[b] hold no valid key: the compaction in
    # forward drops them (checking here would cost a host sync on every call).
    if scale is None:
        scale = head_dim ** -0.5
    tensors = [_last_dim_contiguous(t) for t in (q, k, v, static_k_in, static_v_in, ref_k_in, ref_v_in)]
    out, lse = _FusedSparseAttention.apply(*tensors, ref_lengths, block_indices, int(block_size), float(scale))
    return out, lse
