"""Triton kernels of the chunked InfoNCE loss (`fitclip_ext.contrastive_loss` / `infonce` on CUDA).

Forward (`lse_fwd_kernel`, grid over row blocks): streams the tiles of S = Q @ K^T once, keeping
per row an online max and sum of exp (the row log-sum-exp) and adding each tile's column sums of
exp(L - c_j) into a per-column fp32 buffer with atomics. The column shift c_j is column j's
positive logit L[j, j], so every column sum holds a term equal to 1 and never underflows; the
tile's column max goes into a second buffer with atomic max, and the few columns whose max lies
so far above their positive that the shifted sum could overflow are recomputed exactly
(`triton_infonce_fix_columns`). 2 * n * m * D FLOPs.

Backward (`grad_kernel`, grid over output row blocks x output D chunks): recomputes each tile,
builds the full logit gradient G in registers (softmax terms, one-hot positives, label smoothing)
and accumulates G @ B for its rows; run once for dQ (A = queries) and once for dK (A = keys).
The scale's gradient sum_ij G_ij S_ij is summed from the tiles of the dQ pass.

Kernels assume valid inputs (the public ops validate). Offsets are int64.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .common import (block_config, configured, half_grad_candidates, input_precision, launch, scale_tensor,
                     small_configs, tile_product, triton_op)

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jitted code may only read those
# Columns whose max logit exceeds their positive logit by more than this are recomputed exactly:
# exp(60) * 2^31 rows stays far below float32's 3.4e38.
_COL_SHIFT_LIMIT = 60.0


@triton.jit
def lse_fwd_kernel(
    q_ptr, k_ptr, scale_ptr, row_lse_ptr, col_shift_ptr, col_sum_ptr, col_max_ptr,
    n, m, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WITH_COL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E  # work in base 2: exp2 is the fast path
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: row * stride may pass 2^31
        col_ok = cols < m
        s = tile_product(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_qn, stride_qd, stride_kn, stride_kd,
                  BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        x = s * scale2  # logits in log2 units
        x_rows = tl.where(col_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x_rows, 1))
        # A row whose max is still -inf has an empty sum; avoid (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x_rows - m_safe[:, None]), 1)
        m_i = m_new
        if WITH_COL:
            shift = tl.load(col_shift_ptr + cols, mask=col_ok, other=0.0) * LOG2E
            x_cols = tl.where(row_ok[:, None], x, float("-inf"))
            tl.atomic_add(col_sum_ptr + cols, tl.sum(tl.exp2(x_cols - shift[None, :]), 0), mask=col_ok)
            tl.atomic_max(col_max_ptr + cols, tl.max(x_cols, 0) / LOG2E, mask=col_ok)
    row_lse = (m_i + tl.log2(l_i)) / LOG2E
    tl.store(row_lse_ptr + rows, row_lse, mask=row_ok)


@triton.jit
def grad_kernel(
    a_ptr, b_ptr, out_ptr, ds_part_ptr, scale_ptr,
    a_lse_ptr, a_w_ptr, b_lse_ptr, b_w_ptr,
    n_a, n_b, D, off_a, off_b, eps_a, eps_b, one_minus_eps,
    stride_an, stride_ad, stride_bn, stride_bd, stride_on, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, WITH_DS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out[a, dchunk] = scale * sum_b G[a, b] * B[b, dchunk], with
    G[a, b] = HAS_A * wA_a * (exp(L_ab - lseA_a) - (1 - eps) [b - a == off_a] - eps_a)
            + HAS_B * wB_b * (exp(L_ab - lseB_b) - (1 - eps) [a - b == off_b] - eps_b)."""
    pid_a = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    ra = pid_a * BLOCK_M + tl.arange(0, BLOCK_M)
    a_ok = ra < n_a
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    scale = tl.load(scale_ptr).to(tl.float32)
    scale2 = scale * LOG2E
    if HAS_A:
        lse_a = tl.load(a_lse_ptr + ra, mask=a_ok, other=0.0) * LOG2E
        w_a = tl.load(a_w_ptr + ra, mask=a_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, n_b, BLOCK_N):
        rb = c0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: row * stride may pass 2^31
        b_ok = rb < n_b
        s = tile_product(a_ptr, b_ptr, ra, rb, a_ok, b_ok, D, stride_an, stride_ad, stride_bn, stride_bd,
                  BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        x2 = s * scale2
        diff = rb[None, :] - ra[:, None]
        g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_A:
            p = tl.exp2(x2 - lse_a[:, None]) - one_minus_eps * (diff == off_a).to(tl.float32) - eps_a
            g += w_a[:, None] * p
        if HAS_B:
            lse_b = tl.load(b_lse_ptr + rb, mask=b_ok, other=0.0) * LOG2E
            w_b = tl.load(b_w_ptr + rb, mask=b_ok, other=0.0)
            p = tl.exp2(x2 - lse_b[None, :]) - one_minus_eps * (-diff == off_b).to(tl.float32) - eps_b
            g += w_b[None, :] * p
        g = tl.where(a_ok[:, None] & b_ok[None, :], g, 0.0)
        if WITH_DS:  # the scale's gradient sum_ab G_ab S_ab, per row (registers already live)
            ds_acc += tl.sum(g * s, 1)
        yb = tl.load(b_ptr + rb[:, None] * stride_bn + do[None, :] * stride_bd,
                     mask=b_ok[:, None] & do_ok[None, :], other=0.0)
        acc = tl.dot(g.to(yb.dtype), yb, acc, input_precision=INPUT_PRECISION)
    if WITH_DS:
        tl.store(ds_part_ptr + ra, ds_acc, mask=a_ok & (pid_d == 0))
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + ra[:, None] * stride_on + do[None, :] * stride_od, out,
             mask=a_ok[:, None] & do_ok[None, :])


# ----------------------------------------------------------------------------- configurations

def fwd_candidates(dtype: torch.dtype, D: int, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """The forward's block configurations, known good first (the default); the others are timed
    only under FITCLIP_TRITON_AUTOTUNE=1. All compile without spills for sm_80 and sm_90
    (`python -m fitclip_ext.kernels.aot`). small (default: under the interpreter, or
    FITCLIP_TRITON_CONFIG=small) gives the minimum tl.dot tiles."""
    if small_configs(small):
        return [block_config(16, 16, 16, 1, 1), block_config(32, 16, 16, 1, 1)]
    if (precision or input_precision(dtype)) == "ieee" and dtype == torch.float32:  # CUDA-core FMA
        return [block_config(32, 64, 16, 4, 2)]
    if dtype == torch.float32:  # TF32
        return [block_config(128, 64, 32, 8, 3), block_config(64, 64, 32, 4, 3)]
    return [block_config(128, 128, 64, 8, 3), block_config(128, 128, 64, 8, 4), block_config(128, 64, 64, 4, 4),
            block_config(128, 64, 64, 8, 3)]


def grad_candidates(dtype: torch.dtype, D: int, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """The backward's block configurations, known good first. The accumulator [BLOCK_M, BLOCK_DO]
    lives in registers and each output D chunk recomputes the tile, so a wider chunk saves tile
    products (at D = 512: 2 * 2 + 2 = 6 units of n*m*D per pass with BLOCK_DO = 256, 4 with 512)
    at the price of smaller tiles (register budget: no spills with Triton 3.6 and 3.8)."""
    if small_configs(small):
        return [block_config(16, 16, 16, 1, 1, BLOCK_DO=32), block_config(32, 16, 16, 1, 1, BLOCK_DO=16)]
    if (precision or input_precision(dtype)) == "ieee" and dtype == torch.float32:  # CUDA-core FMA
        return [block_config(32, 32, 16, 4, 2, BLOCK_DO=64)]
    block_do = 256 if D > 128 else 128
    if dtype == torch.float32:  # TF32
        return [block_config(64, 32, 32, 8, 2, BLOCK_DO=block_do), block_config(64, 64, 32, 8, 2, BLOCK_DO=128)]
    return half_grad_candidates(D)


# ----------------------------------------------------------------------------- launchers
# Each launcher is a torch custom op (kernels/common.py): fitclip_ext::triton_infonce_lse and
# fitclip_ext::triton_infonce_grad; the exact column fix-up is data dependent and stays opaque
# (fitclip_ext::triton_infonce_fix_columns).

@triton_op("triton_infonce_lse")
def _lse_op(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, with_col: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_lse [n], col_lse [m] from the shifted sums, col_max - col_shift [m]) (empty when not
    with_col), float32."""
    n, D = query.shape
    m = keys.shape[0]
    dev = query.device
    s = scale_tensor(scale, dev)
    row_lse = torch.empty(n, device=dev, dtype=torch.float32)
    if with_col:
        col_shift = _positive_logits(query, keys, s)  # c_j = L[j, j] (square: the symmetric loss)
        col_sum = torch.zeros(m, device=dev, dtype=torch.float32)
        col_max = torch.full((m,), float("-inf"), device=dev, dtype=torch.float32)
    else:
        col_shift = col_sum = col_max = row_lse  # unused pointers
    prec = input_precision(query.dtype)
    kernel, cfg = configured(lse_fwd_kernel, fwd_candidates(query.dtype, D, precision=prec),
                             key=["n", "m", "D", "WITH_COL", "INPUT_PRECISION"],
                             restore_value=("col_sum_ptr", "col_max_ptr"))
    launch(kernel, lambda c: (triton.cdiv(n, c["BLOCK_M"]),),
           query, keys, s, row_lse, col_shift, col_sum, col_max, n, m, D,
           query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
           WITH_COL=with_col, INPUT_PRECISION=prec, **cfg)
    if not with_col:
        empty = row_lse.new_empty(0)
        return row_lse, empty, empty.clone()
    return row_lse, col_shift + torch.log(col_sum), col_max - col_shift


@torch.library.custom_op("fitclip_ext::triton_infonce_fix_columns", mutates_args=())
def _fix_columns_op(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, col_lse: torch.Tensor,
                    gap: torch.Tensor) -> torch.Tensor:
    """col_lse with the columns the forward kernel flags recomputed exactly: a non-finite shifted
    sum, or a max more than _COL_SHIFT_LIMIT above the shift (NaN features stay NaN, as in torch)."""
    out = col_lse.clone()
    bad = (~torch.isfinite(col_lse) | (gap > _COL_SHIFT_LIMIT)) & torch.isfinite(gap)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        s = scale_tensor(scale, query.device)
        for c0 in range(0, idx.numel(), 1024):
            cols = idx[c0:c0 + 1024]
            kc = keys[cols].float()
            acc = None
            for r0 in range(0, query.shape[0], 8192):
                part = torch.logsumexp(s * (query[r0:r0 + 8192].float() @ kc.T), dim=0)
                acc = part if acc is None else torch.logaddexp(acc, part)
            out[cols] = acc
    return out


@_fix_columns_op.register_fake
def _(query, keys, scale, col_lse, gap):
    return torch.empty_like(col_lse)


def _positive_logits(query, keys, s):
    """scale * <query_i, keys_i> in float32, chunked so no float32 copy of the inputs is made."""
    out = torch.empty(query.shape[0], device=query.device, dtype=torch.float32)
    for r0 in range(0, query.shape[0], 65536):
        out[r0:r0 + 65536] = (query[r0:r0 + 65536].float() * keys[r0:r0 + 65536].float()).sum(1)
    return out * s


@triton_op("triton_infonce_grad")
def _grad_op(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor,
             row_weight: torch.Tensor, col_lse: torch.Tensor | None, col_weight: torch.Tensor | None,
             offset: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK in the inputs' dtype, per-row parts of d scale [n] float32)."""
    n, D = query.shape
    m = keys.shape[0]
    dev = query.device
    s = scale_tensor(scale, dev)
    sym = col_lse is not None
    prec = input_precision(query.dtype)
    cands = grad_candidates(query.dtype, D, precision=prec)
    key = ["n_a", "n_b", "D", "HAS_A", "HAS_B", "WITH_DS", "INPUT_PRECISION"]
    dq = torch.empty_like(query, memory_format=torch.contiguous_format)
    dk = torch.empty_like(keys, memory_format=torch.contiguous_format)
    ds_part = torch.empty(n, device=dev, dtype=torch.float32)
    row_w = row_weight.float().contiguous()
    col_w = col_weight.float().contiguous() if sym else row_w
    col_l = col_lse if sym else row_lse
    # dQ: A = queries (row stats), B = keys (column stats)
    kernel, cfg = configured(grad_kernel, cands, key, site="dq")
    launch(kernel, lambda c: (triton.cdiv(n, c["BLOCK_M"]), triton.cdiv(D, c["BLOCK_DO"])),
           query, keys, dq, ds_part, s, row_lse, row_w, col_l, col_w,
           n, m, D, offset, 0, eps / m, eps / n if sym else 0.0, 1.0 - eps,
           query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), dq.stride(0), dq.stride(1),
           HAS_A=True, HAS_B=sym, WITH_DS=True, INPUT_PRECISION=prec, **cfg)
    # dK: A = keys (column stats), B = queries (row stats)
    kernel, cfg = configured(grad_kernel, cands, key, site="dk")
    launch(kernel, lambda c: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(D, c["BLOCK_DO"])),
           keys, query, dk, ds_part, s, col_l, col_w, row_lse, row_w,
           m, n, D, 0, offset, eps / n if sym else 0.0, eps / m, 1.0 - eps,
           keys.stride(0), keys.stride(1), query.stride(0), query.stride(1), dk.stride(0), dk.stride(1),
           HAS_A=sym, HAS_B=True, WITH_DS=False, INPUT_PRECISION=prec, **cfg)
    return dq, dk, ds_part
