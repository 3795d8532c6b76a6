"""FitCLIP's temporal sampling as fused ops: frame-caption cosine similarity with top-k selection.

- `select_frames`: for each caption, the k frames of its own video most similar to it.
- `gather_frames`: batched gather of frames (uint8 video) or features (differentiable).
- `topk_frame_similarity`: caption x video scores, the mean of the k best frame similarities.
- `video_contrastive_loss`: symmetric InfoNCE over those scores, chunked (no B x B, no B x B x T).

The C++ and Triton kernels take the raw embeddings and fold the cosine normalisation in (values and
gradients as F.normalize's, its clamp of tiny norms included), so no normalised copy of the
V x T x D frames is made. Ties between equal similarities go to the earlier frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend, _validate
from .contrastive import _compute_dtype, _zero_bias_term, contrastive_loss
from .reference import (select_frames_reference, topk_frame_similarity_reference,
                        video_contrastive_loss_reference)


# ----------------------------------------------------------------------------- validation

def _frames(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [videos, frames, D], got shape {tuple(x.shape)}")
    if x.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{name} must be non-empty in every dimension, got shape {tuple(x.shape)}")
    return x


def _k(k, num_frames: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_frames:
        raise ValueError(f"k must be in [1, T] = [1, {num_frames}], got {k}")
    return k


def _mask(mask, videos: int, num_frames: int, k: int, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = real frame), got {mask.dtype}")
    if tuple(mask.shape) != (videos, num_frames):
        raise ValueError(f"mask must have shape [videos, T] = [{videos}, {num_frames}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on {device}, got {mask.device}")
    real = mask.sum(1)
    short = (real < k).nonzero()
    if short.numel():
        v = short[0, 0].item()
        raise ValueError(f"mask leaves video {v} with {real[v].item()} real frames, fewer than k={k}")
    return mask.contiguous()


def _frame_inputs(text, frames, k, mask, same_count: bool):
    """The checks shared by the frame ops; returns (k, mask)."""
    _pair("text_features", text, "frame_features", frames, same_count)
    k = _k(k, frames.shape[1])
    return k, _mask(mask, frames.shape[0], frames.shape[1], k, frames.device)


def _pair(text_name, text, frames_name, frames, same_count: bool):
    _validate.features(text_name, text)
    _frames(frames_name, frames)
    _validate.same_device_dtype((frames_name, text_name), frames, text)
    if text.shape[1] != frames.shape[2]:
        raise ValueError(f"{text_name} and {frames_name} must have the same feature size D, got "
                         f"{text.shape[1]} and {frames.shape[2]}")
    if same_count and text.shape[0] != frames.shape[0]:
        raise ValueError(f"{frames_name} and {text_name} must have the same batch size B (caption b describes "
                         f"video b), got {frames.shape[0]} and {text.shape[0]}")


# ----------------------------------------------------------------------------- backends

class _CppFrames:
    """The C++ kernels take the raw embeddings and fold the cosine normalisation in (forward and
    backward, as F.normalize does it), so no normalised copy of the V x T x D frames is made."""

    @staticmethod
    def topk_sim(text, frames, k, mask):
        return torch.ops.fitclip_ext.topk_sim_fwd(text, frames, k, mask, True)

    @staticmethod
    def topk_sim_bwd(text, frames, idx, grad, k):
        return torch.ops.fitclip_ext.topk_sim_bwd(text, frames, idx, grad, True)

    @staticmethod
    def video_lse(text, frames, k, mask, scale):
        s = scale.detach().to(device="cpu", dtype=torch.float64)
        return torch.ops.fitclip_ext.video_infonce_lse(text, frames, k, mask, s, True)

    @staticmethod
    def video_grad(text, frames, k, mask, scale, cap_lse, vid_lse, cap_w, vid_w, eps):
        s = scale.detach().to(device="cpu", dtype=torch.float64)
        return torch.ops.fitclip_ext.video_infonce_grad(text, frames, k, mask, s, cap_lse, vid_lse, cap_w, vid_w, eps,
                                                        True)

    @staticmethod
    def select(frames, text_n, k, mask):
        return torch.ops.fitclip_ext.select_frames(frames, text_n, k, mask)


def _ops(backend: str):
    if backend == "cpp":
        return _CppFrames
    if backend == "triton":
        from fitclip_ext.kernels import frames as triton_frames

        return triton_frames
    raise AssertionError(backend)


def _mean_unit_frames(frames):
    """k = T (every frame real, which k = T implies): the mean of a video's T cosine similarities
    to a caption is the caption's similarity to the mean of the unit frames, so the pooled scores
    are one [C, D] x [D, V] product instead of T of them (computed in float32 for half types)."""
    ct = _compute_dtype(frames)
    return F.normalize(frames.to(ct), dim=-1).mean(1)


class _TopkSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text, frames, k, mask, backend):
        # `chosen` is backend-specific: frame indices [C, V, k] (C++) or bit sets (Triton).
        sim, chosen = _ops(backend).topk_sim(text, frames, k, mask)
        ctx.save_for_backward(text, frames, chosen)
        ctx.backend, ctx.k = backend, k
        return sim.to(text.dtype)

    @staticmethod
    def backward(ctx, grad):
        text, frames, chosen = ctx.saved_tensors
        dt, df = _ops(ctx.backend).topk_sim_bwd(text, frames, chosen, grad.to(_compute_dtype(text)).contiguous(),
                                                ctx.k)
        return dt.to(text.dtype), df.to(frames.dtype), None, None, None


class _VideoInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text, frames, scale, k, mask, eps, reduction, backend):
        ct = _compute_dtype(text)
        B = text.shape[0]
        cap_lse, vid_lse, cap_sum, vid_sum, diag = _ops(backend).video_lse(text, frames, k, mask, scale)
        s = scale.detach().to(device=text.device, dtype=ct)
        pos = s * diag
        cap_ce = cap_lse - (1 - eps) * pos - eps / B * s * cap_sum
        vid_ce = vid_lse - (1 - eps) * pos - eps / B * s * vid_sum
        per_item = (vid_ce + cap_ce) / 2
        loss = per_item if reduction == "none" else per_item.sum() if reduction == "sum" else per_item.mean()
        ctx.save_for_backward(text, frames, scale, cap_lse, vid_lse, mask)
        ctx.config = (k, eps, reduction, backend)
        return loss.to(text.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        text, frames, scale, cap_lse, vid_lse, mask = ctx.saved_tensors
        k, eps, reduction, backend = ctx.config
        ct = _compute_dtype(text)
        B = text.shape[0]
        g = grad_out.to(ct)
        if reduction == "none":
            w = (g * 0.5).contiguous()
        else:
            w = (g * (0.5 / B if reduction == "mean" else 0.5)).expand(B).contiguous()
        dt, df, ds = _ops(backend).video_grad(text, frames, k, mask, scale, cap_lse, vid_lse, w, w, eps)
        grad_scale = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return dt.to(text.dtype), df.to(frames.dtype), grad_scale, None, None, None, None, None


# ----------------------------------------------------------------------------- public ops

def select_frames(frame_features, text_features, k, *, mask=None, backend=None):
    """The k frames of each video most similar (cosine) to its own caption.

    Args:
        frame_features: [B, T, D] float tensor, frame embeddings of B videos.
        text_features: [B, D], caption b describes video b.
        k: frames to keep, 1 <= k <= T.
        mask: optional bool [B, T], True = real frame; every video needs >= k real frames.
        backend: None (auto), "triton", "cpp" or "torch".
    Returns (indices [B, k] int64 in ascending time order, scores [B, k] cosine similarities in
    the features' dtype; scores carry gradients to both inputs, the selection itself does not).
    """
    k, mask = _frame_inputs(text_features, frame_features, k, mask, same_count=True)
    backend = _backend.resolve(backend, frame_features.device)
    if backend == "torch":
        return select_frames_reference(frame_features, text_features, k, mask=mask)
    with torch.no_grad():
        text_n = F.normalize(text_features.detach(), dim=-1)
        idx = _ops(backend).select(frame_features.detach(), text_n, k, mask)
    chosen = F.normalize(gather_frames(frame_features, idx), dim=-1)
    scores = torch.einsum("bkd,bd->bk", chosen, F.normalize(text_features, dim=-1))
    return idx, scores


def gather_frames(x, indices):
    """x [B, T, ...] (uint8 video frames, or features) and indices [B, k] -> x's rows [B, k, ...].
    Differentiable for floating point x."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape [B, T, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError(f"indices must be a [B, k] tensor, got {getattr(indices, 'shape', type(indices).__name__)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must have x's batch size {x.shape[0]} rows, got {indices.shape[0]}")
    if indices.device != x.device:
        raise ValueError(f"indices must be on {x.device}, got {indices.device}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= x.shape[1]):
        raise ValueError(f"indices must be in [0, T) = [0, {x.shape[1]}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, indices.long()]


def topk_frame_similarity(text_features, frame_features, k, *, mask=None, backend=None):
    """For every caption c and video v, the mean of the k largest cosine similarities between
    caption c and the frames of video v: [C, V] in the features' dtype. With k = T it is mean
    pooling of frame similarities (FitCLIP's video-text score), computed as one [C, D] x [D, V]
    product with the mean unit frame of each video. Never materialises C x V x T.

    Args:
        text_features: [C, D]; frame_features: [V, T, D] (same dtype and device).
        k: 1 <= k <= T. mask: optional bool [V, T], True = real frame (>= k per video).
        backend: None (auto), "triton", "cpp" or "torch".
    Gradients reach both inputs (through the normalisation, to the selected frames only).
    """
    k, mask = _frame_inputs(text_features, frame_features, k, mask, same_count=False)
    backend = _backend.resolve(backend, frame_features.device)
    if backend == "torch":
        return topk_frame_similarity_reference(text_features, frame_features, k, mask=mask)
    if k == frame_features.shape[1]:  # mean pooling (FitCLIP's): one GEMM
        text_n = F.normalize(text_features.to(_compute_dtype(text_features)), dim=-1)
        return (text_n @ _mean_unit_frames(frame_features).T).to(text_features.dtype)
    return _TopkSimilarity.apply(text_features, frame_features, k, mask, backend)


def video_contrastive_loss(frame_features, text_features, logit_scale, logit_bias=None, *, k, mask=None,
                           label_smoothing=0.0, reduction="mean", backend=None):
    """Symmetric InfoNCE of B videos and their B captions with logits
    logit_scale * topk_frame_similarity(text, frames, k) + logit_bias (video i pairs caption i).

    Args:
        frame_features: [B, T, D]; text_features: [B, D] (same dtype and device).
        logit_scale, logit_bias, label_smoothing, reduction: as in `contrastive_loss`.
        k: frames pooled per pair, 1 <= k <= T. mask: optional bool [B, T] (>= k real frames).
    Returns the loss in the features' dtype; reduction="none" gives [B] (mean of video i's and
    caption i's losses). Stores neither the B x B logits nor the B x B x T similarities.
    """
    k, mask = _frame_inputs(text_features, frame_features, k, mask, same_count=True)
    scale, bias, eps, reduction = _validate.loss_options(logit_scale, logit_bias, label_smoothing, reduction,
                                                         frame_features.device)
    backend = _backend.resolve(backend, frame_features.device)
    if backend == "torch":
        dev = frame_features.device
        return video_contrastive_loss_reference(frame_features, text_features, scale.to(dev),
                                                None if bias is None else bias.to(dev), k=k, mask=mask,
                                                label_smoothing=eps, reduction=reduction)
    if k == frame_features.shape[1]:  # mean pooling: the fused InfoNCE over mean unit frames
        text_n = F.normalize(text_features.to(_compute_dtype(text_features)), dim=-1)
        loss = contrastive_loss(_mean_unit_frames(frame_features), text_n, scale, bias, label_smoothing=eps,
                                reduction=reduction, backend=backend)
        return loss.to(frame_features.dtype)
    loss = _VideoInfoNCE.apply(text_features, frame_features, scale, k, mask, eps, reduction, backend)
    return _zero_bias_term(loss, bias)
