"""Triton kernels of the chunked InfoNCE loss (`fitclip_ext.contrastive_loss` / `infonce` on CUDA).

L = scale * S, S = Q @ K^T (n x m). The structure, FLOP-optimal (8 * n * m * D matrix FLOPs for
the loss and both feature gradients, the floor) and deterministic:

Forward (`lse_fwd_kernel`, 2 n m D): a program owns BLOCK_M query rows, holds them resident (in
shared memory: loaded once, NUM_K chunks of BLOCK_K features) and streams the key tiles of its
column range. Per row it keeps the online max and sum of exp (per column range) and the positive
logit L[i, i + offset] taken from the same tile product; per column it writes the (max, log-sum)
pair over its BLOCK_M rows to a partial buffer [2, row blocks, m]. The pairs are merged by torch
over a fixed axis (`merge_pairs`, then chunk by chunk): no atomics, no column shift to fix up, no
host synchronisation. Each cross-entropy's lse - positive is formed as (max - positive) + log-sum:
the positive and the max are the same kernel value where the positive dominates and the log-sum
is >= 0 exactly, so the loss is never negative and is as exact near 0 as log_softmax (aligned
pairs at scale 100), and a TF32 loss compares like with like. Column ranges are split over
programs when the row blocks alone would not fill the GPU (each program keeps at least 512
columns, so the resident block is reused).

Backward (row chunks of R rows, `grad_tile_kernel` + cuBLAS, 6 n m D): one kernel recomputes
S_c = Q_c K^T with the same resident structure and writes the logit gradient
G_c = w_row (softmax_rows - (1 - eps) onehot - eps / m) + w_col (softmax_cols - (1 - eps) onehot - eps / n)
in its epilogue, divided by the largest upstream weight (so the entries are O(1) and cannot
underflow when rounded to float16), plus per-row partials of the scale's gradient sum G S; then
cuBLAS computes dQ_c = G_c K (written once per chunk) and dK += G_c^T Q_c, both with float32
accumulation (`kernels.common.chunked_backward`, shared with the distillation). dK accumulates in
float32: in the gradient buffer itself for float32 inputs, in an [m, D] float32 buffer for half
inputs.

Byte counts (what each program loads, a proxy for L2 traffic): BLOCK_M * D once for the
resident rows, BLOCK_N * D per key tile, so a program with t key tiles does
C * BLOCK_M / (BLOCK_M + C) * (2 / itemsize) matrix FLOPs per loaded byte over its C columns:
at least 102 (bf16, BLOCK_M = 128, C >= 512, the fewest a split leaves), up to 128.

Memory (knob FITCLIP_GPU_BLOCK_ELEMS, the elements of one chunk's [R, m] buffer): the forward's
partials [2, R_f / BLOCK_M, m] float32 (at most 2^22 elements, 16 MB, merged in 8 MB slices),
the backward's G_c [R, m] in the inputs' dtype and, for half inputs, the float32 dK accumulator
[m, D] (m D 2 bytes more than the gradient it becomes). By default G is sized so that the
backward stays within 64 MB above inputs and gradients (kernels.common.backward_chunk_elems: 384
rows at B = 32768, D = 512 in bf16, 57 MB in all). A larger chunk means fewer read-modify-writes
of the accumulator (m * D * 8 bytes per chunk).

Kernels assume valid inputs (the public ops validate). Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (arch_of, block_config, chunk_elems, chunk_rows, chunked_backward, column_split, compute_dtype,
                     configured, device_scalars, input_precision, launch, num_sms, resident_rows, resident_tile,
                     scale_tensor, small_configs, triton_op)

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jitted code may only read those
LN2 = 0.6931471805599453


@triton.jit
def lse_fwd_kernel(
    q_ptr, k_ptr, scale_ptr, row_part_ptr, col_part_ptr,
    n, m, D, row0, row_end, offset, cols_per_split, row_field, col_field,
    stride_qn, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
    RESIDENT: tl.constexpr, WITH_COL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
    q0, q1, q2, q3 = resident_rows(q_ptr, rows, row_ok, D, stride_qn, stride_qd, BLOCK_K, NUM_K, RESIDENT)
    m_i = tl.full((BLOCK_M,), float("-inf"), CT)
    l_i = tl.zeros((BLOCK_M,), CT)
    pos = tl.zeros((BLOCK_M,), CT)
    c_begin = pid_p * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, m)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: row * stride may pass 2^31
        col_ok = cols < c_end
        s = resident_tile(q0, q1, q2, q3, q_ptr, k_ptr, rows, cols * stride_kn, row_ok, col_ok, D, stride_qn,
                          stride_qd, stride_kd, BLOCK_M, BLOCK_N, BLOCK_K, NUM_K, RESIDENT, INPUT_PRECISION)
        x = s * scale2  # logits in log2 units
        x_rows = tl.where(col_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x_rows, 1))
        # A row whose max is still -inf has an empty sum; avoid (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x_rows - m_safe[:, None]), 1)
        m_i = m_new
        pos += tl.sum(tl.where(cols[None, :] == rows[:, None] + offset, x, 0.0), 1)
        if WITH_COL:
            x_cols = tl.where(row_ok[:, None], x, float("-inf"))
            c_max = tl.max(x_cols, 0)
            c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp2(x_cols - c_safe[None, :]), 0)
            cbase = col_part_ptr + pid_b * m + cols
            tl.store(cbase, c_safe, mask=col_ok)
            tl.store(cbase + col_field, tl.log2(c_sum), mask=col_ok)
    rbase = row_part_ptr + pid_p * n + rows
    tl.store(rbase, m_i, mask=row_ok)
    tl.store(rbase + row_field, tl.log2(l_i), mask=row_ok)
    tl.store(rbase + 2 * row_field, pos, mask=row_ok)


@triton.jit
def grad_tile_kernel(
    q_ptr, k_ptr, g_ptr, ds_part_ptr, scale_ptr, inv_w_ptr,
    row_lse_ptr, row_w_ptr, col_lse_ptr, col_w_ptr,
    eps_ptr, n, m, D, row0, row_end, offset, cols_per_split,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
    RESIDENT: tl.constexpr, HAS_COL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """G[i - row0, j] / max w for rows i of [row0, row_end) and the program's column range, with
    G[i, j] = w_i (exp(L_ij - lse_i) - (1 - eps) [j = i + offset] - eps_row)
            + HAS_COL * v_j (exp(L_ij - lse'_j) - (1 - eps) [i = j] - eps_col),
    written in g_ptr's dtype; ds_part[p, i] = sum_j (G / max w)_ij S_ij over the range."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    rows = row0 + pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    CT = scale_ptr.dtype.element_ty  # compute dtype: float32 (float64 for float64 inputs)
    scale2 = tl.load(scale_ptr) * LOG2E
    inv_w = tl.load(inv_w_ptr)
    eps_row = tl.load(eps_ptr)  # (in the compute dtype: a float argument would be float32)
    eps_col = tl.load(eps_ptr + 1)
    one_minus_eps = tl.load(eps_ptr + 2)
    lse_r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    w_r = tl.load(row_w_ptr + rows, mask=row_ok, other=0.0) * inv_w
    q0, q1, q2, q3 = resident_rows(q_ptr, rows, row_ok, D, stride_qn, stride_qd, BLOCK_K, NUM_K, RESIDENT)
    ds_acc = tl.zeros((BLOCK_M,), CT)
    c_begin = pid_p * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, m)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < c_end
        s = resident_tile(q0, q1, q2, q3, q_ptr, k_ptr, rows, cols * stride_kn, row_ok, col_ok, D, stride_qn,
                          stride_qd, stride_kd, BLOCK_M, BLOCK_N, BLOCK_K, NUM_K, RESIDENT, INPUT_PRECISION)
        x2 = s * scale2
        diff = cols[None, :] - rows[:, None]
        g = w_r[:, None] * (tl.exp2(x2 - lse_r[:, None]) - one_minus_eps * (diff == offset).to(CT) - eps_row)
        if HAS_COL:
            lse_c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0) * LOG2E
            w_c = tl.load(col_w_ptr + cols, mask=col_ok, other=0.0) * inv_w
            g += w_c[None, :] * (tl.exp2(x2 - lse_c[None, :]) - one_minus_eps * (diff == 0).to(CT) - eps_col)
        ok = row_ok[:, None] & col_ok[None, :]
        g = tl.where(ok, g, 0.0)
        ds_acc += tl.sum(g * s, 1)
        tl.store(g_ptr + (rows - row0)[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)
    tl.store(ds_part_ptr + pid_p * n + rows, ds_acc, mask=row_ok)


# ----------------------------------------------------------------------------- configurations

def candidates(dtype: torch.dtype, D: int, small: bool | None = None, precision: str | None = None,
               arch: int = 90) -> list[dict]:
    """Block configurations of both kernels for compute capability `arch` (80: A100, 90: H100),
    known good first (the default); the others are timed only under FITCLIP_TRITON_AUTOTUNE=1;
    all share BLOCK_M (the launchers size the partial buffers by it). bf16/fp16 with D a
    multiple of 16 keep the query rows resident: NUM_K <= 4 chunks of BLOCK_K = 128 (D <= 512)
    or 256 features, one pipeline stage (the resident block and one key chunk fill the shared
    memory), 128 rows where they fit (D <= 768 on sm_90, 512 on sm_80), else 64 (sm_80 up to
    D = 768); other cases stream both operands. Checked without spills, with HGMMA/HMMA and within shared memory for
    sm_80/sm_90 by `python -m fitclip_ext.kernels.aot`. small (default under the interpreter,
    or FITCLIP_TRITON_CONFIG=small; FITCLIP_TRITON_CONFIG=gpu gives the GPU's configurations
    everywhere) gives the minimum tl.dot tiles."""
    if small_configs(small):
        bk = max(16, triton.next_power_of_2(-(-D // 4)))
        if bk <= 64:
            nk = -(-D // bk)
            return [block_config(16, 16, bk, 1, 1, NUM_K=nk, RESIDENT=True),
                    block_config(16, 32, bk, 1, 1, NUM_K=nk, RESIDENT=True)]
        return [block_config(16, 16, 16, 1, 1, NUM_K=1, RESIDENT=False)]
    if dtype == torch.float64:  # the float64 path (exactness, not speed): CUDA-core DFMA/DMMA
        return [block_config(32, 32, 16, 4, 2, NUM_K=1, RESIDENT=False)]
    if (precision or input_precision(dtype)) == "ieee" and dtype == torch.float32:  # CUDA-core FMA
        return [block_config(32, 64, 32, 8, 2, NUM_K=1, RESIDENT=False)]
    if dtype == torch.float32:  # TF32: resident float32 rows would not fit beside the tiles
        return [block_config(128, 64, 32, 8, 3, NUM_K=1, RESIDENT=False),
                block_config(128, 32, 32, 8, 3, NUM_K=1, RESIDENT=False)]
    if D % 16 == 0 and D <= 768:
        bk = 128 if D <= 512 else 256
        nk = -(-D // bk)
        if D <= (768 if arch >= 90 else 512):
            bn = 64 if bk <= 128 and arch >= 90 else 32
            out = [block_config(128, bn, bk, 8, 1, NUM_K=nk, RESIDENT=True)]
            if bn == 64:
                out.append(block_config(128, 32, bk, 8, 1, NUM_K=nk, RESIDENT=True))
            return out
        return [block_config(64, 32, bk, 8, 1, NUM_K=nk, RESIDENT=True)]
    return [block_config(128, 64, 64, 8, 3, NUM_K=1, RESIDENT=False), block_config(128, 32, 64, 4, 3, NUM_K=1,
                                                                                  RESIDENT=False)]


def grad_candidates(dtype: torch.dtype, D: int, small: bool | None = None, precision: str | None = None,
                    arch: int = 90) -> list[dict]:
    """The backward kernel's: the forward's with half as many columns per tile (its epilogue holds
    the logits, the gradient and the weights at once: no spills at the full width's registers)."""
    cands = candidates(dtype, D, small, precision, arch)
    if small_configs(small) or dtype == torch.float64:
        return cands
    # (IEEE float32: a quarter, 32 x 32 kept an 8-byte stack slot with Triton 3.6 and odd strides)
    div = 4 if dtype == torch.float32 and (precision or input_precision(dtype)) == "ieee" else 2
    return [dict(c, BLOCK_N=max(16, c["BLOCK_N"] // div)) for c in cands]


# ----------------------------------------------------------------------------- launchers
# Each launcher is a torch custom op (kernels/common.py): fitclip_ext::triton_infonce_lse and
# fitclip_ext::triton_infonce_grad.

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


@triton_op("triton_infonce_lse")
def _lse_op(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, with_col: bool, offset: int
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
    kernel, cfg = configured(lse_fwd_kernel, cands, key=_KEY + ["WITH_COL"], site="lse")
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


@triton_op("triton_infonce_grad")
def _grad_op(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor,
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
    kernel, cfg = configured(grad_tile_kernel, cands, key=_KEY + ["HAS_COL"], site="grad")
    bm, bn = cands[0]["BLOCK_M"], cands[0]["BLOCK_N"]  # every candidate has the same BLOCK_M
    row_w = row_weight.to(dtype=ct).contiguous()
    col_w = col_weight.to(dtype=ct).contiguous() if sym else row_w
    eps_t = device_scalars((eps / m, eps / n if sym else 0.0, 1.0 - eps), query)

    def tile(g, ds_part, inv_w, r0, r1, per, split):
        launch(kernel, lambda c: (triton.cdiv(r1 - r0, c["BLOCK_M"]), split),
               query, keys, g, ds_part, s, inv_w, row_lse, row_w, col_lse if sym else row_lse, col_w,
               eps_t, n, m, D, r0, r1, offset, per,
               query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), g.stride(0),
               HAS_COL=sym, INPUT_PRECISION=prec, **cfg)

    return chunked_backward(query, keys, s, (row_w, col_w) if sym else (row_w,), bm, bn, tile)

