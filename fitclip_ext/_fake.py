"""Fake (meta) implementations of the C++ ops, so torch.compile can trace code that calls them
(shapes and dtypes only; no data), and autograd formulas for the forward ops whose gradient is
another op: infonce_lse (through infonce_grad) and topk_sim_fwd (through topk_sim_bwd). The public
losses wrap the ops in autograd Functions of their own (which also fold in the positives and
label smoothing); these registrations make the ops differentiable when called directly."""
from __future__ import annotations

import torch


def _ct(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def register() -> None:
    lib = "fitclip_ext::"

    @torch.library.register_fake(lib + "infonce_lse")
    def _(query, keys, scale, with_col):
        ct = _ct(query)
        return query.new_empty(query.shape[0], dtype=ct), query.new_empty(keys.shape[0] if with_col else 0, dtype=ct)

    @torch.library.register_fake(lib + "infonce_grad")
    def _(query, keys, scale, row_lse, row_weight, col_lse, col_weight):
        ct = _ct(query)
        return query.new_empty(query.shape, dtype=ct), keys.new_empty(keys.shape, dtype=ct)

    @torch.library.register_fake(lib + "topk_sim_fwd")
    def _(text, frames, k, mask, normalize=False):
        ct = _ct(text)
        C, V = text.shape[0], frames.shape[0]
        return text.new_empty((C, V), dtype=ct), text.new_empty((C, V, k), dtype=torch.int16)

    @torch.library.register_fake(lib + "topk_sim_bwd")
    def _(text, frames, idx, grad, normalize=False):
        ct = _ct(text)
        return text.new_empty(text.shape, dtype=ct), frames.new_empty(frames.shape, dtype=ct)

    @torch.library.register_fake(lib + "video_infonce_lse")
    def _(text, frames, k, mask, scale, normalize=False):
        ct = _ct(text)
        return tuple(text.new_empty(text.shape[0], dtype=ct) for _ in range(5))

    @torch.library.register_fake(lib + "video_infonce_grad")
    def _(text, frames, k, mask, scale, cap_lse, vid_lse, cap_w, vid_w, eps, normalize=False):
        ct = _ct(text)
        return (text.new_empty(text.shape, dtype=ct), frames.new_empty(frames.shape, dtype=ct),
                text.new_empty((), dtype=ct))

    @torch.library.register_fake(lib + "select_frames")
    def _(frames, text, k, mask):
        return frames.new_empty((frames.shape[0], k), dtype=torch.int64)

    @torch.library.register_fake(lib + "distill_stats")
    def _(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale):
        ct = _ct(student_video)
        n, m = student_video.shape[0], student_text.shape[0]
        return tuple(student_video.new_empty(size, dtype=ct) for size in ((2, n), (2, n), n, (2, m), (2, m), m))

    @torch.library.register_fake(lib + "distill_grad")
    def _(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale, row_stats_s,
          row_stats_t, row_weight, col_stats_s, col_stats_t, col_weight):
        ct = _ct(student_video)
        return student_video.new_empty(student_video.shape, dtype=ct), student_text.new_empty(student_text.shape, dtype=ct)

    def lse_setup(ctx, inputs, output):
        query, keys, scale, with_col = inputs
        ctx.save_for_backward(query, keys, scale, *output)
        ctx.with_col = with_col

    def lse_backward(ctx, g_row, g_col):
        # d(sum_i w_i row_lse_i + sum_j v_j col_lse_j)/dS = diag(w) P_rows + P_cols diag(v): the
        # softmax part that infonce_grad computes, times the scale for the features.
        query, keys, scale, row_lse, col_lse = ctx.saved_tensors
        ct = _ct(query)
        w = g_row.to(ct).contiguous()
        v = g_col.to(ct).contiguous() if ctx.with_col else None
        gk, gtq = torch.ops.fitclip_ext.infonce_grad(query, keys, scale, row_lse, w, col_lse if ctx.with_col else None, v)
        s = scale.detach().to(dtype=ct, device=query.device).reshape(())
        d_scale = (query.to(ct) * gk).sum()  # sum_ij G_ij (Q K^T)_ij
        return (gk * s).to(query.dtype), (gtq * s).to(keys.dtype), d_scale.to(scale.dtype).reshape(scale.shape), None

    torch.library.register_autograd(lib + "infonce_lse", lse_backward, setup_context=lse_setup)

    def sim_setup(ctx, inputs, output):
        text, frames, k, mask, normalize = inputs
        ctx.save_for_backward(text, frames, output[1])
        ctx.normalize = normalize

    def sim_backward(ctx, g_sim, g_idx):
        text, frames, idx = ctx.saved_tensors
        dt, df = torch.ops.fitclip_ext.topk_sim_bwd(text, frames, idx, g_sim.to(_ct(text)).contiguous(), ctx.normalize)
        return dt.to(text.dtype), df.to(frames.dtype), None, None, None

    torch.library.register_autograd(lib + "topk_sim_fwd", sim_backward, setup_context=sim_setup)
