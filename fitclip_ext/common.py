"""What the loss modules and backends share: the compute dtype, chunked O(n * D) helpers, and the
InfoNCE reductions and upstream weights (one definition for the image-text and video losses)."""
from __future__ import annotations

import torch

ROW_CHUNK = 4096  # rows per chunk of the O(n * D) helpers, bounding their temporaries


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float type."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_features(backend: str, *features: torch.Tensor):
    """The features a fused loss computes with, and the dtype of the loss it returns.

    Under torch.autocast on the features' device (CUDA or CPU), floating features other than
    float64 enter the fused backends in the autocast dtype, as torch.matmul would cast them, and
    the loss comes back in float32 (autocast runs softmax and cross-entropy in float32). Outside
    autocast the features' dtype rules. The reference backend ("torch") is left to autocast itself.
    Returns (features, loss dtype)."""
    x = features[0]
    dev = x.device.type
    if backend == "torch" or x.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return features, x.dtype
    low = torch.get_autocast_dtype(dev)
    return tuple(f.to(low) for f in features), torch.float32


def rowdot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_d a[i, d] * b[i, d] (b may be a broadcast [D] vector) in `dtype`, chunked over rows."""
    out = torch.empty(a.shape[0], dtype=dtype, device=a.device)
    for r0 in range(0, a.shape[0], ROW_CHUNK):
        r1 = min(a.shape[0], r0 + ROW_CHUNK)
        bb = b if b.dim() == 1 else b[r0:r1]
        out[r0:r1] = (a[r0:r1].to(dtype) * bb.to(dtype)).sum(-1)
    return out


def row_norms(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Euclidean norms of x's last-dimension rows (x [..., D] -> [...]) in `dtype`, in slices of
    the leading dimension so no full-precision copy of a half-precision x is made."""
    out = torch.empty(x.shape[:-1], device=x.device, dtype=dtype)
    step = max(1, (1 << 24) // max(1, x[0].numel()))
    for r0 in range(0, x.shape[0], step):
        out[r0:r0 + step] = torch.linalg.vector_norm(x[r0:r0 + step], dim=-1, dtype=dtype)
    return out


def reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    """"none" | "sum" | "mean" of a per-item loss."""
    return per_item if reduction == "none" else per_item.sum() if reduction == "sum" else per_item.mean()


def upstream_weights(grad_out: torch.Tensor, n: int, reduction: str, symmetric: bool, dtype: torch.dtype):
    """The weight of each row's cross-entropy in the loss's gradient ([n], contiguous): the
    upstream gradient through the reduction, halved for the symmetric (row + column) losses."""
    half = 0.5 if symmetric else 1.0
    g = grad_out.to(dtype)
    if reduction == "none":
        return (g * half).contiguous()
    return (g * (half / n if reduction == "mean" else half)).expand(n).contiguous()


def symmetric_cross_entropy(row_lse, col_lse, positive, row_mean, col_mean, eps: float):
    """Per-pair loss (CE_row_i + CE_col_i) / 2 of a square logit matrix from its log-sum-exps,
    positive logits, and row/column means (used only with label smoothing eps)."""
    row_ce = row_lse - (1 - eps) * positive
    col_ce = col_lse - (1 - eps) * positive
    if eps:
        row_ce = row_ce - eps * row_mean
        col_ce = col_ce - eps * col_mean
    return (row_ce + col_ce) / 2


def smoothed_cross_entropy(gap, lse, mean, eps: float):
    """Cross-entropy with label smoothing eps, lse - (1 - eps) * positive - eps * mean, from
    gap = lse - positive: (1 - eps) * gap + eps * (lse - mean). Both terms are >= 0, so a gap
    that is exact near 0 (aligned pairs at a large scale) keeps the loss exact there."""
    return gap if not eps else (1 - eps) * gap + eps * (lse - mean)


def zero_bias_term(loss: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax cross-entropy is shift invariant: the bias only propagates NaN/inf and gets a zero
    gradient, exactly as with the logits materialised."""
    if bias is None:
        return loss
    return loss + (bias * 0).to(device=loss.device, dtype=loss.dtype)


def kl_divisors(reduction: str, n: int, m: int) -> tuple[int, int]:
    """torch.nn.functional.kl_div's divisors of the row and the column KL sums of an n x m loss."""
    return {"batchmean": (n, m), "sum": (1, 1), "mean": (n * m, n * m)}[reduction]
