"""The Triton backend (CUDA tensors; CPU tensors under TRITON_INTERPRET=1): the `Backend`
contract of fitclip_ext.backends over the launchers in kernels/ (torch custom ops
torch.ops.fitclip_ext.triton_<name>, registered when fitclip_ext.kernels.* is imported, which
`backends.resolve` does before any call here). Every kernel computes in float32, and in float64
for float64 inputs (Triton's float64 tl.dot: DMMA on sm_80+)."""
from __future__ import annotations

import torch

from ..common import compute_dtype, row_norms as _norms


def _ops():
    return torch.ops.fitclip_ext


# ----------------------------------------------------------------------------- InfoNCE

def contrastive_lse(query, keys, scale, with_col, offset=0):
    row_lse, col_lse, row_gap, col_gap = _ops().triton_contrastive_lse(query, keys, scale, with_col, offset)
    return row_lse, (col_lse if with_col else None), row_gap, (col_gap if with_col else None)


def contrastive_grad(query, keys, scale, row_lse, row_weight, col_lse, col_weight, *, offset, eps):
    return _ops().triton_contrastive_grad(query, keys, scale, row_lse, row_weight, col_lse, col_weight, offset, float(eps))


# ----------------------------------------------------------------------------- frames

def row_norms(x):
    return _norms(x, compute_dtype(x))


def operand(x):
    """The kernels read any strides and dtypes: inputs are used as given."""
    return x


def topk_sim(text, frames, k, mask, text_norm, frames_norm):
    return _ops().triton_topk_sim(text, frames, k, mask, text_norm, frames_norm)


def topk_sim_bwd(text, frames, bits, grad, k, text_norm, frames_norm, dtext=None):
    if dtext is None:
        return _ops().triton_topk_sim_bwd(text, frames, bits, grad, k, text_norm, frames_norm)
    dframes = _ops().triton_topk_sim_bwd_acc(text, frames, bits, grad, k, dtext, text_norm, frames_norm)
    return dtext, dframes


def unit_grad(grad, x, norm):
    _ops().triton_unit_grad(grad, x, norm)
    return grad


def select_frames(frames, text, k, mask):
    return _ops().triton_select_frames(frames, text, k, mask)


def video_block_rows(B: int, T: int) -> int:
    """At most 64 MB of float32 similarities and 1024 captions per block: a fraction of B x B
    from B = 2048 up (blocks large enough to fill the GPU)."""
    return max(1, min(B, 1024, (1 << 24) // max(B, 1)))


# ----------------------------------------------------------------------------- distillation

def distill_stats(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale):
    return _ops().triton_distill_stats(student_video, student_text, teacher_video, teacher_text,
                                       student_scale.detach(), teacher_scale.detach())


def distill_grad(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale,
                 row_stats_student, row_stats_teacher, row_weight, col_stats_student, col_stats_teacher, col_weight):
    return _ops().triton_distill_grad(student_video, student_text, teacher_video, teacher_text,
                                      student_scale.detach(), teacher_scale.detach(), row_stats_student,
                                      row_stats_teacher, row_weight, col_stats_student, col_stats_teacher, col_weight)


# ----------------------------------------------------------------------------- SigLIP

def sigmoid_loss(query, keys, scale, bias, offset, row_weight, with_grad):
    return _ops().triton_sigmoid_loss(query, keys, scale.detach(), bias.detach(), offset, row_weight, with_grad)
