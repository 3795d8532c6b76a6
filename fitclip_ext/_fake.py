"""Fake (meta) implementations of the C++ ops, so torch.compile can trace code that calls them
(shapes and dtypes only; no data)."""
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
        return tuple(student_video.new_empty(size, dtype=ct) for size in (n, n, n, m, m, m))

    @torch.library.register_fake(lib + "distill_grad")
    def _(student_video, student_text, teacher_video, teacher_text, student_scale, teacher_scale, row_lse_s,
          row_lse_t, row_weight, col_lse_s, col_lse_t, col_weight):
        ct = _ct(student_video)
        return student_video.new_empty(student_video.shape, dtype=ct), student_text.new_empty(student_text.shape, dtype=ct)
