"""Error measures of the test suite: relative error against float64 truth, and the tolerance
rule "kernel error <= 2 x (same computation naively in torch at the same dtype) + per-dtype term"
(docs/TESTING.md). Every check records its margin (error / bound); the session summary lists
the tightest, so a change that eats a margin shows before it fails on another CPU."""
from __future__ import annotations

import math
import os

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


# (test id, quantity, error / bound) of every check this session; see tests/conftest.py.
MARGINS: list[tuple[str, str, float]] = []


def assert_within_rule(name: str, kernel_out, naive_out, truth, dtype: torch.dtype) -> None:
    """Fails with the first mismatching entries printed."""
    k_err = rel_err(kernel_out, truth)
    n_err = rel_err(naive_out, truth)
    bound = 2 * n_err + DTYPE_ATOL[dtype]
    if math.isfinite(bound):  # an infinite bound (the naive result overflowed: fp16 sums) bounds nothing
        MARGINS.append((os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0], name, k_err / bound))
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
