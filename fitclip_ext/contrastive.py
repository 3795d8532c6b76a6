"""Memory-efficient InfoNCE: `contrastive_loss` (CLIP's symmetric loss) and `infonce` (one
direction, rectangular, for distributed local losses).

Only the log-sum-exp of each row (and column) of L = s * Q @ K^T needs the B x B products; the
backends compute those in tiles. Everything else in the loss and its gradient (positive logits,
label-smoothing terms, the one-hot parts of dL) is O(B * D) and is done here, shared by every
backend:

    CE_i = lse_i - (1 - eps) * L[i, p_i] - eps * mean_j L[i, j]
    dLoss/dL = diag(w) softmax_rows(L) - (1 - eps) w_i [j = p_i] - eps / m * w_i      (rows)
             + softmax_cols(L) diag(v) - (1 - eps) v_j [i = j] - eps / n * v_j      (columns)

with w, v the per-row/per-column upstream weights. The bias cancels out of the loss (softmax is
shift invariant) and so gets a zero gradient.
"""
from __future__ import annotations

import torch

from . import _backend, _validate
from .reference import contrastive_loss_reference, infonce_reference

_ROW_CHUNK = 4096  # rows per chunk of the O(n*D) helpers, bounding their temporaries


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rowdot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_d a[i, d] * b[i, d] (b may be a broadcast [D] vector) in `dtype`, chunked over rows."""
    out = torch.empty(a.shape[0], dtype=dtype, device=a.device)
    for r0 in range(0, a.shape[0], _ROW_CHUNK):
        r1 = min(a.shape[0], r0 + _ROW_CHUNK)
        bb = b if b.dim() == 1 else b[r0:r1]
        out[r0:r1] = (a[r0:r1].to(dtype) * bb.to(dtype)).sum(-1)
    return out


def _ops(backend: str):
    """The two tiled primitives of a backend:
    lse(query, keys, scale, with_col) -> (row_lse [n], col_lse [m] or None), float32/float64;
    grad(query, keys, scale, row_lse, row_w, col_lse, col_w, offset=, eps=) -> (dQ, dK, dscale)."""
    if backend == "cpp":
        return _CppOps
    if backend == "triton":
        from fitclip_ext.kernels import infonce as triton_infonce

        return triton_infonce
    raise AssertionError(backend)


class _CppOps:
    """csrc/infonce.cpp computes the log-sum-exps and the softmax part of the gradient; the
    one-hot and label-smoothing parts are O(n * D) and are added here, in place."""

    @staticmethod
    def lse(query, keys, scale, with_col):
        s = scale.detach().to(device="cpu", dtype=torch.float64)
        row_lse, col_lse = torch.ops.fitclip_ext.infonce_lse(query, keys, s, with_col)
        return row_lse, (col_lse if with_col else None)

    @staticmethod
    def grad(query, keys, scale, row_lse, row_w, col_lse, col_w, *, offset, eps):
        ct = _compute_dtype(query)
        n, m = query.shape[0], keys.shape[0]
        symmetric = col_lse is not None
        s = scale.detach().to(device="cpu", dtype=torch.float64)
        gk, gtq = torch.ops.fitclip_ext.infonce_grad(query, keys, s, row_lse, row_w, col_lse, col_w)
        pos_w = (1 - eps) * row_w * (2 if symmetric else 1)  # column j's positive is row j
        for r0 in range(0, n, _ROW_CHUNK):  # in place, chunked: no [n, D] temporaries
            r1 = min(n, r0 + _ROW_CHUNK)
            gk[r0:r1].addcmul_(pos_w[r0:r1, None], keys[offset + r0:offset + r1].to(ct), value=-1)
            gtq[offset + r0:offset + r1].addcmul_(pos_w[r0:r1, None], query[r0:r1].to(ct), value=-1)
        if eps:
            gk -= (eps / m) * row_w[:, None] * keys.sum(0, dtype=ct)
            gtq -= (eps / m) * (row_w @ query.to(ct))
            if symmetric:
                gtq -= (eps / n) * col_w[:, None] * query.sum(0, dtype=ct)
                gk -= (eps / n) * (col_w @ keys.to(ct))
        grad_scale = _rowdot(query, gk, ct).sum()  # sum_ij G_ij S_ij = sum_i Q_i . (G K)_i
        s_c = scale.detach().to(dtype=ct)
        return gk.mul_(s_c).to(query.dtype), gtq.mul_(s_c).to(keys.dtype), grad_scale


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, scale, symmetric, offset, eps, reduction, backend):
        ops = _ops(backend)
        ct = _compute_dtype(query)
        n, m = query.shape[0], keys.shape[0]
        s_c = scale.detach().to(device=query.device, dtype=ct)
        row_lse, col_lse = ops.lse(query, keys, scale, symmetric)
        pos = s_c * _rowdot(query, keys[offset:offset + n], ct)
        row_ce = row_lse - (1 - eps) * pos
        if eps:
            row_ce = row_ce - eps / m * s_c * _rowdot(query, keys.sum(0, dtype=ct), ct)
        if symmetric:
            col_ce = col_lse - (1 - eps) * pos
            if eps:
                col_ce = col_ce - eps / n * s_c * _rowdot(keys, query.sum(0, dtype=ct), ct)
            per_item = (row_ce + col_ce) / 2
        else:
            per_item = row_ce
        loss = per_item if reduction == "none" else per_item.sum() if reduction == "sum" else per_item.mean()
        ctx.save_for_backward(query, keys, scale, row_lse, col_lse)
        ctx.config = (symmetric, offset, eps, reduction, backend)
        return loss.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, keys, scale, row_lse, col_lse = ctx.saved_tensors
        symmetric, offset, eps, reduction, backend = ctx.config
        ct = _compute_dtype(query)
        n = query.shape[0]
        # Upstream weight of each row's (and column's) cross-entropy.
        half = 0.5 if symmetric else 1.0
        g = grad_out.to(ct)
        if reduction == "none":
            row_w = (g * half).contiguous()
        else:
            row_w = (g * (half / n if reduction == "mean" else half)).expand(n).contiguous()
        col_w = row_w if symmetric else None
        grad_q, grad_k, grad_s = _ops(backend).grad(query, keys, scale, row_lse, row_w, col_lse, col_w,
                                                    offset=offset, eps=eps)
        grad_scale = grad_s.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return (grad_q if ctx.needs_input_grad[0] else None, grad_k if ctx.needs_input_grad[1] else None,
                grad_scale, None, None, None, None, None)


def _zero_bias_term(loss: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Softmax cross-entropy is shift invariant: the bias only propagates NaN/inf and gets a
    # zero gradient, exactly as with the logits materialised.
    if bias is None:
        return loss
    return loss + (bias * 0).to(device=loss.device, dtype=loss.dtype)


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
    Returns the loss in the features' dtype; never stores the n x m logits (fused backends).
    """
    _validate.features("query", query)
    _validate.features("keys", keys)
    _validate.same_device_dtype(("query", "keys"), query, keys)
    if query.shape[1] != keys.shape[1]:
        raise ValueError(f"query and keys must have the same feature size D, got {query.shape[1]} and {keys.shape[1]}")
    if isinstance(positive_offset, bool) or not isinstance(positive_offset, int):
        raise TypeError(f"positive_offset must be an int, got {type(positive_offset).__name__}")
    if not 0 <= positive_offset <= keys.shape[0] - query.shape[0]:
        raise ValueError(
            f"positive_offset must be in [0, m - n] = [0, {keys.shape[0] - query.shape[0]}] so that every "
            f"query's positive key exists (n={query.shape[0]}, m={keys.shape[0]}), got {positive_offset}"
        )
    scale, bias, eps, reduction = _validate.loss_options(logit_scale, logit_bias, label_smoothing, reduction,
                                                         query.device)
    backend = _backend.resolve(backend, query.device)
    if backend == "torch":
        return infonce_reference(query, keys, scale.to(query.device), bias if bias is None else bias.to(query.device),
                                 positive_offset=positive_offset, label_smoothing=eps, reduction=reduction)
    loss = _InfoNCE.apply(query, keys, scale, False, positive_offset, eps, reduction, backend)
    return _zero_bias_term(loss, bias)


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
    Returns the loss in the features' dtype. Memory O(B * D): the B x B logits are never stored.
    """
    _validate.features("image_features", image_features)
    _validate.features("text_features", text_features)
    _validate.same_device_dtype(("image_features", "text_features"), image_features, text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must have the same shape [B, D], got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    scale, bias, eps, reduction = _validate.loss_options(logit_scale, logit_bias, label_smoothing, reduction,
                                                         image_features.device)
    backend = _backend.resolve(backend, image_features.device)
    if backend == "torch":
        dev = image_features.device
        return contrastive_loss_reference(image_features, text_features, scale.to(dev),
                                          bias if bias is None else bias.to(dev),
                                          label_smoothing=eps, reduction=reduction)
    loss = _InfoNCE.apply(image_features, text_features, scale, True, 0, eps, reduction, backend)
    return _zero_bias_term(loss, bias)
