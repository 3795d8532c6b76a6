"""Frame ops forward+backward against the plain torch composition (einsum to C x V x T, topk,
mean, cross-entropy), on the CPU here; time interleaved in one process, peak memory in a child
process (benchmarks/memprobe.py), results merged into benchmarks/results/cpu-<date>.json."""
from __future__ import annotations

import statistics

import pytest
import torch

from .frame_cases import fwd_bwd, make
from .harness import child_peak_mb, time_once

CASES = [
    # op, C, V, T, D, k, rounds
    ("topk_frame_similarity", 512, 512, 16, 512, 4, 8),
    ("topk_frame_similarity", 2048, 2048, 16, 512, 4, 4),
    ("topk_frame_similarity", 2048, 2048, 16, 512, 16, 3),
    ("video_contrastive_loss", 2048, 2048, 16, 512, 4, 3),
    ("video_contrastive_loss", 2048, 2048, 16, 512, 16, 3),  # mean pooling, FitCLIP's
    ("select_frames", 4096, 4096, 32, 512, 4, 5),  # B = C = V videos with their own captions
]


@pytest.mark.parametrize("op,C,V,T,D,k,rounds", CASES, ids=[f"{c[0]}-C{c[1]}-T{c[3]}-k{c[5]}" for c in CASES])
def test_frame_op_cpu(benchmark, results, op, C, V, T, D, k, rounds):
    torch.manual_seed(0)
    text, frames = make(op, C, V, T, D)
    candidate = fwd_bwd(op, "fitclip", text, frames, k)
    baseline = fwd_bwd(op, "torch", text, frames, k)
    base_times = []
    candidate()
    baseline()
    benchmark.group = f"{op} cpu C={C} V={V} T={T} D={D} k={k} fp32"
    benchmark.pedantic(candidate, setup=lambda: base_times.append(time_once(baseline)), rounds=rounds, iterations=1)
    ms = benchmark.stats.stats.median * 1e3
    base_ms = statistics.median(base_times) * 1e3
    args = [str(x) for x in (C, V, T, D, k)]
    mem = {impl: child_peak_mb("benchmarks.memprobe", op, impl, *args) for impl in ("fitclip", "torch")}
    inputs_grads_mb = 2 * (C * D + V * T * D) * 4 / 2**20
    case = {
        "op": op, "pass": "fwd+bwd", "backend": "cpp", "device": "cpu", "C": C, "V": V, "T": T, "D": D, "k": k,
        "dtype": "float32", "median_ms": ms, "rounds": rounds, "peak_mb": mem["fitclip"].get("peak_extra_mb"),
        "grads_mb": inputs_grads_mb / 2,
        "baselines": {"torch": {"median_ms": base_ms, "speedup": base_ms / ms, "rounds": len(base_times),
                                "peak_extra_mb": mem["torch"].get("peak_extra_mb"), "error": mem["torch"].get("error")}},
    }
    if case["peak_mb"] is not None and mem["torch"].get("peak_extra_mb"):
        g = case["grads_mb"]
        case["baselines"]["torch"]["extra_mem_ratio"] = (case["peak_mb"] - g) / (mem["torch"]["peak_extra_mb"] - g)
    results("cpu").add(case)
    print(f"\n{op} C={C} T={T} k={k}: fitclip {ms:.0f} ms, torch {base_ms:.0f} ms ({base_ms / ms:.2f}x); "
          f"peak extra {case['peak_mb']:.0f} MB vs {mem['torch'].get('peak_extra_mb', float('nan')):.0f} MB")
