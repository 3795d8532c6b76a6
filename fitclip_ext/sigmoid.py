"""Memory-efficient SigLIP loss: `sigmoid_loss`, the pairwise sigmoid loss of Zhai et al. (2023)
that open_clip's `SigLipLoss`, Hugging Face and big_vision compute on materialised logits.

With L = scale * image @ text^T + bias (n x m) and z_ij = +1 for the positive pair
(j = positive_offset + i) and -1 elsewhere,

    loss_i = sum_j -log sigmoid(z_ij L_ij) = sum_j softplus(-z_ij L_ij)
    dloss_i / dL_ij = sigmoid(L_ij) - [j = positive_offset + i]

No normalisation couples a row's entries, so the fused backends produce the loss and the
gradient of sum_i loss_i in one pass over row blocks of the products (backend contract
`sigmoid_loss`, fitclip_ext/backends/__init__.py): 6 * n * m * D matrix FLOPs for forward and
backward together, with no n x m matrix stored. The backward of "mean" and "sum" only scales the
saved gradient by the upstream factor; "none" has per-row upstream weights, so its backward runs
the pass again with them (8 units in all). Without any input requiring a gradient only the loss
(2 units) is computed.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import backends, validate
from .common import autocast_features, compute_dtype, reduce
from .reference import sigmoid_loss_reference


class _SigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, scale, bias, offset, reduction, backend, need_grad, out_dtype):
        ops = backends.get(backend)
        with_grad = need_grad and reduction != "none"
        with torch.autocast(query.device.type, enabled=False):  # (the backends pick their own precision)
            loss, gk, gtq, stats = ops.sigmoid_loss(query, keys, scale, bias, offset, None, with_grad)
        ctx.config = (offset, reduction, backend, query.shape[0])
        ctx.dtypes = (query.dtype, keys.dtype)
        ctx.bias_meta = (bias.device, bias.dtype)
        # With a gradient: the gradient of sum_i loss_i, known up to the upstream factor. Kept on
        # ctx (not saved for autograd) so that the first backward can scale it in place and hand
        # it over as the features' gradients, without a second copy; a later backward through a
        # retained graph finds it gone and runs the pass again from the saved inputs.
        ctx.grads = (gk, gtq, stats) if with_grad else None
        ctx.save_for_backward(query, keys, scale, bias)
        return reduce(loss, reduction).to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        offset, reduction, backend, n = ctx.config
        query, keys, scale, bias = ctx.saved_tensors
        if ctx.grads is not None:
            (gk, gtq, stats), ctx.grads = ctx.grads, None
            ct = gk.dtype
            c = grad_out.to(ct) / n if reduction == "mean" else grad_out.to(ct)
        else:
            ct = compute_dtype(query)
            if reduction == "none":
                w, c = grad_out.to(ct).contiguous(), torch.ones((), dtype=ct, device=grad_out.device)
            else:  # (a gradient asked for after a forward that did not expect one)
                w, c = None, grad_out.to(ct) / n if reduction == "mean" else grad_out.to(ct)  # (or a second one)
            with torch.autocast(query.device.type, enabled=False):
                _, gk, gtq, stats = backends.get(backend).sigmoid_loss(query, keys, scale, bias, offset, w, True)
        s = scale.detach().to(device=gk.device, dtype=ct).reshape(())
        need = ctx.needs_input_grad
        dq = gk.mul_(c * s).to(ctx.dtypes[0]) if need[0] else None  # (in place: these buffers are ours)
        dk = gtq.mul_(c * s).to(ctx.dtypes[1]) if need[1] else None
        # (a scale or bias may live on the CPU beside CUDA features: its gradient goes back there)
        dscale = (c * stats[0].sum()).to(device=scale.device, dtype=scale.dtype).reshape(scale.shape) if need[2] else None
        dbias = (c * stats[1].sum()).to(device=ctx.bias_meta[0], dtype=ctx.bias_meta[1]).reshape(()) if need[3] else None
        return dq, dk, dscale, dbias, None, None, None, None, None


def _apply(query, keys, scale, bias, offset, reduction, backend):
    """The fused loss; bias None -> 0 (no gradient), offset None -> -1 (negatives only). Under
    autocast the features enter in the autocast dtype (tensor-core GEMMs, as autocast runs a
    matmul) and the loss comes back in float32 (common.autocast_features)."""
    bias_t = bias if bias is not None else torch.zeros((), dtype=torch.float64)
    need = torch.is_grad_enabled() and any(t.requires_grad for t in (query, keys, scale, bias_t))
    (query, keys), out_dtype = autocast_features(backend, query, keys)
    return _SigmoidLoss.apply(query, keys, scale, bias_t, -1 if offset is None else offset, reduction, backend, need,
                              out_dtype)


def sigmoid_loss(image_features, text_features, logit_scale, logit_bias=None, *, positive_offset=0,
                 reduction="mean", backend=None):
    """SigLIP's pairwise sigmoid loss, a drop-in for the loss of open_clip's SigLipLoss:
    loss_i = -sum_j log sigmoid(z_ij * (logit_scale * <x_i, y_j> + logit_bias)), z_ij = +1 at
    j = positive_offset + i and -1 elsewhere.

    Args:
        image_features: [n, D] float tensor (float32, float64, bfloat16, float16).
        text_features: [m, D], same dtype and device (m may differ from n: local rows against
            gathered or received columns).
        logit_scale: the (already exponentiated) scale, a number or 0-d/1-element tensor.
        logit_bias: the bias, a number or 0-d/1-element tensor (None: 0); both get gradients when
            they require them.
        positive_offset: int, index of image 0's positive text (0 <= offset <= m - n), or None
            for a block of negatives only (as the blocks received from other ranks are).
        reduction: "mean" (sum over all pairs / n, as open_clip), "sum", or "none" ([n]).
        backend: None (auto: "triton" on CUDA, "cpp" on CPU), or "triton", "cpp", "torch"
            (the reference, which materialises the n x m logits).
    Returns the loss in the features' dtype. Memory O((n + m) * D) on the fused backends.
    """
    validate.features("image_features", image_features)
    validate.features("text_features", text_features)
    validate.same_device_dtype(("image_features", "text_features"), image_features, text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError("image_features and text_features must have the same feature size D, got "
                         f"{image_features.shape[1]} and {text_features.shape[1]}")
    validate.positive_offset(positive_offset, n, m, "image", "text", allow_none=True)
    dev = image_features.device
    scale = validate.scale("logit_scale", logit_scale, dev)
    # (the bias does not cancel here as in a softmax: it must be finite like the scale)
    bias = None if logit_bias is None else validate.scale("logit_bias", logit_bias, dev)
    reduction = validate.reduction(reduction)
    backend = backends.resolve(backend, dev)
    if backend == "torch":
        return sigmoid_loss_reference(image_features, text_features, scale.to(dev),
                                      bias if bias is None else bias.to(dev), positive_offset=positive_offset,
                                      reduction=reduction)
    return _apply(image_features, text_features, scale, bias, positive_offset, reduction, backend)
