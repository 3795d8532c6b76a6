"""GPU check: correctness of the Triton ops against float64 on the GPU, then the GPU benchmarks
(floors and targets: docs/DESIGN.md) with their baselines, the card's measured ceilings, and a results JSON.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --tiny --out DIR     # anywhere: CPU tensors through the Triton
                                                         # interpreter, tiny sizes (proves the script)

Baselines: open_clip's ClipLoss (its own loss.py, loaded from the installed package or a carried
wheel), the plain torch composition and torch.compile of it, and inf-cl (PyPI) where importable.
Each baseline that cannot run (missing, out of memory) is recorded as such, never left out.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--max-seconds", type=float, default=330.0, help="stop starting new cases after this")
    return p.parse_args()


ARGS = parse_args()
if ARGS.tiny:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import fitclip_ext  # noqa: E402
from fitclip_ext.reference import (contrastive_loss_reference, select_frames_reference,  # noqa: E402
                                   topk_frame_similarity_reference, video_contrastive_loss_reference)

DEV = "cpu" if ARGS.tiny else "cuda"
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


_SAVE = []  # main() registers the results writer: every recorded case rewrites the JSON


def save():
    for fn in _SAVE:
        fn()


@contextlib.contextmanager
def recorded(case: dict, cases: list):
    """Runs one benchmark case's body: an out-of-memory or any other error is recorded in the case
    (never dropped), the CUDA cache is emptied, and the case is logged and kept."""
    try:
        yield case
    except torch.OutOfMemoryError:
        case["error"] = "out of memory"
    except Exception as err:
        case["error"] = repr(err)[:300]
        traceback.print_exc()
    finally:
        if DEV == "cuda":
            torch.cuda.empty_cache()
        log(json.dumps(case))
        cases.append(case)
        save()  # a run cut short by its time limit still leaves every finished case on disk


# ----------------------------------------------------------------------------- baselines

def load_open_clip_loss():
    """open_clip's ClipLoss from its own loss.py (the GPU machine lacks open_clip's other deps)."""
    try:
        from open_clip.loss import ClipLoss

        return ClipLoss
    except Exception:
        pass
    for base in [Path(p) for p in sys.path if p] + [Path("/tmp/site")]:
        path = base / "open_clip" / "loss.py"
        if path.exists():
            spec = importlib.util.spec_from_file_location("open_clip_loss_file", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod.ClipLoss
    return None


def load_inf_cl():
    """inf-cl's symmetric loss (benchmarks/contrastive_cases.py: the scale goes in detached)."""
    try:
        from benchmarks.contrastive_cases import loss_fn

        return loss_fn("inf_cl")
    except Exception:
        return None


# ----------------------------------------------------------------------------- timing

def bench_ms(fn, big: bool, reps: int = 3, warm: bool = True) -> float:
    if DEV == "cpu":
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    import triton

    if big:  # seconds per call: a warm-up (unless already warm) and `reps` timed calls
        if warm:
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def peak_mb(fn) -> float | None:
    from benchmarks.harness import cuda_peak_mb

    return None if DEV == "cpu" else cuda_peak_mb(fn)


def ceilings() -> dict:
    if DEV == "cpu":
        return {}
    import triton

    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    tflops = 2 * n**3 / ms / 1e9
    x = torch.empty(2**30 // 2, device=DEV, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms_copy = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=100, return_mode="median")
    gbps = 2 * x.numel() * 2 / ms_copy / 1e6
    return {"bf16_matmul_tflops": tflops, "copy_gbps": gbps}


# ----------------------------------------------------------------------------- cases

def make_inputs(B, D, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(B, D, device=DEV, generator=g), dim=-1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(B, D, device=DEV, generator=g), dim=-1).to(dtype)
    return img.requires_grad_(), txt.requires_grad_(), torch.tensor(100.0, device=DEV, requires_grad=True)


def fwd_bwd(loss_fn, inputs):
    def run():
        loss = loss_fn(*inputs)
        torch.autograd.grad(loss, inputs)

    return run


def rel(a, b):
    """||a - b|| / ||b||; absolute where the truth is exactly zero (e.g. B = 1: one class)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def correctness(dtype, B, D, tf32=True):
    """Loss and gradients of the Triton op and of naive torch at the same dtype, against float64."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    inputs = make_inputs(B, D, dtype, seed=B + D)
    ours = fitclip_ext.contrastive_loss(*inputs, label_smoothing=0.1, backend="triton")
    g_ours = torch.autograd.grad(ours, inputs)
    naive = contrastive_loss_reference(*inputs, label_smoothing=0.1)
    g_naive = torch.autograd.grad(naive, inputs)
    truth_in = [x.detach().double().requires_grad_() for x in inputs]
    truth = contrastive_loss_reference(*truth_in, label_smoothing=0.1)
    g_truth = torch.autograd.grad(truth, truth_in)
    tol = {torch.float32: 1e-5 if not tf32 else 5e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    rows = []
    for name, o, nv, t in [("loss", ours, naive, truth)] + list(zip(["d_image", "d_text", "d_scale"], g_ours, g_naive, g_truth)):
        e, ne = rel(o, t), rel(nv, t)
        rows.append({"what": name, "rel_err": e, "naive_rel_err": ne, "ok": bool(e <= 2 * ne + tol)})
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def time_against_torch(case: dict, ours, base, big: bool, floor_flops: float | None, tflops) -> None:
    """Fills case with our median time, peak memory, floor and the torch baseline (or its OOM)."""
    case["median_ms"] = bench_ms(ours, big)
    case["peak_mb"] = peak_mb(ours)
    if tflops and floor_flops:
        case["floor_ms"] = floor_flops / (tflops * 1e12) * 1e3
        case["fraction_of_floor"] = case["floor_ms"] / case["median_ms"]
    try:
        ms = bench_ms(base, big)
        case["baselines"] = {"torch": {"median_ms": ms, "speedup": ms / case["median_ms"], "peak_mb": peak_mb(base)}}
    except torch.OutOfMemoryError:
        case["baselines"] = {"torch": {"error": "out of memory"}}


def frame_ops(tflops, copy_gbps, cases: list):
    """Correctness (float64 truth, each dtype) and benchmarks of the frame ops (into cases)."""
    corr = []
    dtypes = [torch.float32, torch.float16] if ARGS.tiny else [torch.bfloat16, torch.float16, torch.float32]
    for dtype in dtypes:
        for C, V, T, k in ([(9, 7, 5, 2), (16, 16, 12, 12)] if ARGS.tiny else [(129, 77, 12, 4), (1000, 333, 33, 7), (64, 64, 16, 16)]):
            g = torch.Generator(device=DEV).manual_seed(C + T)
            text = torch.randn(C, 64, device=DEV, generator=g).to(dtype).requires_grad_()
            frames = torch.randn(V, T, 64, device=DEV, generator=g).to(dtype).requires_grad_()
            tol = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
            label = dict(C=C, V=V, T=T, k=k, dtype=str(dtype).replace("torch.", ""))
            try:
                def run(fn):
                    out = fn(text, frames)
                    w = torch.linspace(0.5, 1.5, out.numel(), device=DEV).reshape(out.shape).to(out.dtype)
                    return [out] + list(torch.autograd.grad((out * w).sum(), (text, frames)))

                ours = run(lambda a, b: fitclip_ext.topk_frame_similarity(a, b, k, backend="triton"))
                naive = run(lambda a, b: topk_frame_similarity_reference(a, b, k))
                truth = run(lambda a, b: topk_frame_similarity_reference(a, b, k, upcast=True))
                for what, o, nv, t in zip(["sim", "d_text", "d_frames"], ours, naive, truth):
                    e, ne = rel(o, t), rel(nv, t)
                    corr.append({"op": "topk_frame_similarity", "what": what, **label, "rel_err": e, "naive_rel_err": ne,
                                 "ok": bool(e <= 2 * ne + tol)})
                B = min(C, V)
                fr, tx = frames[:B].detach(), text[:B].detach()
                idx, _ = fitclip_ext.select_frames(fr, tx, k, backend="triton")
                ref_idx, _ = select_frames_reference(fr, tx, k, upcast=True)
                corr.append({"op": "select_frames", **label, "ok": bool(torch.equal(idx, ref_idx)),
                             "mismatched_rows": int((idx != ref_idx).any(1).sum())})
                fr, tx = fr.clone().requires_grad_(), tx.clone().requires_grad_()
                sc = torch.tensor(30.0, device=DEV)
                lo = fitclip_ext.video_contrastive_loss(fr, tx, sc, k=k, label_smoothing=0.1, backend="triton")
                go = torch.autograd.grad(lo, (fr, tx))
                ln = video_contrastive_loss_reference(fr, tx, sc, k=k, label_smoothing=0.1)
                gn = torch.autograd.grad(ln, (fr, tx))
                f64, t64 = fr.detach().double().requires_grad_(), tx.detach().double().requires_grad_()
                lt = video_contrastive_loss_reference(f64, t64, sc.double(), k=k, label_smoothing=0.1)
                gt = torch.autograd.grad(lt, (f64, t64))
                for what, o, nv, t in zip(["loss", "d_frames", "d_text"], [lo, *go], [ln, *gn], [lt, *gt]):
                    e, ne = rel(o, t), rel(nv, t)
                    corr.append({"op": "video_contrastive_loss", "what": what, **label, "rel_err": e,
                                 "naive_rel_err": ne, "ok": bool(e <= 2 * ne + tol)})
            except Exception as err:
                traceback.print_exc()
                corr.append({"op": "frame ops", **label, "ok": False, "error": repr(err)[:300]})
    bad = [c for c in corr if not c.get("ok")]
    log(f"frame-op correctness: {len(corr) - len(bad)}/{len(corr)} ok", *(f"\n  FAIL {c}" for c in bad))

    from benchmarks.frame_cases import torch_topk_similarity, torch_video_loss

    dtype = torch.float32 if ARGS.tiny else torch.bfloat16
    grid = [(64, 64, 8, 32, 4)] if ARGS.tiny else [(2048, 2048, 16, 512, 4), (8192, 8192, 16, 512, 4), (8192, 8192, 32, 512, 8)]
    for C, V, T, D, k in grid:
        if time.time() - T0 > ARGS.max_seconds:
            cases.append({"op": "topk_frame_similarity", "C": C, "V": V, "T": T, "D": D, "k": k, "skipped": "time budget"})
            continue
        case = {"op": "topk_frame_similarity", "pass": "fwd+bwd", "C": C, "V": V, "T": T, "D": D, "k": k,
                "dtype": str(dtype).replace("torch.", "")}
        with recorded(case, cases):
            g = torch.Generator(device=DEV).manual_seed(1)
            text = torch.randn(C, D, device=DEV, generator=g).to(dtype).requires_grad_()
            frames = torch.randn(V, T, D, device=DEV, generator=g).to(dtype).requires_grad_()
            w = torch.randn(C, V, device=DEV).to(dtype)

            def mk(fn):
                return lambda: torch.autograd.grad((fn() * w).sum(), (text, frames))

            ours = mk(lambda: fitclip_ext.topk_frame_similarity(text, frames, k, backend="triton"))
            base = mk(lambda: torch_topk_similarity(text, frames, k))
            time_against_torch(case, ours, base, False, 3 * 2 * C * V * T * D, tflops)

    grid = [(32, 8, 32, 4)] if ARGS.tiny else [(4096, 16, 512, 4), (16384, 16, 512, 4)]
    for B, T, D, k in grid:
        case = {"op": "video_contrastive_loss", "pass": "fwd+bwd", "B": B, "T": T, "D": D, "k": k,
                "dtype": str(dtype).replace("torch.", "")}
        with recorded(case, cases):
            g = torch.Generator(device=DEV).manual_seed(2)
            text = torch.randn(B, D, device=DEV, generator=g).to(dtype).requires_grad_()
            frames = torch.randn(B, T, D, device=DEV, generator=g).to(dtype).requires_grad_()
            sc = torch.tensor(30.0, device=DEV, requires_grad=True)
            ours = lambda: torch.autograd.grad(fitclip_ext.video_contrastive_loss(frames, text, sc, k=k, backend="triton"),
                                               (frames, text, sc))
            base = lambda: torch.autograd.grad(torch_video_loss(frames, text, sc, k), (frames, text, sc))
            time_against_torch(case, ours, base, B >= 16384, 8 * B * B * T * D, tflops)

    B, T, D, k = (64, 8, 32, 4) if ARGS.tiny else (65536, 32, 512, 4)
    case = {"op": "select_frames", "B": B, "T": T, "D": D, "k": k, "dtype": str(dtype).replace("torch.", "")}
    with recorded(case, cases):
        frames = torch.randn(B, T, D, device=DEV).to(dtype)
        text = torch.randn(B, D, device=DEV).to(dtype)
        ours = lambda: fitclip_ext.select_frames(frames, text, k, backend="triton")
        case["median_ms"] = bench_ms(ours, False)
        if copy_gbps:
            case["floor_ms"] = frames.numel() * frames.element_size() / (copy_gbps * 1e9) * 1e3
            case["fraction_of_floor"] = case["floor_ms"] / case["median_ms"]
        base = lambda: select_frames_reference(frames, text, k)
        ms = bench_ms(base, False)
        case["baselines"] = {"torch": {"median_ms": ms, "speedup": ms / case["median_ms"]}}

    # the frame kernels' candidate blocks (lowest priority: last, and only with time left)
    C, V, T, D, k = (64, 64, 8, 32, 4) if ARGS.tiny else (4096, 4096, 16, 512, 4)
    case = {"op": "topk_frame_similarity + video_contrastive_loss + select_frames autotune", "pass": "fwd+bwd",
            "C": C, "V": V, "T": T, "D": D, "k": k, "dtype": str(dtype).replace("torch.", "")}
    if time.time() - T0 > ARGS.max_seconds:
        cases.append({**case, "skipped": "time budget"})
        return corr
    with recorded(case, cases):
        g = torch.Generator(device=DEV).manual_seed(4)
        text = torch.randn(C, D, device=DEV, generator=g).to(dtype).requires_grad_()
        frames = torch.randn(V, T, D, device=DEV, generator=g).to(dtype).requires_grad_()
        sc = torch.tensor(30.0, device=DEV)

        def run():
            sim = fitclip_ext.topk_frame_similarity(text, frames, k, backend="triton")
            torch.autograd.grad(sim.sum(), (text, frames))
            loss = fitclip_ext.video_contrastive_loss(frames, text, sc, k=k, backend="triton")
            torch.autograd.grad(loss, (frames, text))
            fitclip_ext.select_frames(frames.detach(), text.detach(), k, backend="triton")

        _tuned(case, run)
    return corr


def distill_ops(tflops, cases: list):
    """Correctness (float64 truth, each dtype) and benchmarks of distillation_loss against the
    torch composition (log_softmax + kl_div both ways) and torch.compile of it (into cases)."""
    from fitclip_ext.reference import distillation_loss_reference

    corr = []
    norm = torch.nn.functional.normalize

    def inputs(n, m, D, dtype, seed):
        g = torch.Generator(device=DEV).manual_seed(seed)
        tv, tt = norm(torch.randn(n, D, generator=g, device=DEV), dim=-1), norm(torch.randn(m, D, generator=g, device=DEV), dim=-1)
        sv = norm(tv + 0.5 * torch.randn(n, D, generator=g, device=DEV) / D**0.5, dim=-1)
        st = norm(tt + 0.5 * torch.randn(m, D, generator=g, device=DEV) / D**0.5, dim=-1)
        s = torch.tensor(30.0, device=DEV)
        return [x.to(dtype) for x in (sv, st, tv, tt)] + [s]

    dtypes = [torch.float32, torch.float16] if ARGS.tiny else [torch.bfloat16, torch.float16, torch.float32]
    for dtype in dtypes:
        for n, m, D in ([(9, 7, 16), (33, 40, 24)] if ARGS.tiny else [(1, 1, 8), (127, 65, 65), (1000, 17, 512), (4097, 4097, 512)]):
            try:
                sv, st, tv, tt, s = inputs(n, m, D, dtype, n + m)
                t_scale = 66.7 if dtype == torch.float32 else 8.0
                res = {}
                for name, fn, up in (("ours", lambda *a: fitclip_ext.distillation_loss(*a, backend="triton"), False),
                                     ("naive", distillation_loss_reference, False),
                                     ("truth", distillation_loss_reference, True)):
                    a = [x.detach().clone().double() if up else x.detach().clone() for x in (sv, st)]
                    sc = s.detach().clone().double() if up else s.detach().clone()
                    for x in a + [sc]:
                        x.requires_grad_()
                    tvv, ttv = (tv.double(), tt.double()) if up else (tv, tt)
                    out = fn(a[0], a[1], tvv, ttv, sc, t_scale)
                    res[name] = [out] + list(torch.autograd.grad(out, a + [sc]))
                tol = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
                for i, what in enumerate(["distill_loss", "d_student_video", "d_student_text", "d_student_scale"]):
                    e, ne = rel(res["ours"][i], res["truth"][i]), rel(res["naive"][i], res["truth"][i])
                    corr.append({"op": "distillation_loss", "what": what, "n": n, "m": m, "D": D,
                                 "dtype": str(dtype).replace("torch.", ""), "rel_err": e, "naive_rel_err": ne,
                                 "ok": bool(e <= 2 * ne + tol)})
            except Exception as err:
                corr.append({"op": "distillation_loss", "n": n, "m": m, "D": D, "dtype": str(dtype), "ok": False,
                             "error": repr(err)[:300]})
    compiled = torch.compile(distillation_loss_reference) if DEV == "cuda" else None
    for B, D in ([(64, 32)] if ARGS.tiny else [(8192, 512), (32768, 512)]):
        if time.time() - T0 > ARGS.max_seconds:
            cases.append({"op": "distillation_loss", "B": B, "D": D, "skipped": "time budget of the check ran out"})
            continue
        case = {"op": "distillation_loss", "pass": "fwd+bwd", "B": B, "D": D, "dtype": "float32" if ARGS.tiny else "bfloat16"}
        with recorded(case, cases):
            sv, st, tv, tt, s = inputs(B, B, D, torch.float32 if ARGS.tiny else torch.bfloat16, 0)
            sv.requires_grad_()
            st.requires_grad_()
            s.requires_grad_()

            def runner(fn):
                def run():
                    torch.autograd.grad(fn(sv, st, tv, tt, s, 66.7), (sv, st, s))
                return run

            ours = runner(lambda *a: fitclip_ext.distillation_loss(*a, backend="triton"))
            time_against_torch(case, ours, runner(distillation_loss_reference), B >= 32768,
                               12 * B * B * D, tflops)  # 6 GEMMs of B x B x D
            if compiled is not None:
                try:
                    run = runner(compiled)
                    ms = bench_ms(run, B >= 32768)
                    case["baselines"]["torch_compile"] = {"median_ms": ms, "speedup": ms / case["median_ms"],
                                                          "peak_mb": peak_mb(run)}
                except torch.OutOfMemoryError:
                    case["baselines"]["torch_compile"] = {"error": "out of memory"}
    B, D = (64, 32) if ARGS.tiny else (16384, 512)
    case = {"op": "distillation_loss autotune", "pass": "fwd+bwd", "B": B, "D": D,
            "dtype": "float32" if ARGS.tiny else "bfloat16"}
    if time.time() - T0 > ARGS.max_seconds:
        cases.append({**case, "skipped": "time budget"})
        return corr
    with recorded(case, cases):
        sv, st, tv, tt, s = inputs(B, B, D, torch.float32 if ARGS.tiny else torch.bfloat16, 1)
        for x in (sv, st, s):
            x.requires_grad_()
        _tuned(case, lambda: torch.autograd.grad(fitclip_ext.distillation_loss(sv, st, tv, tt, s, 66.7, backend="triton"),
                                                 (sv, st, s)))
    return corr


def _tuned(case: dict, run) -> None:
    """Fills case with run's time under the default blocks, then under FITCLIP_TRITON_AUTOTUNE=1
    (every candidate of every kernel it launches timed by triton.autotune), and each kernel's
    candidate timings (the data for choosing the defaults)."""
    from fitclip_ext.kernels import _op

    case["default_ms"] = bench_ms(run, False)
    _op._TUNERS.clear()
    os.environ["FITCLIP_TRITON_AUTOTUNE"] = "1"
    try:
        run()  # tunes every kernel launch of this shape
        case["tuned_ms"] = bench_ms(run, False)
    finally:
        os.environ.pop("FITCLIP_TRITON_AUTOTUNE", None)
    case["speedup_over_default"] = case["default_ms"] / case["tuned_ms"]
    case["kernels"] = []
    for ident, tuner in _op._TUNERS.items():
        keys = list(tuner.cache.items())
        for i, (key, best) in enumerate(keys):  # configs_timings holds the last key's timings only
            timings = getattr(tuner, "configs_timings", None) if i == len(keys) - 1 else None
            case["kernels"].append({
                "kernel": tuner.base_fn.__name__ + (f" ({ident[1]})" if ident[1] else ""),
                "key": [str(k) for k in key], "best": str(best), "default": str(tuner.configs[0]),
                "timings_ms": {str(c): t[0] for c, t in timings.items()} if timings else None})
    _op._TUNERS.clear()


def tuning(cases: list):
    """FITCLIP_TRITON_AUTOTUNE=1 on the headline InfoNCE shapes: tuned fwd+bwd against the defaults."""
    grid = [(64, 32)] if ARGS.tiny else [(32768, 512), (32768, 768)]
    dtype = torch.float32 if ARGS.tiny else torch.bfloat16
    for B, D in grid:
        if time.time() - T0 > ARGS.max_seconds:
            cases.append({"op": "contrastive_loss autotune", "B": B, "D": D, "skipped": "time budget"})
            continue
        case = {"op": "contrastive_loss autotune", "pass": "fwd+bwd", "B": B, "D": D,
                "dtype": str(dtype).replace("torch.", "")}
        with recorded(case, cases):
            inputs = make_inputs(B, D, dtype, seed=7)
            _tuned(case, fwd_bwd(lambda i, t, s: fitclip_ext.contrastive_loss(i, t, s, backend="triton"), inputs))


def large_index(cases: list):
    """Keys with more than 2^31 elements (row * stride overflows int32): rectangular infonce with
    the positives in the far tail, loss and both gradients against float64 computed in chunks."""
    n, m, D = (8, 300, 16) if ARGS.tiny else (256, (2**31) // 512 + 100_000, 512)
    off = m - n - 3
    dtype = torch.float32 if ARGS.tiny else torch.bfloat16
    case = {"op": "infonce large index", "n": n, "m": m, "D": D, "keys_numel": m * D, "positive_offset": off,
            "dtype": str(dtype).replace("torch.", "")}
    with recorded(case, cases):
        g = torch.Generator(device=DEV).manual_seed(3)
        q = torch.nn.functional.normalize(torch.randn(n, D, device=DEV, generator=g), dim=-1).to(dtype).requires_grad_()
        keys = torch.empty(m, D, device=DEV, dtype=dtype)
        for r0 in range(0, m, 1 << 20):  # random rows without a float32 copy of all of them
            r1 = min(m, r0 + (1 << 20))
            keys[r0:r1] = torch.nn.functional.normalize(torch.randn(r1 - r0, D, device=DEV, generator=g), dim=-1)
        keys.requires_grad_()
        s = torch.tensor(20.0, device=DEV)
        t0 = time.perf_counter()
        loss = fitclip_ext.infonce(q, keys, s, positive_offset=off, backend="triton")
        dq, dk = torch.autograd.grad(loss, (q, keys))
        if DEV == "cuda":
            torch.cuda.synchronize()
        case["seconds"] = time.perf_counter() - t0
        # float64 truth in chunks of keys: lse, then softmax rows for the gradients
        q64 = q.detach().double()
        chunk = 1 << 18
        lse = torch.full((n,), float("-inf"), device=DEV, dtype=torch.float64)
        for r0 in range(0, m, chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(20.0 * q64 @ keys[r0:r0 + chunk].detach().double().T, 1))
        pos = 20.0 * (q64 * keys[off:off + n].detach().double()).sum(1)
        truth = (lse - pos).mean()
        dq_t = torch.zeros_like(q64)
        err_dk_num = err_dk_den = 0.0
        for r0 in range(0, m, chunk):
            kc = keys[r0:r0 + chunk].detach().double()
            p = torch.exp(20.0 * q64 @ kc.T - lse[:, None])
            rows = torch.arange(n, device=DEV)
            hit = (rows + off >= r0) & (rows + off < r0 + kc.shape[0])
            p[rows[hit], (rows[hit] + off - r0)] -= 1.0
            p *= 20.0 / n
            dq_t += p @ kc
            dk_t = p.T @ q64
            err_dk_num += (dk[r0:r0 + chunk].double() - dk_t).norm().item() ** 2
            err_dk_den += dk_t.norm().item() ** 2
        case["rel_err"] = {"loss": rel(loss, truth), "d_query": rel(dq, dq_t),
                           "d_keys": (err_dk_num / max(err_dk_den, 1e-300)) ** 0.5}
        tol = 1e-5 if ARGS.tiny else 8e-3
        case["ok"] = all(v <= tol for v in case["rel_err"].values())
        if not case["ok"]:
            case["error"] = f"relative error above {tol}"


def main():
    out_dir = ARGS.out
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    doc = {
        "device": "cpu (interpreter, --tiny)" if DEV == "cpu" else torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
        "commit": os.environ.get("FITCLIP_COMMIT", "unknown"), "tiny": ARGS.tiny,
    }
    slug = "tiny-cpu" if ARGS.tiny else "".join(c if c.isalnum() else "-" for c in doc["device"]).strip("-").lower()
    path = out_dir / f"{slug}-{doc['date']}.json"
    _SAVE.append(lambda: path.write_text(json.dumps(doc, indent=2, default=str) + "\n"))
    doc["ceilings"] = ceilings()
    log("ceilings", doc["ceilings"])

    # 1. correctness on the device, odd shapes, each dtype
    corr = []
    shapes = [(1, 1), (7, 3), (33, 40), (100, 17)] if ARGS.tiny else [(1, 1), (7, 3), (127, 65), (1000, 17), (4097, 512), (8191, 768)]
    dtypes = [(torch.float32, False), (torch.float16, True)] if ARGS.tiny else \
        [(torch.bfloat16, True), (torch.float16, True), (torch.float32, True), (torch.float32, False)]
    for dtype, tf32 in dtypes:
        for B, D in shapes:
            try:
                for r in correctness(dtype, B, D, tf32):
                    corr.append({"B": B, "D": D, "dtype": str(dtype).replace("torch.", "") + ("/tf32" if dtype == torch.float32 and tf32 else ""), **r})
            except Exception as err:
                corr.append({"B": B, "D": D, "dtype": str(dtype), "ok": False, "error": repr(err)[:300]})
    bad = [c for c in corr if not c.get("ok")]
    log(f"correctness: {len(corr) - len(bad)}/{len(corr)} ok", *(f"\n  FAIL {c}" for c in bad))
    doc["correctness"] = corr
    cases = doc["cases"] = []
    large_index(cases)

    # 2. benchmarks (bf16 on the GPU; fp32 in the interpreter)
    ClipLoss = load_open_clip_loss()
    inf_cl = load_inf_cl()
    clip_loss = ClipLoss() if ClipLoss else None
    compiled = torch.compile(contrastive_loss_reference) if DEV == "cuda" else None
    baselines = {
        "open_clip": (lambda i, t, s: clip_loss(i, t, s)) if clip_loss else None,
        "torch": contrastive_loss_reference,
        "torch_compile": compiled,
        "inf_cl": inf_cl,
    }
    # (B, D, which baselines to try): naive ones hold several B x B matrices (17 GB each in fp32 at 65536)
    if ARGS.tiny:
        grid = [(64, 32, ("open_clip", "torch")), (100, 48, ("torch",))]
        dtype = torch.float32
    else:
        grid = [(8192, 512, ("open_clip", "torch", "torch_compile", "inf_cl")),
                (32768, 512, ("open_clip", "torch", "torch_compile", "inf_cl")),
                (32768, 768, ("open_clip", "torch", "inf_cl")),
                (65536, 512, ("open_clip", "inf_cl")),
                (65536, 768, ("inf_cl",)),
                (262144, 512, ()),
                (1048576, 512, ())]
        dtype = torch.bfloat16
    tflops = doc["ceilings"].get("bf16_matmul_tflops")
    tuned = False
    for B, D, names in grid:
        if B >= 262144 and not tuned:  # the autotune sweep before the long single runs
            tuning(cases)
            tuned = True
        if time.time() - T0 > ARGS.max_seconds:
            cases.append({"op": "contrastive_loss", "B": B, "D": D, "skipped": "time budget of the check ran out"})
            continue
        case = {"op": "contrastive_loss", "pass": "fwd+bwd", "B": B, "D": D, "dtype": str(dtype).replace("torch.", "")}
        with recorded(case, cases):
            inputs = make_inputs(B, D, dtype)
            ours = fwd_bwd(lambda i, t, s: fitclip_ext.contrastive_loss(i, t, s, backend="triton"), inputs)
            big = B >= 262144
            fwd = lambda: fitclip_ext.contrastive_loss(*inputs, backend="triton")  # noqa: E731
            if big:  # seconds a call: the memory run is the warm-up, then 2 timed calls and 1 forward
                case["peak_mb"] = peak_mb(ours)
                case["median_ms"] = bench_ms(ours, True, reps=2, warm=False)
                with torch.no_grad():
                    case["forward_ms"] = bench_ms(fwd, True, reps=1, warm=False)
            else:
                case["median_ms"] = bench_ms(ours, False)
                with torch.no_grad():
                    case["forward_ms"] = bench_ms(fwd, False)
                case["peak_mb"] = peak_mb(ours)
            case["inputs_and_grads_mb"] = 4 * B * D * inputs[0].element_size() / 2**20
            if tflops:
                case["floor_ms"] = 8 * B * B * D / (tflops * 1e12) * 1e3
                case["fraction_of_floor"] = case["floor_ms"] / case["median_ms"]
                case["forward_fraction_of_floor"] = case["floor_ms"] / 4 / case["forward_ms"]  # 2 of the 8
            if B <= 16384 or ARGS.tiny:
                with torch.no_grad():
                    i, t, s = (x.detach() for x in inputs)
                    case["rel_err"] = rel(fitclip_ext.contrastive_loss(i, t, s, backend="triton"),
                                          contrastive_loss_reference(i.double(), t.double(), s.double()))
            case["baselines"] = {}
            for name in names:
                fn = baselines.get(name)
                if fn is None:
                    case["baselines"][name] = {"error": "not available on this machine"}
                    continue
                try:
                    run = fwd_bwd(fn, inputs)
                    ms = bench_ms(run, big=B >= 32768)
                    case["baselines"][name] = {"median_ms": ms, "speedup": ms / case["median_ms"], "peak_mb": peak_mb(run)}
                except torch.OutOfMemoryError:
                    case["baselines"][name] = {"error": "out of memory"}
                except Exception as err:
                    case["baselines"][name] = {"error": repr(err)[:300]}
                finally:
                    if DEV == "cuda":
                        torch.cuda.empty_cache()
    if not tuned:
        tuning(cases)
    frame_corr = frame_ops(tflops, doc["ceilings"].get("copy_gbps"), cases)
    doc["correctness"] += frame_corr
    bad += [c for c in frame_corr if not c.get("ok")]
    dist_corr = distill_ops(tflops, cases)
    doc["correctness"] += dist_corr
    bad += [c for c in dist_corr if not c.get("ok")]
    log(f"distillation correctness: {sum(c.get('ok', False) for c in dist_corr)}/{len(dist_corr)} ok")
    doc["finished"] = True
    save()
    log("wrote", path)
    return 0 if not bad and not any("error" in c for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
