"""Triton kernels of the chunked distillation loss (`fitclip_ext.distillation_loss` on CUDA).

Statistics (`stats_kernel`, grid over row blocks): streams the tiles of the student logits
Y = s * A @ B^T and the teacher logits X = t * C @ E^T (two tile products per tile) and keeps per
row, online, the max and sum of exp of both, and the sum of p ((x - mx) - (y - my)) relative to
the running maxima (p = exp(x - mx)); a row's KL is that sum / a - log a + log c, exact 0 when
the two rows agree. Each log-sum-exp is stored as a [2, n] pair: the max of the oriented
products sign(scale) * raw and log2 of the sum of exp2 relative to it; the backward's exponent
|scale| * log2(e) * (raw - max) - log_sum is then exact for a row's dominant entry, even where the
compiler fuses the product into an FMA (see fitclip_ext/distill.py). Run once for the rows and once, with the operands swapped, for the columns:
exact, deterministic (no atomics), 2 * 2 * n * m * (D + Dt) FLOPs.

Backward (`grad_kernel`, grid over output row blocks x output D chunks): recomputes both tiles,
forms G = w_a (q - p) + w_b (q' - p') in registers and accumulates s * G @ B; run once for the
student videos and once for the student captions. The student scale's gradient sum G * (A B^T)
is summed per row in the first pass.

Kernels assume valid inputs (the public op validates). Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (block_config, configured, half_grad_candidates, input_precision, launch, scale_tensor,
                     small_configs, tile_product, triton_op)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def stats_kernel(
    a_ptr, b_ptr, c_ptr, e_ptr, s_scale_ptr, t_scale_ptr, stats_s_ptr, stats_t_ptr, kl_ptr,
    n, m, D, Dt,
    stride_an, stride_ad, stride_bn, stride_bd, stride_cn, stride_cd, stride_en, stride_ed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    # Logits as magnitude * oriented product (sign(scale) * raw: larger is a larger logit), base 2
    # (exp2 is the fast path); maxima of the oriented products, differences taken before scaling.
    ss = tl.load(s_scale_ptr).to(tl.float32)
    ts = tl.load(t_scale_ptr).to(tl.float32)
    s_sign = tl.where(ss < 0, -1.0, 1.0)
    t_sign = tl.where(ts < 0, -1.0, 1.0)
    s_mag = tl.abs(ss) * LOG2E
    t_mag = tl.abs(ts) * LOG2E
    mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    my = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    ax = tl.zeros((BLOCK_M,), tl.float32)
    bx = tl.zeros((BLOCK_M,), tl.float32)
    cy = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: row * stride may pass 2^31
        col_ok = cols < m
        y = tile_product(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_an, stride_ad, stride_bn, stride_bd,
                  BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION) * s_sign
        x = tile_product(c_ptr, e_ptr, rows, cols, row_ok, col_ok, Dt, stride_cn, stride_cd, stride_en, stride_ed,
                  BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION) * t_sign
        x = tl.where(col_ok[None, :], x, float("-inf"))
        y = tl.where(col_ok[None, :], y, float("-inf"))
        nx = tl.maximum(mx, tl.max(x, 1))
        ny = tl.maximum(my, tl.max(y, 1))
        started = mx > float("-inf")  # the first tile has at least one valid column
        fx = tl.where(started, tl.exp2(t_mag * (mx - nx)), 0.0)
        shift = tl.where(started, s_mag * (ny - my) - t_mag * (nx - mx), 0.0)
        bx = fx * (bx + ax * shift)
        ax = fx * ax
        cy = tl.where(started, cy * tl.exp2(s_mag * (my - ny)), 0.0)
        mx = nx
        my = ny
        dx = tl.where(col_ok[None, :], t_mag * (x - mx[:, None]), float("-inf"))
        dy = tl.where(col_ok[None, :], s_mag * (y - my[:, None]), float("-inf"))
        p = tl.exp2(dx)
        ax += tl.sum(p, 1)
        bx += tl.sum(tl.where(col_ok[None, :], p * (dx - dy), 0.0), 1)
        cy += tl.sum(tl.exp2(dy), 1)
    # [2, n] statistics: (max of the oriented products, log2 of the sum of exp2 relative to it)
    tl.store(stats_s_ptr + rows, my, mask=row_ok)
    tl.store(stats_s_ptr + n + rows, tl.log2(cy), mask=row_ok)
    tl.store(stats_t_ptr + rows, mx, mask=row_ok)
    tl.store(stats_t_ptr + n + rows, tl.log2(ax), mask=row_ok)
    tl.store(kl_ptr + rows, (bx / ax - tl.log2(ax) + tl.log2(cy)) * LN2, mask=row_ok)


@triton.jit
def grad_kernel(
    a_ptr, b_ptr, c_ptr, e_ptr, out_ptr, ds_part_ptr, s_scale_ptr, t_scale_ptr,
    a_stats_s_ptr, a_stats_t_ptr, a_w_ptr, b_stats_s_ptr, b_stats_t_ptr, b_w_ptr,
    n_a, n_b, D, Dt,
    stride_an, stride_ad, stride_bn, stride_bd, stride_cn, stride_cd, stride_en, stride_ed,
    stride_on, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    WITH_DS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out[a, dchunk] = s * sum_b G[a, b] B[b, dchunk] with
    G[a, b] = w_a (q_ab - p_ab) + w_b (q'_ab - p'_ab), from the saved (max, log2 sum) pairs."""
    pid_a = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    ra = pid_a * BLOCK_M + tl.arange(0, BLOCK_M)
    a_ok = ra < n_a
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    s_scale = tl.load(s_scale_ptr).to(tl.float32)
    ts = tl.load(t_scale_ptr).to(tl.float32)
    s_sign = tl.where(s_scale < 0, -1.0, 1.0)  # as in stats_kernel
    t_sign = tl.where(ts < 0, -1.0, 1.0)
    s_mag = tl.abs(s_scale) * LOG2E
    t_mag = tl.abs(ts) * LOG2E
    mys = tl.load(a_stats_s_ptr + ra, mask=a_ok, other=0.0)
    lys = tl.load(a_stats_s_ptr + n_a + ra, mask=a_ok, other=0.0)
    mxs = tl.load(a_stats_t_ptr + ra, mask=a_ok, other=0.0)
    lxs = tl.load(a_stats_t_ptr + n_a + ra, mask=a_ok, other=0.0)
    w_a = tl.load(a_w_ptr + ra, mask=a_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, n_b, BLOCK_N):
        rb = c0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: row * stride may pass 2^31
        b_ok = rb < n_b
        s = tile_product(a_ptr, b_ptr, ra, rb, a_ok, b_ok, D, stride_an, stride_ad, stride_bn, stride_bd,
                  BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        x = tile_product(c_ptr, e_ptr, ra, rb, a_ok, b_ok, Dt, stride_cn, stride_cd, stride_en, stride_ed,
                  BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION) * t_sign
        y = s * s_sign
        myb = tl.load(b_stats_s_ptr + rb, mask=b_ok, other=0.0)
        lyb = tl.load(b_stats_s_ptr + n_b + rb, mask=b_ok, other=0.0)
        mxb = tl.load(b_stats_t_ptr + rb, mask=b_ok, other=0.0)
        lxb = tl.load(b_stats_t_ptr + n_b + rb, mask=b_ok, other=0.0)
        w_b = tl.load(b_w_ptr + rb, mask=b_ok, other=0.0)
        g = w_a[:, None] * (tl.exp2(s_mag * (y - mys[:, None]) - lys[:, None])
                            - tl.exp2(t_mag * (x - mxs[:, None]) - lxs[:, None]))
        g += w_b[None, :] * (tl.exp2(s_mag * (y - myb[None, :]) - lyb[None, :])
                             - tl.exp2(t_mag * (x - mxb[None, :]) - lxb[None, :]))
        g = tl.where(a_ok[:, None] & b_ok[None, :], g, 0.0)
        if WITH_DS:
            ds_acc += tl.sum(g * s, 1)
        yb = tl.load(b_ptr + rb[:, None] * stride_bn + do[None, :] * stride_bd,
                     mask=b_ok[:, None] & do_ok[None, :], other=0.0)
        acc = tl.dot(g.to(yb.dtype), yb, acc, input_precision=INPUT_PRECISION)
    if WITH_DS:
        tl.store(ds_part_ptr + ra, ds_acc, mask=a_ok & (pid_d == 0))
    tl.store(out_ptr + ra[:, None] * stride_on + do[None, :] * stride_od, (acc * s_scale).to(out_ptr.dtype.element_ty),
             mask=a_ok[:, None] & do_ok[None, :])


# ----------------------------------------------------------------------------- configurations

def stats_candidates(dtype: torch.dtype, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """The statistics kernel's block configurations, known good first (the default; the others
    are timed only under FITCLIP_TRITON_AUTOTUNE=1). Two [BLOCK_M, BLOCK_N] fp32 tiles live at
    once. All compile without spills on sm_80/sm_90 (`python -m fitclip_ext.kernels.aot`)."""
    if small_configs(small):
        return [block_config(16, 16, 16, 1, 1), block_config(32, 16, 16, 1, 1)]
    if (precision or input_precision(dtype)) == "ieee" and dtype == torch.float32:
        return [block_config(32, 16, 16, 8, 1)]
    if dtype == torch.float32:
        return [block_config(64, 64, 32, 8, 3), block_config(64, 64, 32, 8, 4), block_config(64, 32, 32, 8, 3)]
    return [block_config(128, 64, 64, 8, 3), block_config(128, 64, 64, 8, 4), block_config(64, 64, 64, 4, 3),
            block_config(64, 128, 64, 8, 3)]


def grad_candidates(dtype: torch.dtype, D: int, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """The gradient kernel's block configurations, known good first: the [BLOCK_M, BLOCK_DO]
    accumulator lives in registers and each D chunk recomputes both tiles."""
    if small_configs(small):
        return [block_config(16, 16, 16, 1, 1, BLOCK_DO=32), block_config(32, 16, 16, 1, 1, BLOCK_DO=16)]
    if (precision or input_precision(dtype)) == "ieee" and dtype == torch.float32:
        return [block_config(32, 16, 16, 4, 2, BLOCK_DO=64)]  # (32 columns spill with the (max, log-sum) pairs)
    if dtype == torch.float32:  # tf32: the 256-wide accumulator spills on sm_80
        return [block_config(64, 64, 32, 8, 2, BLOCK_DO=128), block_config(64, 32, 32, 8, 2, BLOCK_DO=128)]
    return half_grad_candidates(D)


# ----------------------------------------------------------------------------- launchers

@triton_op("triton_distill_stats")
def _row_stats(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor, ss: torch.Tensor,
               ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([2, n] (max, log2 sum) of the student rows and of the teacher rows, in base-2 units, and
    the KL per row [n]) of A @ B^T and C @ E^T."""
    n, D = a.shape
    m, Dt = b.shape[0], c.shape[1]
    ss, ts = scale_tensor(ss, a.device), scale_tensor(ts, a.device)
    stats_s, stats_t = (torch.empty(2, n, device=a.device, dtype=torch.float32) for _ in range(2))
    kl = torch.empty(n, device=a.device, dtype=torch.float32)
    prec = input_precision(a.dtype)
    kernel, cfg = configured(stats_kernel, stats_candidates(a.dtype, precision=prec),
                             ["n", "m", "D", "Dt", "INPUT_PRECISION"])
    launch(kernel, lambda c: (triton.cdiv(n, c["BLOCK_M"]),),
           a, b, c, e, ss, ts, stats_s, stats_t, kl, n, m, D, Dt,
           a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), e.stride(0), e.stride(1),
           INPUT_PRECISION=prec, **cfg)
    return stats_s, stats_t, kl


@triton_op("triton_distill_grad")
def _grad_pass(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor, ss: torch.Tensor,
               ts: torch.Tensor, a_stats_s: torch.Tensor, a_stats_t: torch.Tensor, a_w: torch.Tensor,
               b_stats_s: torch.Tensor, b_stats_t: torch.Tensor, b_w: torch.Tensor, with_ds: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s * G @ B in A's dtype, per-row parts of sum G * (A B^T) [n_a] float32)."""
    n_a, D = a.shape
    n_b, Dt = b.shape[0], c.shape[1]
    ss, ts = scale_tensor(ss, a.device), scale_tensor(ts, a.device)
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    ds_part = torch.zeros(n_a, device=a.device, dtype=torch.float32)
    prec = input_precision(a.dtype)
    kernel, cfg = configured(grad_kernel, grad_candidates(a.dtype, D, precision=prec),
                             ["n_a", "n_b", "D", "Dt", "WITH_DS", "INPUT_PRECISION"])
    stat = [x.float().contiguous() for x in (a_stats_s, a_stats_t, a_w, b_stats_s, b_stats_t, b_w)]
    launch(kernel, lambda c: (triton.cdiv(n_a, c["BLOCK_M"]), triton.cdiv(D, c["BLOCK_DO"])),
           a, b, c, e, out, ds_part, ss, ts, *stat, n_a, n_b, D, Dt,
           a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), e.stride(0), e.stride(1),
           out.stride(0), out.stride(1), WITH_DS=with_ds, INPUT_PRECISION=prec, **cfg)
    return out, ds_part
