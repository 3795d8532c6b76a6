"""The frame ops on the device (topk_frame_similarity, select_frames, video_contrastive_loss):
correctness against float64 (the rule; select_frames exactly), the 1.2M-video grid, bf16 against
float32 similarities of the same inputs, and the benchmarks against the torch composition."""
from __future__ import annotations

import json
import traceback

import torch

import fitclip_ext
from benchmarks import frame_cases
from fitclip_ext.reference import (select_frames_reference, topk_frame_similarity_reference,
                                   video_contrastive_loss_reference)
from fitclip_ext.testing import rel_err as rel, rule_rows

from . import harness as h


def correctness() -> None:
    dtypes = [torch.float32, torch.float16, torch.float64] if h.TINY else \
        [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    shapes = [(9, 7, 5, 2), (16, 16, 12, 12), (6, 5, 40, 30)] if h.TINY else \
        [(129, 77, 12, 4), (1000, 333, 33, 7), (64, 64, 16, 16), (40, 50, 64, 48)]
    rows = []
    for dtype in dtypes:
        for C, V, T, k in shapes:
            label = dict(C=C, V=V, T=T, k=k, dtype=h.dtype_name(dtype))
            rows += h.guarded({"op": "frame ops", **label}, lambda: _case(dtype, C, V, T, k, label))
    rows.append(_bf16_vs_fp32())
    h.correctness(rows, "frame-op")


def _case(dtype, C, V, T, k, label) -> list:
    text, frames = frame_cases.make("topk_frame_similarity", C, V, T, 64, seed=C + T, device=h.DEV, dtype=dtype)

    def run(fn):
        out = fn(text, frames)
        w = torch.linspace(0.5, 1.5, out.numel(), device=h.DEV).reshape(out.shape).to(out.dtype)
        return [out] + list(torch.autograd.grad((out * w).sum(), (text, frames)))

    res = [run(lambda a, b: fitclip_ext.topk_frame_similarity(a, b, k, backend="triton")),
           run(lambda a, b: topk_frame_similarity_reference(a, b, k)),
           run(lambda a, b: topk_frame_similarity_reference(a, b, k, upcast=True))]
    rows = rule_rows(["sim", "d_text", "d_frames"], *res, dtype, op="topk_frame_similarity", **label)
    B = min(C, V)
    fr, tx = frames[:B].detach(), text[:B].detach()
    idx, _ = fitclip_ext.select_frames(fr, tx, k, backend="triton")
    ref_idx, _ = select_frames_reference(fr, tx, k, upcast=True)
    rows.append({"op": "select_frames", **label, "ok": bool(torch.equal(idx, ref_idx)),
                 "mismatched_rows": int((idx != ref_idx).any(1).sum())})
    sc = torch.tensor(30.0, device=h.DEV)
    res = []
    for fn, up in ((lambda *a: fitclip_ext.video_contrastive_loss(*a, k=k, label_smoothing=0.1, backend="triton"), False),
                   (lambda *a: video_contrastive_loss_reference(*a, k=k, label_smoothing=0.1), False),
                   (lambda *a: video_contrastive_loss_reference(*a, k=k, label_smoothing=0.1), True)):
        f, t = (x.detach().clone().double() if up else x.detach().clone() for x in (fr, tx))
        f.requires_grad_()
        t.requires_grad_()
        out = fn(f, t, sc.double() if up else sc)
        res.append([out, *torch.autograd.grad(out, (f, t))])
    return rows + rule_rows(["loss", "d_frames", "d_text"], *res, dtype, op="video_contrastive_loss", **label)


def _bf16_vs_fp32() -> dict:
    """bf16 topk_frame_similarity against float32 similarities of the same bf16 inputs (the
    products are exact in float32 accumulation): the scores differ by the bf16 output's rounding
    only (gate 4e-3) and the chosen frames agree but for near-ties (at most 0.1% of the pairs)."""
    from fitclip_ext import backends

    C, V, T, D, k = (16, 16, 8, 32, 4) if h.TINY else (512, 512, 16, 512, 4)
    case = {"op": "topk_frame_similarity", "check": "bf16 vs float32 sims of the same inputs", "C": C, "V": V,
            "T": T, "D": D, "k": k}
    try:
        text = h.unit(C, D, 23, torch.bfloat16) * 3.0
        frames = h.unit(V * T, D, 24, torch.bfloat16).reshape(V, T, D) * 2.0
        with torch.no_grad():
            out = fitclip_ext.topk_frame_similarity(text, frames, k, backend="triton").float()
            ref = topk_frame_similarity_reference(text.float(), frames.float(), k)
            ops = backends.get("triton")
            _, bits = ops.topk_sim(text, frames, k, None, ops.row_norms(text), ops.row_norms(frames))
            sims = torch.einsum("cd,vtd->cvt", torch.nn.functional.normalize(text.float(), dim=-1),
                                torch.nn.functional.normalize(frames.float(), dim=-1))
            chosen = torch.zeros_like(sims, dtype=torch.bool).scatter_(2, sims.topk(k, dim=-1).indices, True)
            t_idx = torch.arange(T, device=h.DEV)
            kernel_chosen = ((bits[..., :1] >> t_idx) & 1).bool() if T <= 32 else None
        err = rel(out, ref)
        differ = float((kernel_chosen != chosen).any(-1).float().mean()) if kernel_chosen is not None else None
        case.update(rel_err=err, pairs_with_other_frames=differ, ok=err < 4e-3 and (differ or 0) <= 1e-3)
    except h.OutOfTime:
        raise
    except Exception as err:
        traceback.print_exc()
        case.update(ok=False, error=repr(err)[:300])
    h.log(json.dumps(case))
    return case


def large_grid() -> None:
    """topk_frame_similarity with 1.2M videos (past 65535 blocks of 16 videos: the launch grid
    keeps the videos in per-program ranges, never on a limited grid axis) against float32 einsum
    in chunks; under --tiny 70 videos with the range split forced (FITCLIP_TRITON_SMS)."""
    C, V, T, D, k = (8, 70, 2, 16, 1) if h.TINY else (8, 1_200_000, 2, 32, 1)
    case = {"op": "topk_frame_similarity", "check": "1.2M videos (grid past 65535 video blocks)", "C": C, "V": V,
            "T": T}
    import os

    sms = os.environ.get("FITCLIP_TRITON_SMS")
    try:
        if h.TINY:
            os.environ["FITCLIP_TRITON_SMS"] = "8"  # (the interpreter's 1 SM would not split 70 videos)
        text = h.unit(C, D, 21, torch.bfloat16)
        frames = h.unit(V * T, D, 22, torch.bfloat16).reshape(V, T, D)
        with torch.no_grad():
            out = fitclip_ext.topk_frame_similarity(text, frames, k, backend="triton").float()
            tn = torch.nn.functional.normalize(text.float(), dim=-1)
            ref = torch.cat([torch.einsum("cd,vtd->cvt", tn, torch.nn.functional.normalize(
                frames[v0:v0 + 65536].float(), dim=-1)).amax(-1) for v0 in range(0, V, 65536)], 1)
        err = rel(out, ref)
        case.update(rel_err=err, ok=err < 1e-2)
    except h.OutOfTime:
        raise
    except Exception as err:
        traceback.print_exc()
        case.update(ok=False, error=repr(err)[:300])
    finally:
        if sms is None:
            os.environ.pop("FITCLIP_TRITON_SMS", None)
        else:
            os.environ["FITCLIP_TRITON_SMS"] = sms
    h.correctness([case], "frame large grid")


def _time_against_torch(case: dict, ours, base, big: bool, floor_flops: float | None, tflops) -> None:
    """Fills case with our median time, peak memory, floor and the torch baseline (or its OOM)."""
    case["median_ms"] = h.bench_ms(ours, big)
    case["peak_mb"] = h.peak_mb(ours)
    if tflops and floor_flops:
        case["floor_ms"] = floor_flops / (tflops * 1e12) * 1e3
        case["fraction_of_floor"] = case["floor_ms"] / case["median_ms"]
    case["baselines"] = {"torch": h.baseline(base, lambda f: f, big, case["median_ms"])}


def benchmarks(tflops, copy_gbps, estimate_s: float) -> None:
    """topk_frame_similarity, video_contrastive_loss and select_frames against torch."""
    dtype = torch.float32 if h.TINY else torch.bfloat16
    grid = [(32, 32, 8, 32, 4)] if h.TINY else [(2048, 2048, 16, 512, 4), (8192, 8192, 16, 512, 4)]
    each = estimate_s / 5
    for C, V, T, D, k in grid:
        case = {"op": "topk_frame_similarity", "pass": "fwd+bwd", "C": C, "V": V, "T": T, "D": D, "k": k,
                "dtype": h.dtype_name(dtype)}

        def body(case, C=C, V=V, T=T, D=D, k=k):
            text, frames = frame_cases.make("topk_frame_similarity", C, V, T, D, seed=1, device=h.DEV, dtype=dtype)
            w = torch.randn(C, V, device=h.DEV).to(dtype)

            def mk(fn):
                return lambda: torch.autograd.grad((fn() * w).sum(), (text, frames))

            _time_against_torch(case, mk(lambda: fitclip_ext.topk_frame_similarity(text, frames, k, backend="triton")),
                                mk(lambda: frame_cases.torch_topk_similarity(text, frames, k)), False,
                                3 * 2 * C * V * T * D, tflops)

        h.run_case(case, each, body)

    grid = [(32, 8, 32, 4)] if h.TINY else [(4096, 16, 512, 4), (16384, 16, 512, 4)]
    for B, T, D, k in grid:
        case = {"op": "video_contrastive_loss", "pass": "fwd+bwd", "B": B, "T": T, "D": D, "k": k,
                "dtype": h.dtype_name(dtype)}

        def body(case, B=B, T=T, D=D, k=k):
            text, frames = frame_cases.make("video_contrastive_loss", B, B, T, D, seed=2, device=h.DEV, dtype=dtype)
            sc = torch.tensor(30.0, device=h.DEV, requires_grad=True)
            ours = lambda: torch.autograd.grad(  # noqa: E731
                fitclip_ext.video_contrastive_loss(frames, text, sc, k=k, backend="triton"), (frames, text, sc))
            base = lambda: torch.autograd.grad(frame_cases.torch_video_loss(frames, text, sc, k),  # noqa: E731
                                               (frames, text, sc))
            _time_against_torch(case, ours, base, B >= 16384, 8 * B * B * T * D, tflops)

        h.run_case(case, each, body)

    B, T, D, k = (64, 8, 32, 4) if h.TINY else (65536, 32, 512, 4)
    case = {"op": "select_frames", "B": B, "T": T, "D": D, "k": k, "dtype": h.dtype_name(dtype)}

    def body(case):
        frames = torch.randn(B, T, D, device=h.DEV).to(dtype)
        text = torch.randn(B, D, device=h.DEV).to(dtype)
        case["median_ms"] = h.bench_ms(lambda: fitclip_ext.select_frames(frames, text, k, backend="triton"))
        if copy_gbps:
            case["floor_ms"] = frames.numel() * frames.element_size() / (copy_gbps * 1e9) * 1e3
            case["fraction_of_floor"] = case["floor_ms"] / case["median_ms"]
        case["baselines"] = {"torch": h.baseline(lambda: select_frames_reference(frames, text, k), lambda f: f, False,
                                                 case["median_ms"])}

    h.run_case(case, each, body)


def autotune(estimate_s: float) -> None:
    """The frame kernels' candidate blocks timed by FITCLIP_TRITON_AUTOTUNE=1 at one shape."""
    from .contrastive import tuned

    dtype = torch.float32 if h.TINY else torch.bfloat16
    C, V, T, D, k = (24, 24, 8, 32, 4) if h.TINY else (4096, 4096, 16, 512, 4)
    case = {"op": "topk_frame_similarity + video_contrastive_loss + select_frames autotune", "pass": "fwd+bwd",
            "C": C, "V": V, "T": T, "D": D, "k": k, "dtype": h.dtype_name(dtype)}

    def body(case):
        text, frames = frame_cases.make("topk_frame_similarity", C, V, T, D, seed=4, device=h.DEV, dtype=dtype)
        sc = torch.tensor(30.0, device=h.DEV)

        def run():
            sim = fitclip_ext.topk_frame_similarity(text, frames, k, backend="triton")
            torch.autograd.grad(sim.sum(), (text, frames))
            loss = fitclip_ext.video_contrastive_loss(frames, text, sc, k=k, backend="triton")
            torch.autograd.grad(loss, (frames, text))
            fitclip_ext.select_frames(frames.detach(), text.detach(), k, backend="triton")

        tuned(case, run)

    h.run_case(case, estimate_s, body)
