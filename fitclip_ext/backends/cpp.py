"""The C++ backend (CPU tensors): the `Backend` contract of fitclip_ext.backends over the ops of
csrc/ (torch.ops.fitclip_ext.<name>), their fake implementations for torch.compile, and autograd
formulas that make the forward ops differentiable when called on their own.

csrc/contrastive.cpp computes the log-sum-exps and the softmax part of the logit gradient; the
one-hot, label-smoothing and scale terms are O(n * D) and are added here, so `contrastive_grad`
returns the full gradient, as the Triton backend's kernels do.
"""
from __future__ import annotations

import os

import torch

from ..common import ROW_CHUNK, compute_dtype, row_norms as _norms, rowdot

_OPS = "fitclip_ext::"


def _cpu64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float64)


# ----------------------------------------------------------------------------- InfoNCE

def contrastive_lse(query, keys, scale, with_col, offset=0):
    """The contract's (row_lse, col_lse, row_gap, col_gap): gap = lse - positive logit, the
    positives as row dots (exact products, like the GEMM's up to rounding), clamped at 0: a
    cross-entropy is never negative, and the clamp only removes rounding below the truth."""
    row_lse, col_lse = torch.ops.fitclip_ext.contrastive_lse(query, keys, _cpu64(scale), with_col)
    ct = compute_dtype(query)
    n = query.shape[0]
    pos = scale.detach().to(device=query.device, dtype=ct) * rowdot(query, keys[offset:offset + n], ct)
    row_gap = (row_lse - pos).clamp_min_(0)
    if not with_col:
        return row_lse, None, row_gap, None
    return row_lse, col_lse, row_gap, (col_lse - pos).clamp_min_(0)


def _scaled(query, keys, scale, gk, gtq):
    """(s * G @ K, s * G^T @ Q in the inputs' dtypes, d scale = sum_ij G_ij S_ij) from the
    unscaled G @ K and G^T @ Q (compute dtype, modified in place)."""
    ct = compute_dtype(query)
    grad_scale = rowdot(query, gk, ct).sum()  # sum_ij G_ij S_ij = sum_i Q_i . (G K)_i
    s = scale.detach().to(dtype=ct, device=query.device).reshape(())
    return gk.mul_(s).to(query.dtype), gtq.mul_(s).to(keys.dtype), grad_scale


def contrastive_grad(query, keys, scale, row_lse, row_weight, col_lse, col_weight, *, offset, eps):
    ct = compute_dtype(query)
    n, m = query.shape[0], keys.shape[0]
    symmetric = col_lse is not None
    gk, gtq = torch.ops.fitclip_ext.contrastive_grad(query, keys, _cpu64(scale), row_lse, row_weight, col_lse, col_weight)
    pos_w = (1 - eps) * row_weight * (2 if symmetric else 1)  # column j's positive is row j
    for r0 in range(0, n, ROW_CHUNK):  # in place, chunked: no [n, D] temporaries
        r1 = min(n, r0 + ROW_CHUNK)
        gk[r0:r1].addcmul_(pos_w[r0:r1, None], keys[offset + r0:offset + r1].to(ct), value=-1)
        gtq[offset + r0:offset + r1].addcmul_(pos_w[r0:r1, None], query[r0:r1].to(ct), value=-1)
    if eps:
        gk -= (eps / m) * row_weight[:, None] * keys.sum(0, dtype=ct)
        gtq -= (eps / m) * (row_weight @ query.to(ct))
        if symmetric:
            gtq -= (eps / n) * col_weight[:, None] * query.sum(0, dtype=ct)
            gk -= (eps / n) * (col_weight @ keys.to(ct))
    return _scaled(query, keys, scale, gk, gtq)


# ----------------------------------------------------------------------------- frames

def row_norms(x):
    return _norms(x, compute_dtype(x))


def operand(x):
    """The form the C++ ops read without a copy: compute dtype, contiguous (made once by the
    video loss's block loop instead of once per block)."""
    return x.to(compute_dtype(x)).contiguous()


def topk_sim(text, frames, k, mask, text_norm, frames_norm):
    return torch.ops.fitclip_ext.topk_sim(text, frames, k, mask, text_norm, frames_norm)


def topk_sim_bwd(text, frames, bits, grad, k, text_norm, frames_norm, dtext=None):
    grad = grad.to(compute_dtype(text)).contiguous()
    if dtext is None:
        return torch.ops.fitclip_ext.topk_sim_bwd(text, frames, bits, grad, k, text_norm, frames_norm)
    dframes = torch.ops.fitclip_ext.topk_sim_bwd_acc(text, frames, bits, grad, k, dtext, text_norm, frames_norm)
    return dtext, dframes


def unit_grad(grad, x, norm):
    torch.ops.fitclip_ext.unit_grad(grad, x, norm)
    return grad


def select_frames(frames, text, k, mask):
    return torch.ops.fitclip_ext.select_frames(frames, text, k, mask)


def video_block_rows(B: int, T: int) -> int:
    """About 2^22 similarities per block (csrc/frames.cpp's block; FITCLIP_CPU_BLOCK_ELEMS
    overrides it), at least 16 and at most 1024 captions."""
    target = int(os.environ.get("FITCLIP_CPU_BLOCK_ELEMS", "0") or 0) or (1 << 22)
    return min(B, max(16, min(1024, target // max(1, B * T))))


# ----------------------------------------------------------------------------- distillation

def distill_stats(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale):
    return torch.ops.fitclip_ext.distill_stats(student_video, student_text, teacher_video, teacher_text,
                                               _cpu64(student_scale), _cpu64(teacher_scale))


def distill_grad(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale,
                 row_stats_student, row_stats_teacher, row_weight, col_stats_student, col_stats_teacher, col_weight):
    dvideo, dtext = torch.ops.fitclip_ext.distill_grad(
        student_video, student_text, teacher_video, teacher_text, _cpu64(student_scale), _cpu64(teacher_scale),
        row_stats_student, row_stats_teacher, row_weight, col_stats_student, col_stats_teacher, col_weight)
    return _scaled(student_video, student_text, student_scale, dvideo, dtext)


# ----------------------------------------------------------------------------- SigLIP

def sigmoid_loss(query, keys, scale, bias, offset, row_weight, with_grad):
    return torch.ops.fitclip_ext.sigmoid_loss(query, keys, _cpu64(scale), _cpu64(bias), offset, row_weight, with_grad)


# ----------------------------------------------------------------------------- registration

def register() -> None:
    """Fake implementations of the C++ ops (shapes and dtypes only, for torch.compile) and the
    autograd formulas of contrastive_lse and topk_sim (through their gradient ops)."""

    def ct(x):
        return compute_dtype(x)

    @torch.library.register_fake(_OPS + "contrastive_lse")
    def _(query, keys, scale, with_col):
        return (query.new_empty(query.shape[0], dtype=ct(query)),
                query.new_empty(keys.shape[0] if with_col else 0, dtype=ct(query)))

    @torch.library.register_fake(_OPS + "contrastive_grad")
    def _(query, keys, scale, row_lse, row_weight, col_lse, col_weight):
        return query.new_empty(query.shape, dtype=ct(query)), keys.new_empty(keys.shape, dtype=ct(query))

    @torch.library.register_fake(_OPS + "topk_sim")
    def _(text, frames, k, mask, text_norm=None, frames_norm=None):
        C, V, T = text.shape[0], frames.shape[0], frames.shape[1]
        return text.new_empty((C, V), dtype=ct(text)), text.new_empty((C, V, (T + 31) // 32), dtype=torch.int32)

    @torch.library.register_fake(_OPS + "topk_sim_bwd")
    def _(text, frames, bits, grad, k, text_norm=None, frames_norm=None):
        return text.new_empty(text.shape, dtype=ct(text)), frames.new_empty(frames.shape, dtype=ct(text))

    @torch.library.register_fake(_OPS + "topk_sim_bwd_acc")
    def _(text, frames, bits, grad, k, dtext_acc, text_norm=None, frames_norm=None):
        return frames.new_empty(frames.shape, dtype=ct(text))

    @torch.library.register_fake(_OPS + "unit_grad")
    def _(grad, x, norm):
        return None

    @torch.library.register_fake(_OPS + "select_frames")
    def _(frames, text, k, mask):
        return frames.new_empty((frames.shape[0], k), dtype=torch.int64)

    @torch.library.register_fake(_OPS + "distill_stats")
    def _(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale):
        n, m = student_video.shape[0], student_text.shape[0]
        return tuple(student_video.new_empty(size, dtype=ct(student_video))
                     for size in ((2, n), (2, n), n, (2, m), (2, m), m))

    @torch.library.register_fake(_OPS + "distill_grad")
    def _(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale, row_stats_s,
          row_stats_t, row_weight, col_stats_s, col_stats_t, col_weight):
        return (student_video.new_empty(student_video.shape, dtype=ct(student_video)),
                student_text.new_empty(student_text.shape, dtype=ct(student_video)))

    @torch.library.register_fake(_OPS + "sigmoid_loss")
    def _(query, keys, scale, bias, offset, row_weight, with_grad):
        n, m, d = query.shape[0], keys.shape[0], query.shape[1]
        return (query.new_empty(n, dtype=ct(query)), query.new_empty((n if with_grad else 0, d), dtype=ct(query)),
                query.new_empty((m if with_grad else 0, d), dtype=ct(query)),
                query.new_empty((2, n if with_grad else 0), dtype=ct(query)))

    def lse_setup(ctx, inputs, output):
        query, keys, scale, with_col = inputs
        ctx.save_for_backward(query, keys, scale, *output)
        ctx.with_col = with_col

    def lse_backward(ctx, g_row, g_col):
        # d(sum_i w_i row_lse_i + sum_j v_j col_lse_j)/dS = diag(w) P_rows + P_cols diag(v): the
        # softmax part that contrastive_grad computes, times the scale for the features.
        query, keys, scale, row_lse, col_lse = ctx.saved_tensors
        w = g_row.to(ct(query)).contiguous()
        v = g_col.to(ct(query)).contiguous() if ctx.with_col else None
        gk, gtq = torch.ops.fitclip_ext.contrastive_grad(query, keys, scale, row_lse, w,
                                                     col_lse if ctx.with_col else None, v)
        dq, dk, d_scale = _scaled(query, keys, scale, gk, gtq)
        return dq, dk, d_scale.to(scale.dtype).reshape(scale.shape), None

    torch.library.register_autograd(_OPS + "contrastive_lse", lse_backward, setup_context=lse_setup)

    def sim_setup(ctx, inputs, output):
        text, frames, k, mask, text_norm, frames_norm = inputs
        ctx.save_for_backward(text, frames, output[1], text_norm, frames_norm)
        ctx.k = k

    def sim_backward(ctx, g_sim, g_bits):
        # With norms given the op reads x / max(n, eps) for independent inputs x and n: the
        # unit vectors' gradient g becomes g / max(n, eps) for x and -<g, x> / n^2 for n.
        text, frames, bits, text_norm, frames_norm = ctx.saved_tensors
        dt, df = torch.ops.fitclip_ext.topk_sim_bwd(text, frames, bits, g_sim.to(ct(text)).contiguous(), ctx.k,
                                                    text_norm, frames_norm)
        grads = []
        for g, x, nrm in ((dt, text, text_norm), (df, frames, frames_norm)):
            if nrm is None:
                grads.append((g.to(x.dtype), None))
                continue
            n = nrm.to(g.dtype).unsqueeze(-1)
            big = n > 1e-12
            dn = torch.where(big, -(g * x.to(g.dtype)).sum(-1, keepdim=True) / (n * n), 0.0).squeeze(-1)
            grads.append(((g / n.clamp_min(1e-12)).to(x.dtype), dn.to(nrm.dtype)))
        (d_text, d_tn), (d_frames, d_fn) = grads
        return d_text, d_frames, None, None, d_tn, d_fn

    torch.library.register_autograd(_OPS + "topk_sim", sim_backward, setup_context=sim_setup)
