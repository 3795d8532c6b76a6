"""The project's numerics rule, shared by the test suite and the GPU check
(benchmarks/gpu_check.py): relative error against float64 truth, and

    kernel error <= 2 x (the same computation naively in torch at the same dtype) + a per-dtype term

(docs/TESTING.md explains why). Every `assert_within_rule` records its margin (error / bound);
the test session's summary lists the tightest, so a change that eats a margin shows before it
fails on another CPU.
"""
from __future__ import annotations

import math
import os

import torch

# Small per-dtype term of the rule; float32 tile products in TF32 (GPUs) round their operands to
# 10 mantissa bits, so they get the half-precision-sized term.
DTYPE_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TF32_ATOL = 5e-4


def atol(dtype: torch.dtype, tf32: bool = False) -> float:
    return TF32_ATOL if tf32 and dtype == torch.float32 else DTYPE_ATOL[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; absolute where the truth is exactly zero."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num if den == 0 else num / den


def rule_rows(names, ours, naive, truth, torch_dtype: torch.dtype, tf32: bool = False, **label) -> list[dict]:
    """One record per quantity (label: its fields, e.g. op and shape): its error, the naive error,
    and whether the rule holds at `torch_dtype`."""
    rows = []
    for what, o, nv, t in zip(names, ours, naive, truth):
        e, ne = rel_err(o, t), rel_err(nv, t)
        rows.append({**label, "what": what, "rel_err": e, "naive_rel_err": ne,
                     "ok": bool(e <= 2 * ne + atol(torch_dtype, tf32))})
    return rows


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
