"""contrastive_loss / infonce on the device: correctness against float64 (the rule), what random
features never reach (robustness), the benchmark beside open_clip, torch, torch.compile and the
fused peers (inf-cl, memeff), the large sizes, the int32-overflowing index and the autotune sweep."""
from __future__ import annotations

import json
import traceback

import torch

import fitclip_ext
from benchmarks import contrastive_cases
from fitclip_ext.reference import contrastive_loss_reference
from fitclip_ext.testing import rel_err as rel, rule_rows

from . import harness as h
from . import peers

OP = "contrastive_loss"


def correctness() -> None:
    """Odd shapes beside aligned ones, each dtype (float64 computed in float64), TF32 on and off."""
    shapes = [(1, 1), (7, 3), (33, 40), (100, 17)] if h.TINY else \
        [(1, 1), (7, 3), (127, 65), (1000, 17), (4097, 512), (8191, 768)]
    dtypes = [(torch.float32, False), (torch.float16, True), (torch.float64, False)] if h.TINY else \
        [(torch.bfloat16, True), (torch.float16, True), (torch.float32, True), (torch.float32, False),
         (torch.float64, False)]
    rows = []
    for dtype, tf32 in dtypes:
        for B, D in shapes:
            label = {"op": OP, "B": B, "D": D, "dtype": h.dtype_name(dtype, tf32)}
            rows += h.guarded(label, lambda: _case(dtype, B, D, tf32, label))
    h.correctness(rows, OP)


def _case(dtype, B, D, tf32, label):
    """Loss and gradients of the Triton op and of naive torch at the same dtype, against float64."""
    with h.tf32(tf32):
        inputs = contrastive_cases.make_inputs(B, D, dtype, h.DEV, seed=B + D)
        ours = fitclip_ext.contrastive_loss(*inputs, label_smoothing=0.1, backend="triton")
        naive = contrastive_loss_reference(*inputs, label_smoothing=0.1)
        truth_in = [x.detach().double().requires_grad_() for x in inputs]
        truth = contrastive_loss_reference(*truth_in, label_smoothing=0.1)
        res = [[out, *torch.autograd.grad(out, x)] for out, x in ((ours, inputs), (naive, inputs), (truth, truth_in))]
    return rule_rows(["loss", "d_image", "d_text", "d_scale"], *res, dtype, tf32, **label)


def _loss_and_grads(img, txt, scale, **kw):
    i, t = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    s = torch.as_tensor(scale, dtype=torch.float32, device=h.DEV).clone().requires_grad_()
    loss = fitclip_ext.contrastive_loss(i, t, s, backend=kw.pop("backend", "triton"), **kw)
    return [loss.detach(), *torch.autograd.grad(loss, [i, t, s])]


def _truth(img, txt, scale):
    i, t = img.detach().double().requires_grad_(), txt.detach().double().requires_grad_()
    s = torch.tensor(float(scale), dtype=torch.float64, device=h.DEV, requires_grad=True)
    loss = contrastive_loss_reference(i, t, s)
    return [loss.detach(), *torch.autograd.grad(loss, [i, t, s])]


def _errs(got, truth, names=("loss", "d_image", "d_text", "d_scale")):
    return {n: rel(g, t) for n, g, t in zip(names, got, truth)}


def robustness() -> None:
    """What random features never reach: bitwise repeatability, CUDA-graph capture with a Python
    number and a device tensor as the scale (no host sync, no host copy), TF32 on aligned pairs at
    scale 100, bf16 against float32 products of the same bf16 inputs, float16 at a large batch
    (gradient entries far below float16's normal range), and columns whose negative beats the
    positive by 70+ logits."""
    big = not h.TINY
    B, D = (8192, 512) if big else (96, 32)
    rows = []

    def row(name, fn):
        case = {"op": OP, "check": name}
        try:
            case.update(fn())
        except h.OutOfTime:
            raise
        except Exception as err:
            case.update(ok=False, error=repr(err)[:300])
            traceback.print_exc()
        h.empty_cache()
        rows.append(case)
        h.log(json.dumps(case, default=str))

    def bitwise():
        img, txt = h.unit(B, D, 1, torch.bfloat16), h.unit(B, D, 2, torch.bfloat16)
        a = _loss_and_grads(img, txt, 30.0, label_smoothing=0.1)
        b = _loss_and_grads(img, txt, 30.0, label_smoothing=0.1)
        return {"B": B, "D": D, "dtype": "bfloat16", "ok": all(torch.equal(x, y) for x, y in zip(a, b))}

    def graph():
        if h.DEV != "cuda":
            return {"ok": True, "skipped": "needs CUDA"}
        img = h.unit(B, D, 3, torch.bfloat16).requires_grad_()
        txt = h.unit(B, D, 4, torch.bfloat16).requires_grad_()
        s = torch.tensor(30.0, device=h.DEV, requires_grad=True)

        def step():  # a device scale with a gradient, and a Python-number scale (FitCLIP's teacher's)
            loss = fitclip_ext.contrastive_loss(img, txt, s, backend="triton") + \
                fitclip_ext.contrastive_loss(img, txt, 66.7, label_smoothing=0.1, backend="triton")
            return [loss, *torch.autograd.grad(loss, [img, txt, s])]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager = step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static = step()
        g.replay()
        torch.cuda.synchronize()
        return {"B": B, "D": D, "dtype": "bfloat16",
                "ok": all(torch.equal(x.detach(), y.detach()) for x, y in zip(static, eager))}

    def tf32_aligned():
        with h.tf32(True):
            img = h.unit(B, D, 5)
            txt = torch.nn.functional.normalize(img + 0.05 * h.unit(B, D, 6), dim=-1)  # aligned pairs
            ours = _loss_and_grads(img, txt, 100.0)
            truth = _truth(img, txt, 100.0)
            try:
                clip = peers.contrastive_fn("open_clip", 100.0)
            except ImportError:
                clip = None
            i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
            s = torch.tensor(100.0, device=h.DEV, requires_grad=True)
            base = clip(i, t, s) if clip else contrastive_loss_reference(i, t, s)
            base_errs = _errs([base.detach(), *torch.autograd.grad(base, [i, t, s])], truth)
        errs = _errs(ours, truth)
        loss = ours[0].item()
        # the loss no worse than open_clip's (1.5x: the same products summed in another order) and
        # never negative; the gradients within 1.5x or 2e-5 (float32 IEEE, under the interpreter:
        # the saved lse is rounded once, about 1e-5 relative in each exp at scale 100)
        ok = loss >= 0 and errs["loss"] <= 1.5 * base_errs["loss"] + 1e-6 and \
            all(errs[k] <= max(1.5 * base_errs[k], 2e-5) for k in errs if k != "loss")
        return {"B": B, "D": D, "dtype": "float32/tf32", "scale": 100.0, "loss": loss, "truth": truth[0].item(),
                "rel_err": errs, "baseline": "open_clip ClipLoss" if clip else "torch", "baseline_rel_err": base_errs,
                "ok": ok}

    def bf16_vs_fp32_products():
        img, txt = h.unit(B, D, 7, torch.bfloat16), h.unit(B, D, 8, torch.bfloat16)
        with h.tf32(False):
            # float32 features that are exactly the bf16 values: under autocast the op multiplies
            # them in bf16 (exact products, float32 accumulation) and returns a float32 loss
            with torch.autocast(h.DEV, dtype=torch.bfloat16):
                ours = fitclip_ext.contrastive_loss(img.float(), txt.float(), 30.0, backend="triton")
            ref = contrastive_loss_reference(img.float(), txt.float(), torch.tensor(30.0, device=h.DEV))
        err = rel(ours, ref)
        return {"B": B, "D": D, "dtype": "bfloat16 (autocast) vs float32", "rel_err": err, "ok": err <= 1e-4}

    def fp16_large():
        n, d = (32768, 512) if big else (128, 32)
        img, txt = h.unit(n, d, 9, torch.float16), h.unit(n, d, 10, torch.float16)
        ours = _loss_and_grads(img, txt, 100.0)
        truth = _truth(img, txt, 100.0)
        errs = _errs(ours, truth)
        zero = float((ours[1] == 0).float().mean())
        return {"B": n, "dtype": "float16", "rel_err": errs, "zero_grad_fraction": zero,
                "ok": errs["d_image"] <= 5e-3 and errs["d_text"] <= 5e-3 and errs["loss"] <= 2e-3 and zero < 0.01}

    def planted():
        img, txt = h.unit(B, D, 11), h.unit(B, D, 12)
        cols = torch.arange(0, B, max(1, B // 16), device=h.DEV)
        other = (cols + 1) % B
        # caption j points away from its own image and towards another: L[other, j] - L[j, j] ~ 141 at scale 100
        txt[cols] = torch.nn.functional.normalize(img[other] - img[cols], dim=-1)
        gap = 100.0 * ((img[other] * txt[cols]).sum(-1) - (img[cols] * txt[cols]).sum(-1))
        out = {}
        for dtype in (torch.bfloat16, torch.float32):
            i, t = img.to(dtype), txt.to(dtype)
            out[h.dtype_name(dtype)] = _errs(_loss_and_grads(i, t, 100.0), _truth(i, t, 100.0))
        ok = all(v <= (8e-3 if k == "bfloat16" else 1e-4) for k, e in out.items() for v in e.values())
        return {"B": B, "D": D, "min_gap_logits": gap.min().item(), "rel_err": out, "ok": ok and gap.min().item() >= 70}

    for name, fn in (("bitwise repeat", bitwise), ("cuda graph capture", graph), ("tf32 aligned scale 100", tf32_aligned),
                     ("bf16 vs fp32 products", bf16_vs_fp32_products), ("fp16 large batch", fp16_large),
                     ("planted columns", planted)):
        row(name, fn)
    h.correctness(rows, OP + " robustness")


def large_index() -> None:
    """Keys with more than 2^31 elements (row * stride overflows int32): rectangular infonce with
    the positives in the far tail, loss and both gradients against float64 computed in chunks."""
    n, m, D = (8, 300, 16) if h.TINY else (256, (2**31) // 512 + 100_000, 512)
    off = m - n - 3
    dtype = torch.float32 if h.TINY else torch.bfloat16
    case = {"op": "infonce large index", "n": n, "m": m, "D": D, "keys_numel": m * D, "positive_offset": off,
            "dtype": h.dtype_name(dtype)}

    def body(case):
        import time

        dev = h.DEV
        g = torch.Generator(device=dev).manual_seed(3)
        q = torch.nn.functional.normalize(torch.randn(n, D, device=dev, generator=g), dim=-1).to(dtype).requires_grad_()
        keys = torch.empty(m, D, device=dev, dtype=dtype)
        for r0 in range(0, m, 1 << 20):  # random rows without a float32 copy of all of them
            r1 = min(m, r0 + (1 << 20))
            keys[r0:r1] = torch.nn.functional.normalize(torch.randn(r1 - r0, D, device=dev, generator=g), dim=-1)
        keys.requires_grad_()
        t0 = time.perf_counter()
        loss = fitclip_ext.infonce(q, keys, 20.0, positive_offset=off, backend="triton")
        dq, dk = torch.autograd.grad(loss, (q, keys))
        if dev == "cuda":
            torch.cuda.synchronize()
        case["seconds"] = time.perf_counter() - t0
        # float64 truth in chunks of keys: lse, then softmax rows for the gradients
        q64 = q.detach().double()
        chunk = 1 << 18
        lse = torch.full((n,), float("-inf"), device=dev, dtype=torch.float64)
        for r0 in range(0, m, chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(20.0 * q64 @ keys[r0:r0 + chunk].detach().double().T, 1))
        pos = 20.0 * (q64 * keys[off:off + n].detach().double()).sum(1)
        truth = (lse - pos).mean()
        dq_t = torch.zeros_like(q64)
        num = den = 0.0
        rows = torch.arange(n, device=dev)
        for r0 in range(0, m, chunk):
            kc = keys[r0:r0 + chunk].detach().double()
            p = torch.exp(20.0 * q64 @ kc.T - lse[:, None])
            hit = (rows + off >= r0) & (rows + off < r0 + kc.shape[0])
            p[rows[hit], (rows[hit] + off - r0)] -= 1.0
            p *= 20.0 / n
            dq_t += p @ kc
            dk_t = p.T @ q64
            num += (dk[r0:r0 + chunk].double() - dk_t).norm().item() ** 2
            den += dk_t.norm().item() ** 2
        case["rel_err"] = {"loss": rel(loss, truth), "d_query": rel(dq, dq_t), "d_keys": (num / max(den, 1e-300)) ** 0.5}
        tol = 1e-5 if h.TINY else 8e-3
        case["ok"] = all(v <= tol for v in case["rel_err"].values())
        if not case["ok"]:
            case["error"] = f"relative error above {tol}"

    h.run_case(case, 20 if not h.TINY else 5, body)


def _ours(inputs):
    return contrastive_cases.fwd_bwd(lambda i, t, s: fitclip_ext.contrastive_loss(i, t, s, backend="triton"), inputs)


def benchmark(B: int, D: int, names: tuple[str, ...], estimate_s: float, tflops) -> None:
    """fwd+bwd of ours at (B, D) and of each named baseline or peer on the same inputs, in the
    same process: times, speedups, peak memory, our fraction of the 8 B^2 D floor."""
    dtype = torch.float32 if h.TINY else torch.bfloat16
    case = {"op": OP, "pass": "fwd+bwd", "B": B, "D": D, "dtype": h.dtype_name(dtype)}

    def body(case):
        inputs = contrastive_cases.make_inputs(B, D, dtype, h.DEV)
        big = B >= 262144
        ours = _ours(inputs)
        fwd = lambda: fitclip_ext.contrastive_loss(*inputs, backend="triton")  # noqa: E731
        if big:  # seconds a call: the memory run is the warm-up, then 2 timed calls and 1 forward
            case["peak_mb"] = h.peak_mb(ours)
            case["median_ms"] = h.bench_ms(ours, True, reps=2, warm=False)
            with torch.no_grad():
                case["forward_ms"] = h.bench_ms(fwd, True, reps=1, warm=False)
        else:
            case["median_ms"] = h.bench_ms(ours)
            with torch.no_grad():
                case["forward_ms"] = h.bench_ms(fwd)
            case["peak_mb"] = h.peak_mb(ours)
        case["inputs_and_grads_mb"] = 4 * B * D * inputs[0].element_size() / 2**20
        case["model_ms"] = h.model_ms("contrastive_loss", B, D)  # (kernels.model: the estimate this run tests)
        if tflops:
            case["floor_ms"] = 8 * B * B * D / (tflops * 1e12) * 1e3
            case["fraction_of_floor"] = case["floor_ms"] / case["median_ms"]
            case["forward_fraction_of_floor"] = case["floor_ms"] / 4 / case["forward_ms"]  # 2 of the 8
        if B <= 16384 or h.TINY:
            with torch.no_grad():
                i, t, s = (x.detach() for x in inputs)
                case["rel_err"] = rel(fitclip_ext.contrastive_loss(i, t, s, backend="triton"),
                                      contrastive_loss_reference(i.double(), t.double(), s.double()))
        case["baselines"] = {}
        for name in names:
            if name in peers.CONTRASTIVE:
                if not peers.usable("contrastive", name):
                    case["baselines"][name] = {"error": peers.not_run_reason("contrastive", name)}
                    continue
                fn = peers.contrastive_fn(name, float(inputs[2].detach()))
            elif name == "torch":
                fn = contrastive_loss_reference
            else:  # torch_compile
                fn = torch.compile(contrastive_loss_reference) if h.DEV == "cuda" else None
            case["baselines"][name] = h.baseline(fn, lambda f: contrastive_cases.fwd_bwd(f, inputs), B >= 32768,
                                                 case["median_ms"])
            h.save()

    h.run_case(case, estimate_s, body)


def tuned(case: dict, run) -> None:
    """Fills case with run's time under the default blocks, then under FITCLIP_TRITON_AUTOTUNE=1
    (every candidate of every kernel it launches timed by triton.autotune), and each kernel's
    candidate timings (the data for choosing the defaults)."""
    import os

    from fitclip_ext.kernels import common as kernel_common

    case["default_ms"] = h.bench_ms(run)
    kernel_common.TUNERS.clear()
    os.environ["FITCLIP_TRITON_AUTOTUNE"] = "1"
    try:
        run()  # tunes every kernel launch of this shape
        case["tuned_ms"] = h.bench_ms(run)
    finally:
        os.environ.pop("FITCLIP_TRITON_AUTOTUNE", None)
    case["speedup_over_default"] = case["default_ms"] / case["tuned_ms"]
    case["kernels"] = []
    for ident, tuner in kernel_common.TUNERS.items():
        keys = list(tuner.cache.items())
        for i, (key, best) in enumerate(keys):  # configs_timings holds the last key's timings only
            timings = getattr(tuner, "configs_timings", None) if i == len(keys) - 1 else None
            case["kernels"].append({
                "kernel": tuner.base_fn.__name__ + (f" ({ident[1]})" if ident[1] else ""),
                "key": [str(k) for k in key], "best": str(best), "default": str(tuner.configs[0]),
                "timings_ms": {str(c): t[0] for c, t in timings.items()} if timings else None})
    kernel_common.TUNERS.clear()


def autotune(estimate_s: float) -> None:
    """FITCLIP_TRITON_AUTOTUNE=1 on the headline shape: tuned fwd+bwd against the defaults."""
    B, D = (64, 32) if h.TINY else (32768, 512)
    dtype = torch.float32 if h.TINY else torch.bfloat16
    case = {"op": OP + " autotune", "pass": "fwd+bwd", "B": B, "D": D, "dtype": h.dtype_name(dtype)}
    h.run_case(case, estimate_s, lambda c: tuned(c, _ours(contrastive_cases.make_inputs(B, D, dtype, h.DEV, seed=7))))
