"""Triton kernels of the chunked InfoNCE loss (`fitclip_ext.contrastive_loss` / `infonce` on CUDA).

L = scale * S, S = Q @ K^T (n x m). The structure, FLOP-optimal (8 * n * m * D matrix FLOPs for
the loss and both feature gradients, the floor) and deterministic:

Forward (`contrastive_lse_kernel`, 2 n m D): a program owns BLOCK_M query rows and streams the key
tiles of its column range; each tile product streams both operands over D in BLOCK_K steps
(kernels.common.stream_tile), the loop Triton pipelines: three stages of asynchronous copies
(cp.async) in flight ahead of the tensor-core product and, on sm_90, one warpgroup MMA group
left in flight (wgmma.wait_group 1), checked in the compiled code by `make aot`. Per row it keeps
the online max and sum of exp (per column range) and the positive logit L[i, i + offset] taken
from the same tile product; per column it writes the (max, log-sum) pair over its BLOCK_M rows to
a partial buffer [2, row blocks, m]. The pairs are merged by torch over a fixed axis
(`merge_pairs`, then chunk by chunk): no atomics, no column shift to fix up, no host
synchronisation. Each cross-entropy's lse - positive is formed as (max - positive) + log-sum: the
positive and the max are the same kernel value where the positive dominates and the log-sum is
>= 0 exactly, so the loss is never negative and is as exact near 0 as log_softmax (aligned pairs
at scale 100), and a TF32 loss compares like with like. Column ranges are split over programs
where the row blocks alone would not fill one wave (kernels.common.column_split: one wave, or a
last wave at least 90% full).

Backward (`contrastive_grad_kernel` + cuBLAS, 6 n m D: kernels.common.chunked_backward, shared with the
distillation): for each slab of 8192 columns and each chunk of rows, the kernel recomputes the
block's products and writes the logit gradient
G = w_row (softmax_rows - (1 - eps) onehot - eps / m) + w_col (softmax_cols - (1 - eps) onehot - eps / n)
in its epilogue, divided by the largest upstream weight (so the entries are O(1) and cannot
underflow when rounded to float16), plus per-row partials of the scale's gradient sum G S; then
cuBLAS adds G K_slab to dQ's rows and G^T Q_c to the slab's dK, both with float32 accumulation.
The slab's dK accumulator (16 MB) stays in L2 and is written to dK once; dQ's float32
accumulator is re-read from HBM once per slab. The kernel is persistent (one program per SM
taking work items q, q + SMs, ...) and stores whole tiles into a padded G (no store mask).

Byte counts (what each program loads, a proxy for L2 traffic): BLOCK_M + BLOCK_N rows of
BLOCK_K features per step for 2 BLOCK_M BLOCK_N BLOCK_K FLOPs: 64 matrix FLOPs per loaded bf16
byte with the forward's 128 x 128 tiles, 42.7 with the gradient's 128 x 64 (128 x 128 spills
there). `python -m fitclip_ext.kernels.model` puts every launch's FLOPs, HBM and L2 bytes and
estimated time in one table.

Memory (FITCLIP_GPU_BLOCK_ELEMS overrides G's elements): the forward's partials [2, R_f /
BLOCK_M, m] float32 (at most 2^22 elements, 16 MB, merged in 8 MB slices); the backward's G
chunk (12 MB), the slab's float32 dK accumulator (16 MB) and, for half inputs, dQ's float32
accumulator (n D 2 bytes above the gradient it becomes): 61 MB at B = 32768, D = 512 in bf16
(kernels.common.backward_extra_bytes).

Kernels assume valid inputs (the public ops validate). Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (arch_of, block_config, chunk_elems, chunk_rows, chunked_backward, column_split, compute_dtype,
                     configured, device_scalars, input_precision, launch, num_sms, persistent_grid, safe_index,
                     scale_tensor, small_configs, store_grad_tile, stream_tile, triton_op, work_item)

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jitted code may only read those
LN2 = 0.6931471805599453


@triton.jit
def contrastive_lse_kernel(
    q_ptr, k_ptr, scale_ptr, row_part_ptr, col_part_ptr,
    n, m, D, row0, row_end, offset, cols_per_split, row_field, col_field,
    stride_qn, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WITH_COL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Program (row block b of rows [row0, row_end), column range p), logits x = scale * S in log2
    units: row_part[0, p, i] = max of row i's x over the range, row_part[1, p, i] = log2 of the sum
    of exp2(x - max) (>= 0: the max's own term is exactly 1), row_part[2, p, i] = x[i, i + offset]
    if that column is in the range (else 0), the same product as the max (field stride
    row_field); with WITH_COL col_part[0, b, j], col_part[1, b, j] the same pair for column j over
    the block's rows (field stride col_field)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    rows = row0 + pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    CT = scale_ptr.dtype.element_ty  # compute dtype: float32 (float64 for float64 inputs)
    scale2 = tl.load(scale_ptr) * LOG2E  # work in base 2: exp2 is the fast path
    q_off = safe_index(rows, row_ok) * stride_qn
    m_i = tl.full((BLOCK_M,), float("-inf"), CT)
    l_i = tl.zeros((BLOCK_M,), CT)
    pos = tl.zeros((BLOCK_M,), CT)
    c_begin = pid_p * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, m)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: row * stride may pass 2^31
        col_ok = cols < c_end
        s = stream_tile(q_ptr, k_ptr, q_off, safe_index(cols, col_ok) * stride_kn, D, stride_qd, stride_kd,
                        BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        x = s * scale2  # logits in log2 units
        ok = row_ok[:, None] & col_ok[None, :]
        xm = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(xm, 1))
        # A row whose max is still -inf has an empty sum; avoid (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(xm - m_safe[:, None]), 1)
        m_i = m_new
        pos += tl.sum(tl.where((cols[None, :] == rows[:, None] + offset) & ok, x, 0.0), 1)
        if WITH_COL:
            c_max = tl.max(xm, 0)
            c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp2(xm - c_safe[None, :]), 0)
            cbase = col_part_ptr + pid_b * m + cols
            tl.store(cbase, c_safe, mask=col_ok)
            tl.store(cbase + col_field, tl.log2(c_sum), mask=col_ok)
    rbase = row_part_ptr + pid_p * n + rows
    tl.store(rbase, m_i, mask=row_ok)
    tl.store(rbase + row_field, tl.log2(l_i), mask=row_ok)
    tl.store(rbase + 2 * row_field, pos, mask=row_ok)


@triton.jit
def _near(d):
    """An int64 tile-difference target as int32, clamped to +-2^20 (a tile difference is at most
    the block sizes: a target out of that range matches nothing either way)."""
    return tl.minimum(tl.maximum(d, -(1 << 20)), 1 << 20).to(tl.int32)


@triton.jit
def contrastive_grad_kernel(
    q_ptr, k_ptr, g_ptr, ds_part_ptr, scale_ptr, inv_w_ptr,
    row_lse_ptr, row_w_ptr, col_lse_ptr, col_w_ptr,
    eps_ptr, n, m, D, row0, row_end, col0, col_end, offset, cols_per_split, splits,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_COL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """G[i - row0, j - col0] / max w (row stride stride_g) for rows i of [row0, row_end) and the
    program's range of the columns [col0, col_end), with
    G[i, j] = w_i (exp(L_ij - lse_i) - (1 - eps) [j = i + offset] - eps_row)
            + HAS_COL * v_j (exp(L_ij - lse'_j) - (1 - eps) [i = j] - eps_col),
    written in g_ptr's dtype; ds_part[p, i] = sum_j (G / max w)_ij S_ij over the range."""
    CT = scale_ptr.dtype.element_ty  # compute dtype: float32 (float64 for float64 inputs)
    scale2 = tl.load(scale_ptr) * LOG2E
    inv_w = tl.load(inv_w_ptr)
    eps_row = tl.load(eps_ptr)  # (in the compute dtype: a float argument would be float32)
    eps_col = tl.load(eps_ptr + 1)
    one_minus_eps = tl.load(eps_ptr + 2)
    # persistent: program q takes the work items (row block, column range) q, q + programs, ...
    for item in range(tl.program_id(0), tl.cdiv(row_end - row0, BLOCK_M) * splits, tl.num_programs(0)):
        pid_b, pid_p, rows, row_ok = work_item(item, splits, row0, row_end, BLOCK_M)
        lse_r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        w_r = tl.load(row_w_ptr + rows, mask=row_ok, other=0.0) * inv_w
        q_off = safe_index(rows, row_ok) * stride_qn
        ds_acc = tl.zeros((BLOCK_M,), CT)
        c_begin = col0 + pid_p * cols_per_split
        c_end = tl.minimum(c_begin + cols_per_split, col_end)
        for c0 in range(c_begin, c_end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = cols < c_end
            s = stream_tile(q_ptr, k_ptr, q_off, safe_index(cols, col_ok) * stride_kn, D, stride_qd, stride_kd,
                            BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
            x2 = s * scale2
            # column - row as an int32 tile difference plus a scalar shift (no int64 tile to keep)
            diff = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None]
            shift = c0 - row0 - pid_b * BLOCK_M
            g = w_r[:, None] * (tl.exp2(x2 - lse_r[:, None]) - one_minus_eps * (diff == _near(offset - shift)).to(CT)
                                - eps_row)
            if HAS_COL:
                lse_c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0) * LOG2E
                w_c = tl.load(col_w_ptr + cols, mask=col_ok, other=0.0) * inv_w
                g += w_c[None, :] * (tl.exp2(x2 - lse_c[None, :]) - one_minus_eps * (diff == _near(-shift)).to(CT)
                                     - eps_col)
            ds_acc += store_grad_tile(g, s, rows, cols, row_ok, col_ok, row0, col0, g_ptr, stride_g)
        tl.store(ds_part_ptr + pid_p * n + rows, ds_acc, mask=row_ok)


# ----------------------------------------------------------------------------- configurations

def candidates(dtype: torch.dtype, D: int, small: bool | None = None, precision: str | None = None,
               arch: int = 90) -> list[dict]:
    """Block configurations of both kernels for compute capability `arch` (80: A100, 90: H100),
    known good first (the default); the others are timed only under FITCLIP_TRITON_AUTOTUNE=1;
    all share BLOCK_M (the launchers size the partial buffers by it). Every configuration streams
    both operands over D in BLOCK_K steps (`stream_tile`) with num_stages asynchronous copies in
    flight: for bf16/fp16, 128 x 128 tiles of 64 features, three stages (96 KB of shared memory,
    64 matrix FLOPs per loaded byte), on sm_90 with a warpgroup MMA group left in flight. Checked
    without spills, pipelined (cp.async, wgmma.wait_group 1), with HGMMA/HMMA and within shared
    memory for sm_80/sm_90 by `python -m fitclip_ext.kernels.aot`. small (default under the
    interpreter, or FITCLIP_TRITON_CONFIG=small; FITCLIP_TRITON_CONFIG=gpu gives the GPU's
    configurations everywhere) gives the minimum tl.dot tiles."""
    if small_configs(small):
        bk = min(64, max(16, triton.next_power_of_2(-(-D // 4))))  # (up to 4 steps: the pipelined loop's shape)
        return [block_config(16, 16, bk, 1, 1), block_config(16, 32, bk, 1, 1)]
    if dtype == torch.float64:  # the float64 path (exactness, not speed): CUDA-core DFMA/DMMA
        return [block_config(32, 32, 16, 4, 2)]
    if (precision or input_precision(dtype)) == "ieee" and dtype == torch.float32:  # CUDA-core FMA
        return [block_config(32, 64, 32, 8, 2)]
    if dtype == torch.float32:  # TF32 (a 32-column variant spills on sm_80)
        return [block_config(128, 64, 32, 8, 3)]
    if arch < 90:  # (128 x 128 spills 8-96 bytes on sm_80 with Triton 3.6)
        return [block_config(128, 64, 64, 8, 3)]
    return [block_config(128, 128, 64, 8, 3), block_config(128, 128, 64, 8, 4), block_config(128, 64, 64, 8, 3)]


def grad_candidates(dtype: torch.dtype, D: int, small: bool | None = None, precision: str | None = None,
                    arch: int = 90) -> list[dict]:
    """The backward kernel's: the forward's with half as many columns per tile (its epilogue holds
    the logits, the gradient and the weights at once: for bf16/fp16, 128 x 64 tiles; 128 x 128
    spill 8-48 bytes on sm_90 whatever the feature step, sitting at 255 registers), a quarter
    for IEEE float32 (32 x 32 kept an 8-byte stack slot with Triton 3.6 and odd strides)."""
    cands = candidates(dtype, D, small, precision, arch)
    if small_configs(small) or dtype == torch.float64:
        return cands
    if arch < 90 and dtype in (torch.bfloat16, torch.float16):
        return cands  # (the sm_80 forward's 128 x 64 already)
    div = 4 if dtype == torch.float32 and (precision or input_precision(dtype)) == "ieee" else 2
    return [dict(c, BLOCK_N=max(16, c["BLOCK_N"] // div)) for c in cands]


# ----------------------------------------------------------------------------- launchers
# Each launcher is a torch custom op (kernels/common.py): fitclip_ext::triton_contrastive_lse and
# fitclip_ext::triton_contrastive_grad.

_KEY = ["n", "m", "D", "INPUT_PRECISION"]


def merge_pairs(mx: torch.Tensor, ls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges (max, log2 sum of exp2 relative to it) pairs along dim 0 into one pair, with
    log2 sum >= 0 kept exactly (the largest max's own term is >= 1)."""
    top = mx.amax(0)
    return top, torch.log2(torch.exp2(mx - top + ls).sum(0))


def lse_plan(n: int, m: int, cfg: dict, sms: int) -> tuple[int, int, int, int]:
    """The forward's launch plan for the block configuration cfg (every candidate has the same
    BLOCK_M): (rows per chunk, row blocks per chunk, columns per program, programs per row block);
    the partials [2, row blocks, m] stay within 2^22 elements."""
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rows_c = chunk_rows(n, m, bm, min(chunk_elems() or (1 << 21), 1 << 21) * bm)
    blocks = -(-rows_c // bm)
    per, split = column_split(m, blocks, bn, sms)
    return rows_c, blocks, per, split


@triton_op("triton_contrastive_lse")
def triton_contrastive_lse(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, with_col: bool, offset: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_lse [n], col_lse [m], row_gap [n], col_gap [m]; the column ones empty when not
    with_col), in the compute dtype (float32; float64 for float64 inputs): gap = lse - positive
    logit (row i's positive at column i + offset, column j's at row j), >= 0 exactly, from the
    same tile products as the log-sum-exps (max minus the positive is exact where the positive is
    the max)."""
    n, D = query.shape
    m = keys.shape[0]
    dev = query.device
    s = scale_tensor(scale, query)
    ct = compute_dtype(query.dtype)
    prec = input_precision(query.dtype)
    cands = candidates(query.dtype, D, precision=prec, arch=arch_of(dev))
    kernel, cfg = configured(contrastive_lse_kernel, cands, key=_KEY + ["WITH_COL"], site="lse")
    rows_c, blocks, per, split = lse_plan(n, m, cands[0], num_sms(dev))
    row_part = torch.empty((3, split, n), device=dev, dtype=ct)
    col_part = torch.empty((2, blocks if with_col else 0, m), device=dev, dtype=ct)
    col = None
    for r0 in range(0, n, rows_c):
        r1 = min(n, r0 + rows_c)
        launch(kernel, lambda c: (triton.cdiv(r1 - r0, c["BLOCK_M"]), split),
               query, keys, s, row_part, col_part if with_col else row_part, n, m, D, r0, r1, offset, per,
               split * n, col_part.shape[1] * m, query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
               WITH_COL=with_col, INPUT_PRECISION=prec, **cfg)
        if with_col:
            used = -(-(r1 - r0) // cands[0]["BLOCK_M"])
            part = merge_pairs(col_part[0, :used], col_part[1, :used])
            col = part if col is None else merge_pairs(*(torch.stack(x) for x in zip(col, part)))
    row_max, row_ls = merge_pairs(row_part[0], row_part[1]) if split > 1 else (row_part[0, 0], row_part[1, 0])
    pos = row_part[2].sum(0) if split > 1 else row_part[2, 0]  # (one range holds the positive)
    row_lse, row_gap = (row_max + row_ls) * LN2, ((row_max - pos) + row_ls) * LN2
    if not with_col:
        return row_lse, row_lse.new_empty((0,)), row_gap, row_lse.new_empty((0,))  # (no aliased outputs)
    # column j's positive is row j's (offset 0: square), the same tile value
    return row_lse, (col[0] + col[1]) * LN2, row_gap, ((col[0] - pos) + col[1]) * LN2


@triton_op("triton_contrastive_grad")
def triton_contrastive_grad(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor,
             row_weight: torch.Tensor, col_lse: torch.Tensor | None, col_weight: torch.Tensor | None,
             offset: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK in the inputs' dtype, d scale [] in the compute dtype): the full gradient of
    sum_i w_i CE_row_i (+ sum_j v_j CE_col_j with col_lse)."""
    n, D = query.shape
    m = keys.shape[0]
    dev = query.device
    ct = compute_dtype(query.dtype)
    s = scale_tensor(scale, query)
    sym = col_lse is not None
    prec = input_precision(query.dtype)
    cands = grad_candidates(query.dtype, D, precision=prec, arch=arch_of(dev))
    kernel, cfg = configured(contrastive_grad_kernel, cands, key=_KEY + ["HAS_COL"], site="grad")
    # (every candidate has the same BLOCK_M; G is padded and split to the widest BLOCK_N: whole tiles)
    bm, bn = cands[0]["BLOCK_M"], max(c["BLOCK_N"] for c in cands)
    row_w = row_weight.to(dtype=ct).contiguous()
    col_w = col_weight.to(dtype=ct).contiguous() if sym else row_w
    eps_t = device_scalars((eps / m, eps / n if sym else 0.0, 1.0 - eps), query)

    def tile(g, ds_part, inv_w, r0, r1, c0, c1, per, split):
        launch(kernel, lambda c: (persistent_grid(triton.cdiv(r1 - r0, c["BLOCK_M"]) * split, dev),),
               query, keys, g, ds_part, s, inv_w, row_lse, row_w, col_lse if sym else row_lse, col_w,
               eps_t, n, m, D, r0, r1, c0, c1, offset, per, split,
               query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), g.stride(0),
               HAS_COL=sym, INPUT_PRECISION=prec, **cfg)

    return chunked_backward(query, keys, s, (row_w, col_w) if sym else (row_w,), bm, bn, tile)

