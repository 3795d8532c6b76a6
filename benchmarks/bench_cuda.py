"""CUDA cases of the benchmarks (skipped without a GPU): the Triton ops, forward+backward, bf16,
against open_clip's ClipLoss, the plain torch composition and inf-cl where installed. Timing with
triton.testing.do_bench (CUDA events, median); memory with max_memory_allocated.
benchmarks/gpu_check.sh runs the fuller set (ceilings, floors, 1M batch) in one short script."""
from __future__ import annotations

import pytest
import torch

from .contrastive_cases import fwd_bwd, loss_fn, make_inputs
from .frame_cases import fwd_bwd as frame_fwd_bwd
from .frame_cases import make as frame_make
from .harness import cuda_peak_mb as _peak_mb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


@pytest.mark.parametrize("B,D", [(8192, 512), (32768, 512), (32768, 768)])
def test_contrastive_loss_cuda(benchmark, results, B, D):
    inputs = make_inputs(B, D, dtype=torch.bfloat16, device="cuda")
    ours = fwd_bwd(loss_fn("fitclip", backend="triton"), inputs)
    ms = _bench(ours)
    case = {"op": "contrastive_loss", "pass": "fwd+bwd", "backend": "triton", "device": "cuda", "B": B, "D": D,
            "dtype": "bfloat16", "median_ms": ms, "peak_mb": _peak_mb(ours), "baselines": {}}
    for name in ("open_clip", "torch", "inf_cl"):
        try:
            base = fwd_bwd(loss_fn(name), inputs)
            bms = _bench(base)
            case["baselines"][name] = {"median_ms": bms, "speedup": bms / ms, "peak_mb": _peak_mb(base)}
        except ImportError:
            case["baselines"][name] = {"error": "not installed"}
        except torch.OutOfMemoryError:
            case["baselines"][name] = {"error": "out of memory"}
        torch.cuda.empty_cache()
    results("cuda").add(case)
    benchmark.pedantic(ours, rounds=5, iterations=1)


@pytest.mark.parametrize("op", ["topk_frame_similarity", "video_contrastive_loss", "select_frames"])
def test_frame_ops_cuda(benchmark, results, op):
    C = V = 4096
    T, D, k = (32 if op == "select_frames" else 16), 512, 4
    text, frames = frame_make(op, C, V, T, D, device="cuda", dtype=torch.bfloat16)
    ours = frame_fwd_bwd(op, "fitclip", text, frames, k, backend="triton")
    base = frame_fwd_bwd(op, "torch", text, frames, k)
    ms, bms = _bench(ours), _bench(base)
    results("cuda").add({"op": op, "pass": "fwd+bwd", "backend": "triton", "device": "cuda", "C": C, "V": V, "T": T,
                         "D": D, "k": k, "dtype": "bfloat16", "median_ms": ms, "peak_mb": _peak_mb(ours),
                         "baselines": {"torch": {"median_ms": bms, "speedup": bms / ms, "peak_mb": _peak_mb(base)}}})
    benchmark.pedantic(ours, rounds=5, iterations=1)
