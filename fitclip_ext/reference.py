"""Plain torch compositions: the oracles the kernels are tested against, and the `backend="torch"`
path. They materialise the full logits matrix (that is what the fused ops avoid)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def contrastive_loss_reference(image_features, text_features, logit_scale, logit_bias=None, *,
                               label_smoothing=0.0, reduction="mean", upcast=False):
    """open_clip's ClipLoss: (CE(L, arange) + CE(L.T, arange)) / 2, L = scale * I @ T.T + bias.
    reduction="none" gives [B], entry i the mean of image i's and caption i's losses."""
    i, t = _upcast(image_features, upcast), _upcast(text_features, upcast)
    logits = logit_scale * i @ t.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(i.shape[0], device=i.device)
    per_image = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    per_text = F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing, reduction=reduction)
    return (per_image + per_text) / 2
