"""distillation_loss on the device: correctness against float64 (the rule), the benchmark against
the torch composition (log_softmax + kl_div both ways) and torch.compile of it, the autotune sweep."""
from __future__ import annotations

import torch

import fitclip_ext
from benchmarks import distill_cases
from fitclip_ext.reference import distillation_loss_reference
from fitclip_ext.testing import rule_rows

from . import harness as h

OP = "distillation_loss"


def _inputs(n, m, D, dtype, seed):
    return distill_cases.make_inputs(n, D, h.DEV, seed, m=m, dtype=dtype, scale=30.0)


def correctness() -> None:
    dtypes = [torch.float32, torch.float16, torch.float64] if h.TINY else \
        [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    shapes = [(9, 7, 16), (33, 40, 24)] if h.TINY else [(1, 1, 8), (127, 65, 65), (1000, 17, 512), (4097, 4097, 512)]
    rows = []
    for dtype in dtypes:
        for n, m, D in shapes:
            label = dict(op=OP, n=n, m=m, D=D, dtype=h.dtype_name(dtype))
            rows += h.guarded(label, lambda: _case(dtype, n, m, D, label))
    h.correctness(rows, OP)


def _case(dtype, n, m, D, label):
    sv, st, tv, tt, s = _inputs(n, m, D, dtype, n + m)
    t_scale = 66.7 if dtype in (torch.float32, torch.float64) else 8.0
    res = []
    for fn, up in ((lambda *a: fitclip_ext.distillation_loss(*a, backend="triton"), False),
                   (distillation_loss_reference, False), (distillation_loss_reference, True)):
        a = [x.detach().clone().double() if up else x.detach().clone() for x in (sv, st, s)]
        for x in a:
            x.requires_grad_()
        tvv, ttv = (tv.double(), tt.double()) if up else (tv, tt)
        out = fn(a[0], a[1], tvv, ttv, a[2], t_scale)
        res.append([out] + list(torch.autograd.grad(out, a)))
    return rule_rows(["distill_loss", "d_student_video", "d_student_text", "d_student_scale"], *res, dtype, **label)


def _runner(fn, inputs):
    sv, st, tv, tt, s = inputs

    def run():
        torch.autograd.grad(fn(sv, st, tv, tt, s, 66.7), (sv, st, s))
    return run


def benchmarks(tflops, estimate_s: float) -> None:
    dtype = torch.float32 if h.TINY else torch.bfloat16
    grid = [(64, 32)] if h.TINY else [(8192, 512), (32768, 512)]
    for B, D in grid:
        case = {"op": OP, "pass": "fwd+bwd", "B": B, "D": D, "dtype": h.dtype_name(dtype)}

        def body(case, B=B, D=D):
            inputs = _inputs(B, B, D, dtype, 0)
            big = B >= 32768
            ours = _runner(lambda *a: fitclip_ext.distillation_loss(*a, backend="triton"), inputs)
            case["median_ms"] = h.bench_ms(ours, big)
            case["peak_mb"] = h.peak_mb(ours)
            case["model_ms"] = h.model_ms("distillation_loss", B, D)  # (kernels.model: the estimate this run tests)
            if tflops:
                case["floor_ms"] = 12 * B * B * D / (tflops * 1e12) * 1e3  # 6 GEMMs of B x B x D
                case["fraction_of_floor"] = case["floor_ms"] / case["median_ms"]
            compiled = torch.compile(distillation_loss_reference) if h.DEV == "cuda" else None
            case["baselines"] = {name: h.baseline(fn, lambda f: _runner(f, inputs), big, case["median_ms"])
                                 for name, fn in (("torch", distillation_loss_reference), ("torch_compile", compiled))}

        h.run_case(case, estimate_s / len(grid), body)


def autotune(estimate_s: float) -> None:
    from .contrastive import tuned

    dtype = torch.float32 if h.TINY else torch.bfloat16
    B, D = (64, 32) if h.TINY else (16384, 512)
    case = {"op": OP + " autotune", "pass": "fwd+bwd", "B": B, "D": D, "dtype": h.dtype_name(dtype)}
    h.run_case(case, estimate_s, lambda c: tuned(c, _runner(
        lambda *a: fitclip_ext.distillation_loss(*a, backend="triton"), _inputs(B, B, D, dtype, 1))))
