"""sigmoid_loss (SigLIP) on the device: correctness against float64 (the rule) and the benchmark
beside open_clip's SigLipLoss, torch.compile of the plain composition and siglip-kernel."""
from __future__ import annotations

import torch

import fitclip_ext
from benchmarks import sigmoid_cases
from fitclip_ext.reference import sigmoid_loss_reference
from fitclip_ext.testing import rule_rows

from . import harness as h
from . import peers

OP = "sigmoid_loss"


def correctness() -> None:
    """Odd shapes, rectangular with an offset and negatives only, each reduction and dtype; the
    aligned pairs give large positive logits."""
    dtypes = [torch.float32, torch.float16, torch.float64] if h.TINY else \
        [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    shapes = [(9, 9, 16, 0), (20, 33, 24, 7), (17, 30, 8, None)] if h.TINY else \
        [(1, 1, 8, 0), (127, 127, 65, 0), (1000, 3000, 512, 1000), (777, 4097, 768, None), (8191, 8191, 512, 0)]
    rows = []
    for dtype in dtypes:
        for n, m, D, off in shapes:
            for reduction in ("mean", "none"):
                label = dict(op=OP, n=n, m=m, D=D, offset=off, reduction=reduction, dtype=h.dtype_name(dtype))
                rows += h.guarded(label, lambda: _case(dtype, n, m, D, off, reduction, label))
    h.correctness(rows, OP)


def _case(dtype, n, m, D, off, reduction, label):
    img, txt, s, b = sigmoid_cases.make_inputs(max(n, m), D, dtype, h.DEV, seed=n + m)
    img, txt = img.detach()[:n], txt.detach()[:m].clone()
    if off is not None:
        txt[off:off + n] = torch.nn.functional.normalize(img.float() + 0.5 * txt[off:off + n].float(), dim=-1).to(dtype)
    leaves = [img.requires_grad_(), txt.requires_grad_(), s, b]
    kw = dict(positive_offset=off, reduction=reduction)
    res = []
    for fn, up in ((lambda *a: fitclip_ext.sigmoid_loss(*a, backend="triton", **kw), False),
                   (lambda *a: sigmoid_loss_reference(*a, **kw), False),
                   (lambda *a: sigmoid_loss_reference(*a, upcast=True, **kw), True)):
        x = [t.detach().double().requires_grad_() for t in leaves] if up else leaves
        out = fn(*x)
        w = torch.linspace(0.5, 1.5, out.numel(), device=h.DEV, dtype=out.dtype).reshape(out.shape)
        res.append([out, *torch.autograd.grad((out * w).sum(), x)])
    return rule_rows(["loss", "d_image", "d_text", "d_scale", "d_bias"], *res, dtype, **label)


def benchmark(B: int, D: int, names: tuple[str, ...], estimate_s: float, tflops) -> None:
    """fwd+bwd of ours at (B, D) (bf16 on the GPU) beside each named baseline or peer, and our
    fraction of the 6 B^2 D floor at the measured GEMM rate."""
    dtype = torch.float32 if h.TINY else torch.bfloat16
    case = {"op": OP, "pass": "fwd+bwd", "B": B, "D": D, "dtype": h.dtype_name(dtype)}

    def body(case):
        inputs = sigmoid_cases.make_inputs(B, D, dtype, h.DEV)
        big = B >= 131072
        ours = sigmoid_cases.fwd_bwd(lambda *a: fitclip_ext.sigmoid_loss(*a, backend="triton"), inputs)
        case["median_ms"] = h.bench_ms(ours, big, reps=1 if B > 131072 else 3)
        case["peak_mb"] = h.peak_mb(ours)
        case["model_ms"] = h.model_ms("sigmoid_loss", B, D)  # (kernels.model: the estimate this run tests)
        if tflops:
            case["floor_ms"] = 6 * B * B * D / (tflops * 1e12) * 1e3
            case["fraction_of_floor"] = case["floor_ms"] / case["median_ms"]
        case["baselines"] = {}
        for name in names:
            if name in peers.SIGMOID:
                if not peers.usable("sigmoid", name):
                    case["baselines"][name] = {"error": peers.not_run_reason("sigmoid", name)}
                    continue
                fn = peers.sigmoid_fn(name)
            else:  # torch_compile
                fn = torch.compile(sigmoid_loss_reference) if h.DEV == "cuda" else None
            case["baselines"][name] = h.baseline(fn, lambda f: sigmoid_cases.fwd_bwd(f, inputs), B >= 32768,
                                                 case["median_ms"])
            h.save()

    h.run_case(case, estimate_s, body)
