"""Plain torch compositions: the oracles the kernels are tested against, and the `backend="torch"`
path. They materialise the full logits matrix (that is what the fused ops avoid)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import kl_divisors


def _upcast(x: torch.Tensor, upcast: bool) -> torch.Tensor:
    return x.double() if upcast else x


def infonce_reference(query, keys, logit_scale, logit_bias=None, *, positive_offset=0,
                      label_smoothing=0.0, reduction="mean", upcast=False):
    """Cross-entropy of each query row i [n, D] against all keys [m, D], positive key
    `positive_offset + i`, logits `logit_scale * query @ keys.T + logit_bias`."""
    q, k = _upcast(query, upcast), _upcast(keys, upcast)
    logits = logit_scale * q @ k.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(q.shape[0], device=q.device) + positive_offset
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)


def _symmetric_ce(logits, label_smoothing, reduction):
    """(CE(L, arange) + CE(L.T, arange)) / 2 over a square logits matrix."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    per_row = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    per_col = F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing, reduction=reduction)
    return (per_row + per_col) / 2


def contrastive_loss_reference(image_features, text_features, logit_scale, logit_bias=None, *,
                               label_smoothing=0.0, reduction="mean", upcast=False):
    """open_clip's ClipLoss: (CE(L, arange) + CE(L.T, arange)) / 2, L = scale * I @ T.T + bias.
    reduction="none" gives [B], entry i the mean of image i's and caption i's losses."""
    i, t = _upcast(image_features, upcast), _upcast(text_features, upcast)
    logits = logit_scale * i @ t.T
    if logit_bias is not None:
        logits = logits + logit_bias
    return _symmetric_ce(logits, label_smoothing, reduction)


def _normalize(x, upcast):
    return F.normalize(_upcast(x, upcast), dim=-1)


def _topk_desc_stable(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, ties to the earlier index."""
    return torch.sort(sims, dim=-1, descending=True, stable=True).indices[..., :k]


def select_frames_reference(frame_features, text_features, k, *, mask=None, upcast=False):
    """For each caption b, the k frames of video b most similar to it (cosine), returned in
    ascending time order with their similarities: (indices [B, k] int64, scores [B, k])."""
    f, t = _normalize(frame_features, upcast), _normalize(text_features, upcast)
    sims = torch.einsum("btd,bd->bt", f, t)
    if mask is not None:
        sims = sims.masked_fill(~mask, float("-inf"))
    idx = _topk_desc_stable(sims, k).sort(dim=-1).values
    return idx, sims.gather(1, idx)


def topk_frame_similarity_reference(text_features, frame_features, k, *, mask=None, upcast=False):
    """[C, V]: mean of the k largest caption-frame cosine similarities of each caption and video
    (einsum -> C x V x T, stable sort, mean); with k = T, mean pooling of frame similarities."""
    t, f = _normalize(text_features, upcast), _normalize(frame_features, upcast)
    sims = torch.einsum("cd,vtd->cvt", t, f)
    if mask is not None:
        sims = sims.masked_fill(~mask[None], float("-inf"))
    return sims.gather(-1, _topk_desc_stable(sims.detach(), k)).mean(-1)


def video_contrastive_loss_reference(frame_features, text_features, logit_scale, logit_bias=None, *, k,
                                     mask=None, label_smoothing=0.0, reduction="mean", upcast=False):
    """Symmetric InfoNCE over video-text logits scale * topk_frame_similarity(text, frames, k) + bias
    (rows: videos, columns: captions; pair i is video i with caption i)."""
    sim = topk_frame_similarity_reference(text_features, frame_features, k, mask=mask, upcast=upcast)
    logits = logit_scale * sim.T
    if logit_bias is not None:
        logits = logits + logit_bias
    return _symmetric_ce(logits, label_smoothing, reduction)


def distillation_loss_reference(student_video, student_text, teacher_video, teacher_text, student_scale,
                                teacher_scale, *, reduction="batchmean", upcast=False):
    """FitCLIP's unlabeled loss: (KL(softmax(T) || softmax(S)) over rows + the same over columns) / 2
    * teacher_scale^2, with S = student_scale * student_video @ student_text.T and
    T = teacher_scale * teacher_video @ teacher_text.T (torch.nn.functional.kl_div's reductions)."""
    sv, st = _upcast(student_video, upcast), _upcast(student_text, upcast)
    tv, tt = _upcast(teacher_video, upcast), _upcast(teacher_text, upcast)
    s = student_scale * sv @ st.T
    t = teacher_scale * tv @ tt.T
    n, m = s.shape
    div_rows, div_cols = kl_divisors(reduction, n, m)
    rows = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="sum") / div_rows
    cols = F.kl_div(F.log_softmax(s.T, 1), F.log_softmax(t.T, 1), log_target=True, reduction="sum") / div_cols
    return (rows + cols) / 2 * teacher_scale**2


def sigmoid_loss_reference(image_features, text_features, logit_scale, logit_bias=None, *, positive_offset=0,
                           reduction="mean", upcast=False):
    """open_clip's SigLipLoss: -sum log sigmoid(z * L) with L = scale * I @ T.T + bias, z = +1 at
    (i, positive_offset + i) and -1 elsewhere (positive_offset None: all -1); "mean" divides the
    sum by the number of rows, "none" gives each row's sum [n]."""
    i, t = _upcast(image_features, upcast), _upcast(text_features, upcast)
    logits = logit_scale * i @ t.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n, m = logits.shape
    z = -torch.ones(n, m, dtype=logits.dtype, device=logits.device)
    if positive_offset is not None:
        rows = torch.arange(n, device=logits.device)
        z[rows, rows + positive_offset] = 1
    per_row = -F.logsigmoid(z * logits).sum(1)
    return per_row if reduction == "none" else per_row.sum() if reduction == "sum" else per_row.sum() / n
