"""contrastive_loss forward+backward against what users run instead: open_clip's ClipLoss, the
plain torch composition and torch.compile of it (CPU here; CUDA cases in bench_contrastive_cuda).

Each round runs every baseline (pytest-benchmark's setup hook, timed here) and then the fused op
(timed by pytest-benchmark), so candidate and baselines interleave in one process. Peak memory
comes from a child process per implementation (benchmarks/memprobe.py). "extra" memory is the
peak above the inputs minus the gradients every implementation returns (2 x B x D).
"""
from __future__ import annotations

import statistics

import pytest
import torch

from fitclip_ext.reference import contrastive_loss_reference

from .contrastive_cases import fwd_bwd, loss_fn, make_inputs
from .harness import child_peak_mb, interleaved, time_once

D = 512
# rounds per case; B=32768 baselines only run once, in the memory child (each B x B fp32
# matrix is 4.3 GB there, and the plain composition keeps several).
CASES = [(1024, 20), (4096, 8), (16384, 3), (32768, 2)]
BASELINES = ("open_clip", "torch", "torch_compile")


@pytest.mark.parametrize("B,rounds", CASES, ids=[f"B{b}" for b, _ in CASES])
def test_contrastive_loss_cpu(benchmark, results, B, rounds):
    torch.manual_seed(0)
    inputs = make_inputs(B, D)
    candidate = fwd_bwd(loss_fn("fitclip", backend="cpp"), inputs)
    in_process = B <= 16384
    base_fns = {name: fwd_bwd(loss_fn(name), inputs) for name in BASELINES} if in_process else {}
    base_times, run_baselines = interleaved(base_fns)
    candidate()  # warm-up (first-call allocations, MKL buffers)
    benchmark.group = f"contrastive_loss cpu B={B} D={D} fp32"
    benchmark.pedantic(candidate, setup=run_baselines if base_fns else None, rounds=rounds, iterations=1)
    ms = benchmark.stats.stats.median * 1e3

    grads_mb = 2 * B * D * 4 / 2**20
    mem = {impl: child_peak_mb("benchmarks.memprobe", "contrastive", impl, str(B), str(D))
           for impl in ("fitclip",) + BASELINES}
    baselines = {}
    for name in BASELINES:
        entry = {"peak_extra_mb": mem[name].get("peak_extra_mb"), "error": mem[name].get("error")}
        if base_times.get(name):
            entry["median_ms"] = statistics.median(base_times[name]) * 1e3
            entry["rounds"] = len(base_times[name])
        elif "seconds" in mem[name]:
            entry["median_ms"] = mem[name]["seconds"] * 1e3
            entry["rounds"] = 1
            entry["note"] = "single run in the memory child process"
        if entry.get("median_ms"):
            entry["speedup"] = entry["median_ms"] / ms
        if entry["peak_extra_mb"] is not None and mem["fitclip"].get("peak_extra_mb") is not None:
            entry["extra_mem_ratio"] = (mem["fitclip"]["peak_extra_mb"] - grads_mb) / (entry["peak_extra_mb"] - grads_mb)
        baselines[name] = {k: v for k, v in entry.items() if v is not None}

    with torch.no_grad():
        import fitclip_ext

        i, t, s = (x.detach() for x in inputs)
        ours = fitclip_ext.contrastive_loss(i, t, s, backend="cpp").double()
        if B <= 16384:
            truth = contrastive_loss_reference(i, t, s.double(), upcast=True)
            reference = "torch float64"
        else:  # the dense float64 reference needs 8.6 GB per B x B matrix here
            truth = fitclip_ext.contrastive_loss(i.double(), t.double(), s.double(), backend="cpp")
            reference = "fitclip cpp float64 (tested against the torch float64 reference in tests/)"
        rel_err = (ours - truth).abs().item() / truth.abs().item()
    case = {
        "op": "contrastive_loss", "pass": "fwd+bwd", "backend": "cpp", "device": "cpu",
        "B": B, "D": D, "dtype": "float32", "median_ms": ms, "rounds": rounds,
        "peak_mb": mem["fitclip"].get("peak_extra_mb"), "grads_mb": grads_mb,
        "rel_err": rel_err, "rel_err_reference": reference, "baselines": baselines,
        "floor_ms": None, "floor_note": "CPU: 4 GEMMs of B x B x D; see one_gemm_ms",
    }
    gemm_a, gemm_b = (x.detach() for x in inputs[:2])
    case["one_gemm_ms"] = statistics.median(time_once(lambda: gemm_a @ gemm_b.T) for _ in range(3)) * 1e3
    benchmark.extra_info.update({k: v for k, v in case.items() if k in ("peak_mb", "rel_err")})
    results("cpu").add(case)
    print(f"\nB={B}: fitclip {ms:.0f} ms, peak extra {case['peak_mb']:.0f} MB; " + ", ".join(
        f"{n} {b.get('median_ms', float('nan')):.0f} ms ({b.get('speedup', float('nan')):.2f}x), "
        f"{b.get('peak_extra_mb', float('nan')):.0f} MB" for n, b in baselines.items()))
    assert rel_err < 1e-5
    # B=32768 in under 1 GB of extra memory (issue 2's bar).
    if B == 32768:
        assert case["peak_mb"] < 1024
