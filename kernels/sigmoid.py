"""The SigLIP loss on CUDA (`fitclip_ext.sigmoid_loss`): the products by cuBLAS, the pairwise
sigmoid terms by one fused Triton pass over each product's output (what siglip-kernel found on
Hopper: a cuBLAS GEMM and one fused elementwise pass beat a Triton GEMM with the epilogue fused).

The loss needs no normalisation over a row, so every block of pairs is finished in one pass.
For each slab of columns [c0, c1) (8192 at D = 512) and each chunk of rows [r0, r1) (512):

    S = Q[r0:r1] @ K[c0:c1]^T                         GEMM, float32 output    2 * R * C * D FLOPs
    loss, G = sigmoid(L) - P, sum G S, sum G           `sigmoid_rows_kernel`   elementwise + row sums
    dQ[r0:r1] += G @ K[c0:c1], dK[c0:c1] += G^T @ Q[r0:r1]   2 GEMMs          4 * R * C * D FLOPs

6 * n * m * D matrix FLOPs for the loss and both feature gradients (2 without a gradient): the
floor, every product at cuBLAS's own rate. S (16 MB float32) and G go from cuBLAS to the kernel
and back to cuBLAS through L2; the slab's float32 dK accumulator (16 MB) is read and rewritten in
L2 and finished when its slab is; dQ's float32 rows are read and rewritten once per slab (m /
8192 times). Exact and deterministic: the row sums are made by one program per row in a fixed
order, per slab, and summed over the slabs in order; the gradients are GEMM accumulations in
block order; no atomics, no host synchronisation (scale and bias are read on the device).
Precision: the logits come from float32-accumulated products written in float32
(`torch.mm(..., out_dtype=torch.float32)` for half inputs); G is rounded to the inputs' dtype
only as the operand of the two gradient GEMMs (tensor cores), G itself is at most 1 in
magnitude and unweighted (the 1 / n of "mean" is applied afterwards), so nothing underflows in
float16/bfloat16. Memory above inputs and outputs: S and G (24 MB for half inputs) and the
per-slab row partials.

Under the Triton interpreter (CPU tensors) the GEMMs run on the CPU on the same operands (half
inputs upcast, G rounded to the inputs' dtype first), so CI checks the GPU's numerics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import addmm32_, chunk_elems, compute_dtype, launch, mm32, scale_tensor, small_configs, triton_op


@triton.jit
def sigmoid_rows_kernel(
    s_ptr, g_ptr, loss_ptr, stats_ptr, w_ptr, scale_ptr, bias_ptr,
    rows, m, n, row0, col0, offset, stride_s, stride_g,
    HAS_W: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows r of the block S [rows, m] (the products of rows row0 + r with the columns col0 + j;
    BLOCK_M rows per program, columns in order): loss[row0 + r] = sum_j softplus(-z_rj L_rj) with
    L = scale * S + bias over the block's columns; with WITH_GRAD,
    G[r, j] = w (sigmoid(L_rj) - [col0 + j = offset + row0 + r]) to g_ptr (which may be s_ptr: in
    place) and stats[:, row0 + r] = (sum_j G_rj S_rj, sum_j G_rj) over them."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < rows
    i = row0 + r
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    if HAS_W:
        w = tl.load(w_ptr + i, mask=r_ok, other=0.0)
    else:
        w = tl.full((BLOCK_M,), 1.0, scale_ptr.dtype.element_ty)
    pos = tl.where(offset >= 0, offset + i - col0, -1)  # (local column; -1 or out of range: none here)
    CT = scale_ptr.dtype.element_ty  # compute dtype: float32 (float64 for float64 inputs)
    acc_loss = tl.zeros((BLOCK_M, BLOCK_N), CT)
    acc_gs = tl.zeros((BLOCK_M, BLOCK_N), CT)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), CT)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        ok = r_ok[:, None] & (cols < m)[None, :]
        x = tl.load(s_ptr + r[:, None] * stride_s + cols[None, :], mask=ok, other=0.0)
        l = scale * x + bias
        is_pos = cols[None, :] == pos[:, None]
        t = tl.where(is_pos, -l, l)  # the pair's loss is softplus(t)
        e = tl.exp(-tl.abs(t))
        one_e = 1.0 + e
        d = one_e - 1.0  # log1p(e) without losing a tiny e (Goldberg)
        log1p_e = tl.where(d == 0.0, e, tl.log(one_e) * (e / tl.where(d == 0.0, 1.0, d)))
        sp = tl.maximum(t, 0.0) + log1p_e
        sp = tl.where(t != t, t, sp)  # NaN in, NaN out
        acc_loss += tl.where(ok, sp, 0.0)
        if WITH_GRAD:
            sig_t = tl.where(t >= 0.0, 1.0, e) / one_e
            g = w[:, None] * tl.where(is_pos, -sig_t, sig_t)  # sigmoid(L) - [positive]
            g = tl.where(ok, g, 0.0)
            acc_gs += g * x
            acc_g += g
            tl.store(g_ptr + r[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)
    tl.store(loss_ptr + i, tl.sum(acc_loss, 1), mask=r_ok)
    if WITH_GRAD:
        tl.store(stats_ptr + i, tl.sum(acc_gs, 1), mask=r_ok)
        tl.store(stats_ptr + n + i, tl.sum(acc_g, 1), mask=r_ok)


def rows_config(small: bool | None = None, dtype: torch.dtype | None = None) -> dict:
    """The elementwise kernel's launch keywords (memory-bound: 4 rows x 512 columns per step and
    program on a GPU; under the interpreter, where each program costs milliseconds, or with
    FITCLIP_TRITON_CONFIG=small, 64 rows x 128 columns and one warp); float64, 128 columns (the
    three accumulators of 512 spill)."""
    if small_configs(small):
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=1, num_stages=1)
    return dict(BLOCK_M=4, BLOCK_N=128 if dtype == torch.float64 else 512, num_warps=4, num_stages=1)


S_CHUNK_BYTES = 16 << 20  # one float32 S chunk [rows, slab]: from cuBLAS to the kernel to cuBLAS through L2
GTQ_SLAB_BYTES = 16 << 20  # the float32 G^T Q accumulator of one column slab: read and rewritten in L2


def plan(n: int, m: int, D: int) -> tuple[int, int]:
    """(columns per slab, rows per chunk). The slab is as wide as its float32 G^T Q accumulator
    allows within 16 MB (8192 columns at D = 512), in even widths; the chunk as tall as a 16 MB
    float32 S chunk allows (512 rows at 8192 columns), so S and G stay in the H100's 50 MB L2
    between the products and the kernel. FITCLIP_GPU_BLOCK_ELEMS (tests: several slabs and
    chunks) sets S's elements instead, in a square-ish chunk."""
    env = chunk_elems()
    widest = max(64, GTQ_SLAB_BYTES // (4 * max(D, 1)) // 64 * 64)
    if env:
        widest = min(widest, max(1, math.isqrt(env)))
    slabs = -(-m // widest)
    slab = max(1, min(m, -(-m // slabs)))
    rows = max(1, min(n, (env or S_CHUNK_BYTES // 4) // slab))
    return slab, rows


@triton_op("triton_sigmoid_loss")
def triton_sigmoid_loss(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int,
                row_weight: torch.Tensor | None, with_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend contract's sigmoid_loss: (loss [n], G @ keys [n, D], G^T @ query [m, D],
    stats [2, n]) in float32 (the last three empty without with_grad)."""
    n, D = query.shape
    m = keys.shape[0]
    dev = query.device
    ct = compute_dtype(query.dtype)
    s, b = scale_tensor(scale, query), scale_tensor(bias, query)
    slab, R = plan(n, m, D)
    n_slabs = -(-m // slab)
    loss_part = torch.empty((n_slabs, n), device=dev, dtype=ct)
    stats_part = torch.empty((n_slabs, 2, n if with_grad else 0), device=dev, dtype=ct)
    gk = torch.zeros((n if with_grad else 0, D), device=dev, dtype=ct)
    gtq = torch.zeros((m if with_grad else 0, D), device=dev, dtype=ct)
    w = row_weight.to(device=dev, dtype=ct).contiguous() if row_weight is not None else loss_part
    half = query.dtype != ct
    cfg = rows_config(dtype=query.dtype)
    for si, c0 in enumerate(range(0, m, slab)):
        c1 = min(m, c0 + slab)
        k_slab = keys[c0:c1]
        for r0 in range(0, n, R):
            rows = min(R, n - r0)
            q_blk = query[r0:r0 + rows]
            S = mm32(q_blk, k_slab.t())  # [rows, slab] float32 (the caching allocator reuses the chunk's memory)
            G = torch.empty_like(S, dtype=query.dtype) if with_grad and half else S  # float32: in place
            launch(sigmoid_rows_kernel, (triton.cdiv(rows, cfg["BLOCK_M"]),), S, G, loss_part[si],
                   stats_part[si] if with_grad else loss_part[si], w, s, b, rows, c1 - c0, n, r0, c0, offset,
                   S.stride(0), G.stride(0), HAS_W=row_weight is not None, WITH_GRAD=with_grad, **cfg)
            if with_grad:
                addmm32_(gk[r0:r0 + rows], G, k_slab)
                addmm32_(gtq[c0:c1], G.t(), q_blk)
    loss = loss_part.sum(0) if n_slabs > 1 else loss_part[0]
    stats = stats_part.sum(0) if n_slabs > 1 else stats_part[0]
    return loss, gk, gtq, stats
