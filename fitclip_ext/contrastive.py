"""Memory-efficient InfoNCE: `contrastive_loss` (CLIP's symmetric loss) and `infonce` (one
direction, rectangular, for distributed local losses).

Only the log-sum-exp of each row (and column) of L = s * Q @ K^T needs the n x m products; the
backends compute those in tiles (`contrastive_lse`), and the full logit gradient tile by tile
(`contrastive_grad`, the contract in fitclip_ext/backends/__init__.py):

    CE_i = lse_i - (1 - eps) * L[i, p_i] - eps * mean_j L[i, j]
    dLoss/dL = diag(w) softmax_rows(L) - (1 - eps) w_i [j = p_i] - eps / m * w_i      (rows)
             + softmax_cols(L) diag(v) - (1 - eps) v_j [i = j] - eps / n * v_j      (columns)

with w, v the per-row/per-column upstream weights. The backends return each row's (and column's)
lse - L[i, p_i] directly (`gap`, >= 0); the label-smoothing means are O(n * D) and are computed
here. The bias cancels out of the loss (softmax is shift invariant) and so gets a zero gradient.
"""
from __future__ import annotations

import torch

from . import backends, validate
from .common import (autocast_features, compute_dtype, reduce, rowdot, smoothed_cross_entropy, upstream_weights,
                     zero_bias_term)
from .reference import contrastive_loss_reference, infonce_reference


class _Contrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, scale, symmetric, offset, eps, reduction, backend, out_dtype):
        with torch.autocast(query.device.type, enabled=False):  # (autocast_features chose the precision)
            return _Contrastive._forward(ctx, query, keys, scale, symmetric, offset, eps, reduction, backend, out_dtype)

    @staticmethod
    def _forward(ctx, query, keys, scale, symmetric, offset, eps, reduction, backend, out_dtype):
        ops = backends.get(backend)
        ct = compute_dtype(query)
        n, m = query.shape[0], keys.shape[0]
        s_c = scale.detach().to(device=query.device, dtype=ct)
        row_lse, col_lse, row_gap, col_gap = ops.contrastive_lse(query, keys, scale, symmetric, offset)
        row_mean = s_c * rowdot(query, keys.sum(0, dtype=ct), ct) / m if eps else None
        per_item = smoothed_cross_entropy(row_gap, row_lse, row_mean, eps)
        if symmetric:
            col_mean = s_c * rowdot(keys, query.sum(0, dtype=ct), ct) / n if eps else None
            per_item = (per_item + smoothed_cross_entropy(col_gap, col_lse, col_mean, eps)) / 2
        ctx.save_for_backward(query, keys, scale, row_lse, col_lse)
        ctx.config = (symmetric, offset, eps, reduction, backend)
        return reduce(per_item, reduction).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _Contrastive._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        query, keys, scale, row_lse, col_lse = ctx.saved_tensors
        symmetric, offset, eps, reduction, backend = ctx.config
        row_w = upstream_weights(grad_out, query.shape[0], reduction, symmetric, compute_dtype(query))
        col_w = row_w if symmetric else None
        grad_q, grad_k, grad_s = backends.get(backend).contrastive_grad(query, keys, scale, row_lse, row_w, col_lse,
                                                                    col_w, offset=offset, eps=eps)
        grad_scale = grad_s.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return (grad_q if ctx.needs_input_grad[0] else None, grad_k if ctx.needs_input_grad[1] else None,
                grad_scale, None, None, None, None, None, None)


def infonce(query, keys, logit_scale, logit_bias=None, *, positive_offset=0, label_smoothing=0.0,
            reduction="mean", backend=None):
    """Cross-entropy of each query against all keys; the positive of query i is key
    `positive_offset + i` (open_clip's local loss: local rows against gathered columns).

    Args:
        query: [n, D] float tensor (float32, float64, bfloat16, float16).
        keys: [m, D], same dtype and device, m >= positive_offset + n.
        logit_scale: the (already exponentiated) scale, a number or 0-d/1-element tensor.
        logit_bias: optional scalar added to every logit.
        positive_offset: int, index of query 0's positive key.
        label_smoothing: in [0, 1), as in torch.nn.functional.cross_entropy.
        reduction: "mean" | "sum" | "none" ([n]).
        backend: None (auto), "triton", "cpp" or "torch" (reference, materialises n x m).
    Returns the loss in the features' dtype (float32 under torch.autocast, whose dtype the fused
    backends then compute the products in, as a matmul would); never stores the n x m logits.
    """
    validate.features("query", query)
    validate.features("keys", keys)
    validate.same_device_dtype(("query", "keys"), query, keys)
    if query.shape[1] != keys.shape[1]:
        raise ValueError(f"query and keys must have the same feature size D, got {query.shape[1]} and {keys.shape[1]}")
    validate.positive_offset(positive_offset, query.shape[0], keys.shape[0], "query", "key")
    scale, bias, eps, reduction = validate.loss_options(logit_scale, logit_bias, label_smoothing, reduction,
                                                         query.device)
    backend = backends.resolve(backend, query.device)
    if backend == "torch":
        return infonce_reference(query, keys, scale.to(query.device), bias if bias is None else bias.to(query.device),
                                 positive_offset=positive_offset, label_smoothing=eps, reduction=reduction)
    (query, keys), out_dtype = autocast_features(backend, query, keys)
    loss = _Contrastive.apply(query, keys, scale, False, positive_offset, eps, reduction, backend, out_dtype)
    return zero_bias_term(loss, bias)


def contrastive_loss(image_features, text_features, logit_scale, logit_bias=None, *, label_smoothing=0.0,
                     reduction="mean", backend=None):
    """CLIP's symmetric InfoNCE, a drop-in for open_clip's ClipLoss / Hugging Face's clip_loss:
    (CE(L, arange(B)) + CE(L.T, arange(B))) / 2 with L = logit_scale * I @ T.T + logit_bias.

    Args:
        image_features, text_features: [B, D] float tensors (float32, float64, bfloat16, float16),
            same dtype and device, used as given (normalise them first, as open_clip does).
        logit_scale: the (already exponentiated) scale, a number or 0-d/1-element tensor; gets a
            gradient when it requires one.
        logit_bias: optional scalar added to every logit.
        label_smoothing: in [0, 1), as in torch.nn.functional.cross_entropy.
        reduction: "mean" | "sum" | "none" ([B], mean of image i's and caption i's losses).
        backend: None (auto: "triton" on CUDA, "cpp" on CPU), or "triton", "cpp", "torch".
    Returns the loss in the features' dtype; under torch.autocast (CUDA or CPU) float32 features
    are multiplied in the autocast dtype, as open_clip's matmul would be, and the loss is float32.
    Memory O(B * D): the B x B logits are never stored.
    """
    validate.features("image_features", image_features)
    validate.features("text_features", text_features)
    validate.same_device_dtype(("image_features", "text_features"), image_features, text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must have the same shape [B, D], got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    scale, bias, eps, reduction = validate.loss_options(logit_scale, logit_bias, label_smoothing, reduction,
                                                         image_features.device)
    backend = backends.resolve(backend, image_features.device)
    if backend == "torch":
        dev = image_features.device
        return contrastive_loss_reference(image_features, text_features, scale.to(dev),
                                          bias if bias is None else bias.to(dev),
                                          label_smoothing=eps, reduction=reduction)
    (image_features, text_features), out_dtype = autocast_features(backend, image_features, text_features)
    loss = _Contrastive.apply(image_features, text_features, scale, True, 0, eps, reduction, backend, out_dtype)
    return zero_bias_term(loss, bias)
