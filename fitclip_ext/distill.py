"""Chunked distillation loss: FitCLIP's loss on unlabeled videos, a student's video x caption scores
pulled towards a frozen teacher's, without the n x m score matrices.

With student logits Y = s * V_s @ T_s^T and teacher logits X = t * V_t @ T_t^T,

    loss = t^2 / 2 * (sum_i KL(softmax(X_i) || softmax(Y_i)) / d_rows
                      + sum_j KL(softmax(X_:j) || softmax(Y_:j)) / d_cols)

(torch.nn.functional.kl_div's reductions: "batchmean" d = n for rows and m for columns, "sum"
d = 1, "mean" d = n * m). Each row's KL is sum_j p_ij (X_ij - Y_ij) - lseX_i + lseY_i, so the
backends only return, per row and per column, the two log-sum-exps and the KL; the gradient with
respect to the student logits is w_i (q_ij - p_ij) + v_j (q'_ij - p'_ij) (q: the student's
softmax, ': over columns), formed tile by tile.

Each log-sum-exp travels as a [2, n] statistics tensor, (max of the scaled logits, log of the sum
of exp relative to it), in the backend's own units (natural for C++, base 2 for Triton, whose
kernels work in exp2), read only by the same backend's gradient. Kept apart, the exponent
(y - max) - log_sum of a row's dominant entry is exact up to the small log-sum, as in torch's
log_softmax; one rounded lse = max + log_sum carries an error of the logits' magnitude (4e-6 at
the teacher's scale 66.7) that every probability of the row shares and that q - p does not cancel.
"""
from __future__ import annotations

import torch

from . import backends, validate
from .common import autocast_features, compute_dtype, kl_divisors
from .reference import distillation_loss_reference

KL_REDUCTIONS = ("batchmean", "sum", "mean")


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sv, st, tv, tt, s_scale, t_scale, reduction, backend, out_dtype):
        with torch.autocast(sv.device.type, enabled=False):  # (autocast_features chose the precision)
            return _Distill._forward(ctx, sv, st, tv, tt, s_scale, t_scale, reduction, backend, out_dtype)

    @staticmethod
    def _forward(ctx, sv, st, tv, tt, s_scale, t_scale, reduction, backend, out_dtype):
        ct = compute_dtype(sv)
        n, m = sv.shape[0], st.shape[0]
        rls, rlt, rkl, cls, clt, ckl = backends.get(backend).distill_stats(sv, st, tv, tt, s_scale, t_scale)
        dr, dc = kl_divisors(reduction, n, m)
        t2 = t_scale.detach().to(device=sv.device, dtype=ct) ** 2
        loss = (rkl.sum() / dr + ckl.sum() / dc) * (t2 / 2)
        ctx.save_for_backward(sv, st, tv, tt, s_scale, t_scale, rls, rlt, cls, clt)
        ctx.config = (reduction, backend)
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _Distill._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        sv, st, tv, tt, s_scale, t_scale, rls, rlt, cls, clt = ctx.saved_tensors
        reduction, backend = ctx.config
        ct = compute_dtype(sv)
        n, m = sv.shape[0], st.shape[0]
        dr, dc = kl_divisors(reduction, n, m)
        g = grad_out.to(ct) * t_scale.detach().to(device=sv.device, dtype=ct) ** 2 / 2
        row_w = (g / dr).expand(n).contiguous()
        col_w = (g / dc).expand(m).contiguous()
        ga, gb, gs = backends.get(backend).distill_grad(sv, st, tv, tt, s_scale, t_scale, rls, rlt, row_w, cls, clt, col_w)
        need = ctx.needs_input_grad
        return (ga if need[0] else None, gb if need[1] else None, None, None,
                gs.to(s_scale.dtype).reshape(s_scale.shape) if need[4] else None, None, None, None, None)


def _frozen(name: str, x: torch.Tensor) -> None:
    if isinstance(x, torch.Tensor) and x.requires_grad:
        raise ValueError(
            f"{name} requires grad, but distillation_loss treats the teacher as a fixed target and gives it "
            f"no gradient: pass {name}.detach() (or compute it under torch.no_grad())"
        )


def distillation_loss(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale, *,
                      reduction="batchmean", backend=None):
    """FitCLIP's unlabeled-data loss: KL(softmax(teacher logits) || softmax(student logits)) over
    the rows (videos) and over the columns (captions) of the video x caption logits, averaged, times
    teacher_scale^2 (the soft-target gradient scaling of knowledge distillation).

    Args:
        student_video: [n, D] video embeddings of the student (normalised, as used for the logits).
        student_text: [m, D] caption (or class-prompt) embeddings of the student.
        teacher_video: [n, Dt], teacher_text: [m, Dt]: the teacher's; no gradient (detach them).
        student_scale, teacher_scale: the (exponentiated) logit scales, numbers or 0-d tensors;
            student_scale gets a gradient when it requires one.
        reduction: "batchmean" (KL sums / n over rows, / m over columns; the mathematically
            correct KL, torch's recommendation), "sum", or "mean" (/ (n * m)).
        backend: None (auto: "triton" on CUDA, "cpp" on CPU), "triton", "cpp" or "torch".
    All four features share dtype (float32, float64, bfloat16, float16) and device. Returns the loss
    in that dtype (float32 under torch.autocast, whose dtype the fused backends then compute the
    products in, as a matmul would); the fused backends never store an n x m matrix.
    """
    names = ("student_video", "student_text", "teacher_video", "teacher_text")
    feats = (student_video, student_text, teacher_video, teacher_text)
    for name, x in zip(names, feats):
        validate.features(name, x)
    for name, x in zip(names[1:], feats[1:]):
        validate.same_device_dtype(("student_video", name), student_video, x)
    for who, video, text in (("student", student_video, student_text), ("teacher", teacher_video, teacher_text)):
        if video.shape[1] != text.shape[1]:
            raise ValueError(f"{who}_video and {who}_text must have the same feature size D, got "
                             f"{video.shape[1]} and {text.shape[1]}")
    for name, t, s, what in (("teacher_video", teacher_video, student_video, "videos"),
                             ("teacher_text", teacher_text, student_text, "captions")):
        if t.shape[0] != s.shape[0]:
            raise ValueError(f"{name} must score the student's {s.shape[0]} {what}, got shape {tuple(t.shape)}")
    _frozen("teacher_video", teacher_video)
    _frozen("teacher_text", teacher_text)
    _frozen("teacher_scale", teacher_scale)
    dev = student_video.device
    s_scale = validate.scale("student_scale", student_scale, dev)
    t_scale = validate.scale("teacher_scale", teacher_scale, dev)
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    backend = backends.resolve(backend, dev)
    if backend == "torch":
        loss = distillation_loss_reference(student_video, student_text, teacher_video, teacher_text,
                                           s_scale.to(dev), t_scale.to(dev), reduction=reduction)
        return loss.to(student_video.dtype)  # the 0-d float64 scales would promote it
    feats, out_dtype = autocast_features(backend, *feats)
    return _Distill.apply(*feats, s_scale, t_scale, reduction, backend, out_dtype)
