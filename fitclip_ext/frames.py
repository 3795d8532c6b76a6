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

from . import backends, validate
from .common import compute_dtype, reduce, symmetric_cross_entropy, upstream_weights, zero_bias_term
from .contrastive import contrastive_loss
from .reference import (select_frames_reference, topk_frame_similarity_reference,
                        video_contrastive_loss_reference)


# ----------------------------------------------------------------------------- autograd

def _mean_pooling_operands(text, frames):
    """k = T (every frame real, which k = T implies): the mean of a video's T cosine similarities
    to a caption is the caption's similarity to the mean of the unit frames, so the pooled scores
    are one [C, D] x [D, V] product instead of T of them. The unit captions and mean unit frames
    are formed in float32 and rounded once to the inputs' dtype: half inputs keep the product on
    tensor cores (a float32 product would run IEEE CUDA-core FMAs on a GPU)."""
    ct = compute_dtype(frames)
    text_n = F.normalize(text.to(ct), dim=-1).to(text.dtype)
    return text_n, F.normalize(frames.to(ct), dim=-1).mean(1).to(frames.dtype)


def _raw_grads(ops, text, frames, norms, dtext, dframes, dtype):
    """The unit vectors' gradients -> the raw embeddings' (F.normalize's backward), in `dtype`
    (`frames` may be the backend's operand copy of the input)."""
    return ops.unit_grad(dtext, text, norms[0]).to(dtype), ops.unit_grad(dframes, frames, norms[1]).to(dtype)


class _TopkSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text, frames, k, mask, backend):
        ops = backends.get(backend)
        norms = ops.row_norms(text), ops.row_norms(frames)
        sim, bits = ops.topk_sim(text, frames, k, mask, *norms)
        ctx.save_for_backward(text, frames, bits, *norms)
        ctx.backend, ctx.k = backend, k
        return sim.to(text.dtype)

    @staticmethod
    def backward(ctx, grad):
        text, frames, bits, *norms = ctx.saved_tensors
        ops = backends.get(ctx.backend)
        dt, df = ops.topk_sim_bwd(text, frames, bits, grad.to(compute_dtype(text)).contiguous(), ctx.k, *norms)
        return (*_raw_grads(ops, text, frames, norms, dt, df, text.dtype), None, None, None)


class _VideoInfoNCE(torch.autograd.Function):
    """Symmetric InfoNCE over L = scale * topk_sim(text, frames), one block loop for every
    backend. The forward goes over blocks of captions: each gets its pooled similarities
    [rows, B] from the backend's fused top-k op, which live only for that block; the per-caption
    log-sum-exp is exact within a block, the per-video one merges across blocks online. The
    backward goes over blocks of videos: it recomputes the block's similarities [B, cols] and
    chosen frames, forms the full logit gradient there (both log-sum-exps are known), writes the
    block's frame gradient once and adds into the captions' [B, D] gradient (a read-modify-write
    T times smaller than the frames' would be). One forward and one recomputed pass of the top-k
    similarities plus the two gradient passes: 4 passes of 2 B B T D. Neither B x B nor B x B x T
    is stored."""

    @staticmethod
    def forward(ctx, text, frames, scale, k, mask, eps, reduction, backend):
        ops = backends.get(backend)
        B, T = text.shape[0], frames.shape[1]
        f = ops.operand(frames)
        norms = ops.row_norms(text), ops.row_norms(f)
        cap_lse = cap_sum = diag = None
        vid_max = vid_sumexp = vid_sum = None
        s = None
        rows = ops.video_block_rows(B, T)
        for r0 in range(0, B, rows):
            r1 = min(B, r0 + rows)
            sim, _ = ops.topk_sim(text[r0:r1], f, k, mask, norms[0][r0:r1], norms[1])
            if s is None:
                s = scale.detach().to(device=text.device, dtype=sim.dtype)
                cap_lse, cap_sum, diag = (sim.new_empty(B) for _ in range(3))
                vid_max = sim.new_full((B,), float("-inf"))
                vid_sumexp, vid_sum = sim.new_zeros(B), sim.new_zeros(B)
            logits = s * sim
            cap_lse[r0:r1] = torch.logsumexp(logits, 1)
            cap_sum[r0:r1] = sim.sum(1)
            diag[r0:r1] = sim.diagonal(offset=r0)
            new_max = torch.maximum(vid_max, logits.max(0).values)
            rescale = torch.where(vid_max == float("-inf"), 0.0, torch.exp(vid_max - new_max))
            vid_sumexp = vid_sumexp * rescale + torch.exp(logits - new_max).sum(0)
            vid_max = new_max
            vid_sum += sim.sum(0)
        vid_lse = vid_max + torch.log(vid_sumexp)
        per_item = symmetric_cross_entropy(cap_lse, vid_lse, s * diag, s * cap_sum / B, s * vid_sum / B, eps)
        ctx.save_for_backward(text, frames, scale, cap_lse, vid_lse, mask, *norms)
        ctx.config = (k, eps, reduction, backend)
        return reduce(per_item, reduction).to(text.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        text, frames, scale, cap_lse, vid_lse, mask, *norms = ctx.saved_tensors
        k, eps, reduction, backend = ctx.config
        ops = backends.get(backend)
        B, T = text.shape[0], frames.shape[1]
        w = upstream_weights(grad_out, B, reduction, True, cap_lse.dtype)
        f = ops.operand(frames)
        s = scale.detach().to(device=text.device, dtype=cap_lse.dtype)
        dtext = torch.zeros(text.shape, device=text.device, dtype=cap_lse.dtype)
        dframes = torch.empty(frames.shape, device=text.device, dtype=cap_lse.dtype)
        ds = torch.zeros((), device=text.device, dtype=cap_lse.dtype)
        cols = ops.video_block_rows(B, T)
        for v0 in range(0, B, cols):
            v1 = min(B, v0 + cols)
            sim, bits = ops.topk_sim(text, f[v0:v1], k, None if mask is None else mask[v0:v1], norms[0],
                                     norms[1][v0:v1])
            logits = s * sim  # [B, cols]: captions x this block's videos
            positive = torch.zeros_like(sim)
            positive.diagonal(offset=-v0).fill_(1.0 - eps)
            g = w[:, None] * (torch.exp(logits - cap_lse[:, None]) - positive - eps / B)
            g += w[None, v0:v1] * (torch.exp(logits - vid_lse[None, v0:v1]) - positive - eps / B)
            ds += (g * sim).sum()
            _, dframes[v0:v1] = ops.topk_sim_bwd(text, f[v0:v1], bits, s * g, k, norms[0], norms[1][v0:v1], dtext)
        dt, df = _raw_grads(ops, text, f, norms, dtext, dframes, text.dtype)
        grad_scale = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return dt, df, grad_scale, None, None, None, None, None


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
    k, mask = validate.frame_inputs(text_features, frame_features, k, mask, same_count=True)
    backend = backends.resolve(backend, frame_features.device)
    if backend == "torch":
        return select_frames_reference(frame_features, text_features, k, mask=mask)
    # (autocast off: the C++ op's own products would otherwise run in the autocast dtype, which
    # it does not dispatch on; it computes in float32 for half inputs itself)
    with torch.no_grad(), torch.autocast(frame_features.device.type, enabled=False):
        # (raw captions: a caption's norm does not change its frames' ranking, and normalising a
        # half-precision caption first would round it and flip near-ties)
        idx = backends.get(backend).select_frames(frame_features.detach(), text_features.detach(), k, mask)
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
    if indices.numel() and indices.device.type == "cpu":  # host values are free: say which
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= x.shape[1]:
            raise ValueError(f"indices must be in [0, T) = [0, {x.shape[1]}), got values in [{lo}, {hi}]")
    elif indices.numel():  # no host sync: a device-side assertion (fails, never silently)
        torch._assert_async(((indices >= 0) & (indices < x.shape[1])).all(),
                            f"indices must be in [0, T) = [0, {x.shape[1]})")
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
    k, mask = validate.frame_inputs(text_features, frame_features, k, mask, same_count=False)
    backend = backends.resolve(backend, frame_features.device)
    if backend == "torch":
        return topk_frame_similarity_reference(text_features, frame_features, k, mask=mask)
    if k == frame_features.shape[1]:  # mean pooling (FitCLIP's): one GEMM
        text_n, mean_frames = _mean_pooling_operands(text_features, frame_features)
        return text_n @ mean_frames.T
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
    k, mask = validate.frame_inputs(text_features, frame_features, k, mask, same_count=True)
    scale, bias, eps, reduction = validate.loss_options(logit_scale, logit_bias, label_smoothing, reduction,
                                                         frame_features.device)
    backend = backends.resolve(backend, frame_features.device)
    if backend == "torch":
        dev = frame_features.device
        return video_contrastive_loss_reference(frame_features, text_features, scale.to(dev),
                                                None if bias is None else bias.to(dev), k=k, mask=mask,
                                                label_smoothing=eps, reduction=reduction)
    if k == frame_features.shape[1]:  # mean pooling: the fused InfoNCE over mean unit frames
        text_n, mean_frames = _mean_pooling_operands(text_features, frame_features)
        loss = contrastive_loss(mean_frames, text_n, scale, bias, label_smoothing=eps,
                                reduction=reduction, backend=backend)
        return loss.to(frame_features.dtype)
    loss = _VideoInfoNCE.apply(text_features, frame_features, scale, k, mask, eps, reduction, backend)
    return zero_bias_term(loss, bias)
