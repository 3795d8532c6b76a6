"""Triton kernels of the chunked distillation loss (`fitclip_ext.distillation_loss` on CUDA).

Student logits Y = s * A @ B^T (A [n, D] videos, B [m, D] captions), teacher logits
X = t * C @ E^T (Dt features). The structure mirrors kernels/contrastive.py: FLOP-optimal,
deterministic, no host synchronisation. Matrix FLOPs of forward and backward together:

    forward  2 n m (D + Dt)   both tile products, once
    backward 2 n m (D + Dt)   both again, in row chunks, for the logit gradient G
             4 n m D          cuBLAS dA = s G B and dB = s G^T A
    total    8 n m D + 4 n m Dt   (12 n m D for Dt = D): the floor for a loss that keeps no
                                   n x m matrix (the forward cannot know G before it has seen
                                   every row and column; the backward needs G for both GEMMs)

Forward (`distill_fwd_kernel`, grid row blocks x column ranges): per tile both products; per row,
online, the max and sum of exp of both and the sum of p ((x - mx) - (y - my)) relative to the
running maxima (p = exp(x - mx)): a row's KL is that sum / a - log a + log c, exactly 0 when the
two rows agree. The same five numbers per column over the block's rows go to a partial buffer
[5, row blocks, m]; torch merges partials (`merge`: the online update over a fixed axis) for the
columns and for split rows. No atomics. Each log-sum-exp is kept as a pair: the max of the oriented
products sign(scale) * raw and log2 of the sum of exp2 relative to it; the backward's exponent
|scale| * log2(e) * (raw - max) - log_sum is then exact for a row's dominant entry, even where the
compiler fuses the product into an FMA (see fitclip_ext/distill.py).

Backward (`distill_grad_kernel`, row chunks): recomputes both tiles, forms
G = w_a (q - p) + w_b (q' - p') / max w (O(1) entries: nothing underflows in fp16) in its epilogue
and writes it in the inputs' dtype, with per-row partials of the student scale's gradient
sum G * (A B^T); cuBLAS then computes dA_c = G_c B and dB += G_c^T A_c with float32 accumulation.

Memory (FITCLIP_GPU_BLOCK_ELEMS, as for InfoNCE): the column partials (at most 2^23 floats), the
G chunk [R, m] in the inputs' dtype and, for half inputs, a float32 [m, D] accumulator.

Kernels assume valid inputs (the public op validates). Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (block_config, chunk_elems, chunk_rows, chunked_backward, column_split, compute_dtype, configured,
                     input_precision, launch, num_sms, persistent_grid, scale_tensor, small_configs, store_grad_tile,
                     tile_product, triton_op, work_item)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = 0.6931471805599453


@triton.jit
def _signs_and_mags(s_scale_ptr, t_scale_ptr):
    """Logits as magnitude * oriented product (sign(scale) * raw: larger is a larger logit), base
    2 (exp2 is the fast path)."""
    ss = tl.load(s_scale_ptr)  # (the compute dtype: float32, float64 for float64 inputs)
    ts = tl.load(t_scale_ptr)
    return (tl.where(ss < 0, -1.0, 1.0), tl.where(ts < 0, -1.0, 1.0), tl.abs(ss) * LOG2E, tl.abs(ts) * LOG2E)


@triton.jit
def distill_fwd_kernel(
    a_ptr, b_ptr, c_ptr, e_ptr, s_scale_ptr, t_scale_ptr, row_part_ptr, col_part_ptr,
    n, m, D, Dt, row0, row_end, cols_per_split, row_field, col_field,
    stride_an, stride_ad, stride_bn, stride_bd, stride_cn, stride_cd, stride_en, stride_ed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (row block b of rows [row0, row_end), column range p): the five partial statistics
    (max x, sum exp2 dx, sum exp2(dx) (dx - dy), max y, sum exp2 dy; x, y oriented products, dx,
    dy scaled base-2 differences to the maxima) of each row over the range to
    row_part[f, p, i] (field stride row_field) and of each column over the block's rows to
    col_part[f, b, j] (field stride col_field)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    rows = row0 + pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    s_sign, t_sign, s_mag, t_mag = _signs_and_mags(s_scale_ptr, t_scale_ptr)
    CT = s_scale_ptr.dtype.element_ty  # compute dtype
    mx = tl.full((BLOCK_M,), float("-inf"), CT)
    my = tl.full((BLOCK_M,), float("-inf"), CT)
    ax = tl.zeros((BLOCK_M,), CT)
    bx = tl.zeros((BLOCK_M,), CT)
    cy = tl.zeros((BLOCK_M,), CT)
    c_begin = pid_p * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, m)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: row * stride may pass 2^31
        col_ok = cols < c_end
        y = tile_product(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_an, stride_ad, stride_bn, stride_bd,
                         BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION) * s_sign
        x = tile_product(c_ptr, e_ptr, rows, cols, row_ok, col_ok, Dt, stride_cn, stride_cd, stride_en, stride_ed,
                         BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION) * t_sign
        # columns over the block's rows (every block has at least one row)
        xc = tl.where(row_ok[:, None], x, float("-inf"))
        yc = tl.where(row_ok[:, None], y, float("-inf"))
        cmx = tl.max(xc, 0)
        cmy = tl.max(yc, 0)
        dxc = tl.where(row_ok[:, None], t_mag * (x - cmx[None, :]), float("-inf"))
        dyc = tl.where(row_ok[:, None], s_mag * (y - cmy[None, :]), float("-inf"))
        pc = tl.exp2(dxc)
        cbase = col_part_ptr + pid_b * m + cols
        tl.store(cbase, cmx, mask=col_ok)
        tl.store(cbase + col_field, tl.sum(pc, 0), mask=col_ok)
        tl.store(cbase + 2 * col_field, tl.sum(tl.where(row_ok[:, None], pc * (dxc - dyc), 0.0), 0), mask=col_ok)
        tl.store(cbase + 3 * col_field, cmy, mask=col_ok)
        tl.store(cbase + 4 * col_field, tl.sum(tl.exp2(dyc), 0), mask=col_ok)
        # rows, online over the range's tiles
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
    rbase = row_part_ptr + pid_p * n + rows
    tl.store(rbase, mx, mask=row_ok)
    tl.store(rbase + row_field, ax, mask=row_ok)
    tl.store(rbase + 2 * row_field, bx, mask=row_ok)
    tl.store(rbase + 3 * row_field, my, mask=row_ok)
    tl.store(rbase + 4 * row_field, cy, mask=row_ok)


@triton.jit
def distill_grad_kernel(
    a_ptr, b_ptr, c_ptr, e_ptr, g_ptr, ds_part_ptr, s_scale_ptr, t_scale_ptr, inv_w_ptr,
    row_s_ptr, row_t_ptr, row_w_ptr, col_s_ptr, col_t_ptr, col_w_ptr,
    n, m, D, Dt, row0, row_end, col0, col_end, cols_per_split, splits,
    stride_an, stride_ad, stride_bn, stride_bd, stride_cn, stride_cd, stride_en, stride_ed, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """G[i - row0, j - col0] / max w (row stride stride_g) for rows i of [row0, row_end) and the
    program's range of the columns [col0, col_end), with
    G[i, j] = w_i (q_ij - p_ij) + v_j (q'_ij - p'_ij) from the saved (max, log2 sum) pairs,
    written in g_ptr's dtype; ds_part[p, i] = sum_j (G / max w)_ij (A B^T)_ij over the range."""
    s_sign, t_sign, s_mag, t_mag = _signs_and_mags(s_scale_ptr, t_scale_ptr)
    inv_w = tl.load(inv_w_ptr)
    # persistent: program q takes the work items (row block, column range) q, q + programs, ...
    for item in range(tl.program_id(0), tl.cdiv(row_end - row0, BLOCK_M) * splits, tl.num_programs(0)):
        pid_b, pid_p, rows, row_ok = work_item(item, splits, row0, row_end, BLOCK_M)
        mys = tl.load(row_s_ptr + rows, mask=row_ok, other=0.0)
        lys = tl.load(row_s_ptr + n + rows, mask=row_ok, other=0.0)
        mxs = tl.load(row_t_ptr + rows, mask=row_ok, other=0.0)
        lxs = tl.load(row_t_ptr + n + rows, mask=row_ok, other=0.0)
        w_a = tl.load(row_w_ptr + rows, mask=row_ok, other=0.0) * inv_w
        ds_acc = tl.zeros((BLOCK_M,), s_scale_ptr.dtype.element_ty)
        c_begin = col0 + pid_p * cols_per_split
        c_end = tl.minimum(c_begin + cols_per_split, col_end)
        for c0 in range(c_begin, c_end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = cols < c_end
            s = tile_product(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_an, stride_ad, stride_bn, stride_bd,
                             BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
            x = tile_product(c_ptr, e_ptr, rows, cols, row_ok, col_ok, Dt, stride_cn, stride_cd, stride_en, stride_ed,
                             BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION) * t_sign
            y = s * s_sign
            myb = tl.load(col_s_ptr + cols, mask=col_ok, other=0.0)
            lyb = tl.load(col_s_ptr + m + cols, mask=col_ok, other=0.0)
            mxb = tl.load(col_t_ptr + cols, mask=col_ok, other=0.0)
            lxb = tl.load(col_t_ptr + m + cols, mask=col_ok, other=0.0)
            w_b = tl.load(col_w_ptr + cols, mask=col_ok, other=0.0) * inv_w
            g = w_a[:, None] * (tl.exp2(s_mag * (y - mys[:, None]) - lys[:, None])
                                - tl.exp2(t_mag * (x - mxs[:, None]) - lxs[:, None]))
            g += w_b[None, :] * (tl.exp2(s_mag * (y - myb[None, :]) - lyb[None, :])
                                 - tl.exp2(t_mag * (x - mxb[None, :]) - lxb[None, :]))
            ds_acc += store_grad_tile(g, s, rows, cols, row_ok, col_ok, row0, col0, g_ptr, stride_g)
        tl.store(ds_part_ptr + pid_p * n + rows, ds_acc, mask=row_ok)


# ----------------------------------------------------------------------------- configurations

def stats_candidates(dtype: torch.dtype, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """The forward kernel's block configurations, known good first (the default; the others are
    timed only under FITCLIP_TRITON_AUTOTUNE=1), one BLOCK_M per list (the launcher sizes the
    partial buffers by it). Two [BLOCK_M, BLOCK_N] fp32 tiles and the row and column statistics
    live at once: half tiles of 128 x 32. All compile without spills on sm_80/sm_90
    (`python -m fitclip_ext.kernels.aot`)."""
    if small_configs(small):
        return [block_config(16, 16, 16, 1, 1), block_config(16, 32, 16, 1, 1)]
    if dtype == torch.float64:  # the float64 path (exactness, not speed; two stages spill on sm_80)
        return [block_config(32, 16, 16, 4, 1)]
    if (precision or input_precision(dtype)) == "ieee" and dtype == torch.float32:  # (3 stages spill with Triton 3.6)
        return [block_config(32, 16, 16, 4, 2)]
    # (TF32: two pipeline stages; three kept an 8-byte stack slot with Triton 3.6 on sm_80, or
    # with odd strides on sm_90)
    if dtype == torch.float32:
        return [block_config(64, 64, 32, 8, 2), block_config(64, 32, 32, 8, 2)]
    # (128 x 64 would load 42.7 FLOPs per byte instead of 25.6, but spills 16-104 bytes with Triton 3.6, the GPU
    # machine's, on sm_80 and sm_90)
    return [block_config(128, 32, 64, 8, 3), block_config(128, 32, 64, 8, 4), block_config(128, 32, 32, 8, 3)]


def grad_candidates(dtype: torch.dtype, D: int, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """The gradient tile kernel's (its epilogue holds both products, the gradient and four
    statistics per row and per column): the forward's; IEEE float32 (CUDA-core FMAs, no tensor
    cores to feed) 16 x 16 with one pipeline stage (32 rows, or two stages, keep an 8-byte stack
    slot in the persistent loop with Triton 3.6 or 3.8)."""
    if not small_configs(small) and (precision or input_precision(dtype)) == "ieee" and dtype == torch.float32:
        return [block_config(16, 16, 16, 4, 1)]
    return stats_candidates(dtype, small, precision)


# ----------------------------------------------------------------------------- launchers

def merge(mx, a, b, my, c, t_mag, s_mag):
    """Merges partial statistics along dim 0 (the kernels' online update over a fixed axis):
    (mx, a, b, my, c) with maxima shifted to the largest; exact (shift 0) where student and
    teacher agree."""
    MX, MY = mx.amax(0), my.amax(0)
    f = torch.exp2(t_mag * (mx - MX))
    shift = s_mag * (MY - my) - t_mag * (MX - mx)
    return MX, (f * a).sum(0), (f * (b + a * shift)).sum(0), MY, (torch.exp2(s_mag * (my - MY)) * c).sum(0)


def _finish(mx, a, b, my, c):
    """([2, k] student (max, log2 sum), [2, k] teacher's, KL [k] in nats) from merged statistics."""
    la, lc = torch.log2(a), torch.log2(c)
    return torch.stack([my, lc]), torch.stack([mx, la]), (b / a - la + lc) * LN2


_KEY = ["n", "m", "D", "Dt", "INPUT_PRECISION"]


@triton_op("triton_distill_stats")
def triton_distill_stats(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor, ss: torch.Tensor,
              ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """(row student stats [2, n], row teacher stats [2, n], row KL [n], and the same three for the
    columns [2, m], [2, m], [m]) of Y = s A B^T and X = t C E^T, one pass over the tiles; stats
    are (max of the oriented products, log2 of the sum of exp2 relative to it), base-2 units."""
    n, D = a.shape
    m, Dt = b.shape[0], c.shape[1]
    dev = a.device
    ct = compute_dtype(a.dtype)
    ss, ts = scale_tensor(ss, a), scale_tensor(ts, a)
    s_mag, t_mag = ss.abs() * LOG2E.value, ts.abs() * LOG2E.value
    prec = input_precision(a.dtype)
    cands = stats_candidates(a.dtype, precision=prec)
    kernel, cfg = configured(distill_fwd_kernel, cands, key=_KEY, site="stats")
    bm, bn = cands[0]["BLOCK_M"], cands[0]["BLOCK_N"]
    part_elems = min(chunk_elems() or (1 << 23), 1 << 23)  # column partials <= 2^23 floats
    rows_c = chunk_rows(n, m, bm, part_elems // 5 * bm)
    blocks = -(-rows_c // bm)
    per, split = column_split(m, blocks, bn, num_sms(dev))
    row_part = torch.empty((5, split, n), device=dev, dtype=ct)
    col_part = torch.empty((5, blocks, m), device=dev, dtype=ct)
    cols = None
    for r0 in range(0, n, rows_c):
        r1 = min(n, r0 + rows_c)
        launch(kernel, lambda cf: (triton.cdiv(r1 - r0, cf["BLOCK_M"]), split),
               a, b, c, e, ss, ts, row_part, col_part, n, m, D, Dt, r0, r1, per, split * n, blocks * m,
               a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), e.stride(0), e.stride(1),
               INPUT_PRECISION=prec, **cfg)
        part = merge(*col_part[:, :-(-(r1 - r0) // bm)], t_mag, s_mag)
        cols = part if cols is None else merge(*(torch.stack([x, y]) for x, y in zip(cols, part)), t_mag, s_mag)
    rows = merge(*row_part, t_mag, s_mag) if split > 1 else tuple(row_part[:, 0])
    return (*_finish(*rows), *_finish(*cols))


@triton_op("triton_distill_grad")
def triton_distill_grad(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor, ss: torch.Tensor,
             ts: torch.Tensor, row_s: torch.Tensor, row_t: torch.Tensor, row_w: torch.Tensor, col_s: torch.Tensor,
             col_t: torch.Tensor, col_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dA, dB in the inputs' dtypes, d s [] in the compute dtype): the gradient of
    sum_i w_i KL_row_i + sum_j v_j KL_col_j with respect to the student's features and scale."""
    n, D = a.shape
    m, Dt = b.shape[0], c.shape[1]
    ct = compute_dtype(a.dtype)
    ss, ts = scale_tensor(ss, a), scale_tensor(ts, a)
    prec = input_precision(a.dtype)
    cands = grad_candidates(a.dtype, D, precision=prec)
    kernel, cfg = configured(distill_grad_kernel, cands, key=_KEY, site="grad")
    # (every candidate has the same BLOCK_M; G is padded and split to the widest BLOCK_N: whole tiles)
    bm, bn = cands[0]["BLOCK_M"], max(c["BLOCK_N"] for c in cands)
    stat = [x.to(ct).contiguous() for x in (row_s, row_t, row_w, col_s, col_t, col_w)]

    def tile(g, ds_part, inv_w, r0, r1, c0, c1, per, split):
        launch(kernel, lambda cf: (persistent_grid(triton.cdiv(r1 - r0, cf["BLOCK_M"]) * split, a.device),),
               a, b, c, e, g, ds_part, ss, ts, inv_w, *stat, n, m, D, Dt, r0, r1, c0, c1, per, split,
               a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), e.stride(0), e.stride(1),
               g.stride(0), INPUT_PRECISION=prec, **cfg)

    return chunked_backward(a, b, ss, (stat[2], stat[5]), bm, bn, tile)
