"""Error measures of PERFORMANCE.md: relative error against float64 truth, and the tolerance
rule "kernel error <= 2 x (same computation naively in torch at the same dtype) + per-dtype term"."""
from __future__ import annotations

import torch

# Small per-dtype term of the tolerance rule.
DTYPE_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    if den == 0:
        return num
    return num / den


def assert_within_rule(name: str, kernel_out, naive_out, truth, dtype: torch.dtype) -> None:
    """Fails with the first mismatching entries printed."""
    k_err = rel_err(kernel_out, truth)
    n_err = rel_err(naive_out, truth)
    bound = 2 * n_err + DTYPE_ATOL[dtype]
    if not (k_err <= bound):  # also catches NaN
        diff = (kernel_out.detach().double().cpu() - truth.detach().double().cpu()).abs().reshape(-1)
        worst = torch.topk(diff, min(5, diff.numel())).indices
        rows = [
            f"  [{i}] kernel={kernel_out.detach().reshape(-1)[i].item():.8g} truth={truth.detach().reshape(-1)[i].item():.8g}"
            for i in worst.tolist()
        ]
        raise AssertionError(
            f"{name}: relative error {k_err:.3e} > bound {bound:.3e} (naive {dtype} torch: {n_err:.3e})\n" + "\n".join(rows)
        )
