"""distillation_loss forward+backward against the torch composition (log_softmax + kl_div over
rows and columns of materialised score matrices) and torch.compile of it, on the CPU; time
interleaved in one process, peak memory in a child process (benchmarks/memprobe.py). "extra"
memory is the peak above the inputs minus the gradients every implementation returns (2 x B x D).
"""
from __future__ import annotations

import statistics

import pytest
import torch

import fitclip_ext
from fitclip_ext.reference import distillation_loss_reference

from .distill_cases import fwd_bwd, loss_fn, make_inputs
from .harness import child_peak_mb, interleaved

D = 512
CASES = [(1024, 10), (4096, 5), (16384, 2)]
BASELINES = ("torch", "torch_compile")


@pytest.mark.parametrize("B,rounds", CASES, ids=[f"B{b}" for b, _ in CASES])
def test_distillation_loss_cpu(benchmark, results, B, rounds):
    torch.manual_seed(0)
    inputs = make_inputs(B, D)
    candidate = fwd_bwd(loss_fn("fitclip", backend="cpp"), inputs)
    base_fns = {name: fwd_bwd(loss_fn(name), inputs) for name in BASELINES}
    base_times, run_baselines = interleaved(base_fns)
    candidate()
    benchmark.group = f"distillation_loss cpu B={B} D={D} fp32"
    benchmark.pedantic(candidate, setup=run_baselines, rounds=rounds, iterations=1)
    ms = benchmark.stats.stats.median * 1e3

    grads_mb = 2 * B * D * 4 / 2**20
    mem = {impl: child_peak_mb("benchmarks.memprobe", "distill", impl, str(B), str(D)) for impl in ("fitclip",) + BASELINES}
    baselines = {}
    for name in BASELINES:
        entry = {"median_ms": statistics.median(base_times[name]) * 1e3, "rounds": len(base_times[name]),
                 "peak_extra_mb": mem[name].get("peak_extra_mb"), "error": mem[name].get("error")}
        entry["speedup"] = entry["median_ms"] / ms
        if entry["peak_extra_mb"] is not None and mem["fitclip"].get("peak_extra_mb") is not None:
            entry["extra_mem_ratio"] = (mem["fitclip"]["peak_extra_mb"] - grads_mb) / (entry["peak_extra_mb"] - grads_mb)
        baselines[name] = {k: v for k, v in entry.items() if v is not None}
    with torch.no_grad():
        sv, st, tv, tt, s = (x.detach() for x in inputs)
        ours = fitclip_ext.distillation_loss(sv, st, tv, tt, s, 66.7, backend="cpp").double()
        truth = distillation_loss_reference(sv, st, tv, tt, s.double(), 66.7, upcast=True)
        rel_err = (ours - truth).abs().item() / truth.abs().item()
    case = {
        "op": "distillation_loss", "pass": "fwd+bwd", "backend": "cpp", "device": "cpu", "B": B, "D": D,
        "dtype": "float32", "median_ms": ms, "rounds": rounds, "peak_mb": mem["fitclip"].get("peak_extra_mb"),
        "grads_mb": grads_mb, "rel_err": rel_err, "rel_err_reference": "torch float64", "baselines": baselines,
    }
    results("cpu").add(case)
    print(f"\ndistill B={B}: fitclip {ms:.0f} ms, peak extra {case['peak_mb']:.0f} MB; " + ", ".join(
        f"{n} {b['median_ms']:.0f} ms ({b['speedup']:.2f}x), {b.get('peak_extra_mb', float('nan')):.0f} MB"
        for n, b in baselines.items()))
    assert rel_err < 1e-4
