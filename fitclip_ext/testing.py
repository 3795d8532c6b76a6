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


def rule_bound(naive_err: float, dtype: torch.dtype, tf32: bool = False) -> float:
    """2 x the naive error + the dtype's term; where the naive result is not finite (it overflowed,
    e.g. a float16 sum past 65504) or its error is NaN, it bounds nothing and the dtype's own term
    alone is the bound: a kernel result is then held to the dtype's precision, never waved through."""
    bound = 2 * naive_err + atol(dtype, tf32)
    return bound if math.isfinite(bound) else atol(dtype, tf32)


def _overflow_split(out: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype):
    """For a result whose float64 truth is partly beyond the dtype's largest finite value: (whether
    every such entry is an infinity of the truth's sign, the mask of the in-range entries)."""
    o, t = out.detach().double().cpu().reshape(-1), truth.detach().double().cpu().reshape(-1)
    big = t.abs() > torch.finfo(dtype).max
    if not bool(big.any()):
        raise AssertionError("overflow=True, but the float64 truth is within the dtype's range: nothing overflows")
    ok = bool((torch.isinf(o[big]) & (torch.sign(o[big]) == torch.sign(t[big]))).all())
    return ok, ~big


def rule_rows(names, ours, naive, truth, torch_dtype: torch.dtype, tf32: bool = False, **label) -> list[dict]:
    """One record per quantity (label: its fields, e.g. op and shape): its error, the naive error,
    the bound, and whether the rule holds at `torch_dtype` (a non-finite bound is the dtype's term,
    as in assert_within_rule; NaN never passes)."""
    rows = []
    for what, o, nv, t in zip(names, ours, naive, truth):
        e, ne = rel_err(o, t), rel_err(nv, t)
        bound = rule_bound(ne, torch_dtype, tf32)
        rows.append({**label, "what": what, "rel_err": e, "naive_rel_err": ne, "bound": bound, "ok": bool(e <= bound)})
    return rows


# (test id, quantity, error / bound) of every check this session; see tests/conftest.py.
MARGINS: list[tuple[str, str, float]] = []


def assert_within_rule(name: str, kernel_out, naive_out, truth, dtype: torch.dtype, *, overflow: bool = False) -> None:
    """Fails with the first mismatching entries printed. A non-finite kernel result fails unless
    the test says `overflow=True` because the float64 truth itself lies beyond the dtype's range:
    then those entries must be infinities of the truth's sign and the others are held to the rule."""
    if overflow:
        signs_ok, keep = _overflow_split(kernel_out, truth, dtype)
        if not signs_ok:
            raise AssertionError(f"{name}: entries whose truth overflows {dtype} are not infinities of its sign")
        kernel_out, naive_out, truth = (x.detach().double().cpu().reshape(-1)[keep] for x in (kernel_out, naive_out, truth))
        if kernel_out.numel() == 0:
            return
    k_err = rel_err(kernel_out, truth)
    n_err = rel_err(naive_out, truth)
    bound = rule_bound(n_err, dtype)
    MARGINS.append((os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0], name, k_err / bound))
    if not (k_err <= bound):  # also catches NaN
        diff = (kernel_out.detach().double().cpu() - truth.detach().double().cpu()).abs().reshape(-1)
        diff = torch.nan_to_num(diff, nan=math.inf)
        worst = torch.topk(diff, min(5, diff.numel())).indices
        rows = [
            f"  [{i}] kernel={kernel_out.detach().reshape(-1)[i].item():.8g} truth={truth.detach().reshape(-1)[i].item():.8g}"
            for i in worst.tolist()
        ]
        raise AssertionError(
            f"{name}: relative error {k_err:.3e} > bound {bound:.3e} (naive {dtype} torch: {n_err:.3e})\n" + "\n".join(rows)
        )
