"""sigmoid_loss (SigLIP) forward+backward on the CPU against what users run instead: open_clip's
SigLipLoss, the plain torch composition and torch.compile of it.

Each round runs every baseline (pytest-benchmark's setup hook, timed here) and then the fused op
(timed by pytest-benchmark), so candidate and baselines interleave in one process. Peak memory
comes from a child process per implementation (benchmarks/memprobe.py); "extra" is the peak above
the inputs, the gradients (2 x B x D) included. B = 65536 runs the fused op only (each B x B
float32 matrix of a baseline is 17 GB).
"""
from __future__ import annotations

import statistics

import pytest
import torch

import fitclip_ext
from fitclip_ext.reference import sigmoid_loss_reference

from .harness import child_peak_mb, interleaved, time_once
from .sigmoid_cases import fwd_bwd, loss_fn, make_inputs

D = 512
CASES = [(4096, 6), (16384, 3), (65536, 1)]
BASELINES = ("open_clip", "torch", "torch_compile")
# Targets on the 2-core CPU (B = 16384): speed ratios (baseline time / fitclip time) and the
# fraction of each baseline's extra memory the fused loss may use; B = 65536 under 1 GB.
TARGETS = {"open_clip": 1.5, "torch": 1.5, "torch_compile": 1.0, "memory_fraction": 1 / 16, "B65536_mb": 1024}


@pytest.mark.parametrize("B,rounds", CASES, ids=[f"B{b}" for b, _ in CASES])
def test_sigmoid_loss_cpu(benchmark, results, B, rounds):
    torch.manual_seed(0)
    inputs = make_inputs(B, D)
    candidate = fwd_bwd(loss_fn("fitclip", backend="cpp"), inputs)
    base_fns = {name: fwd_bwd(loss_fn(name), inputs) for name in BASELINES} if B <= 16384 else {}
    base_times, run_baselines = interleaved(base_fns)
    candidate()  # warm-up
    benchmark.group = f"sigmoid_loss cpu B={B} D={D} fp32"
    benchmark.pedantic(candidate, setup=run_baselines if base_fns else None, rounds=rounds, iterations=1)
    ms = benchmark.stats.stats.median * 1e3

    impls = ("fitclip",) + (BASELINES if base_fns else ())
    mem = {impl: child_peak_mb("benchmarks.memprobe", "sigmoid", impl, str(B), str(D)) for impl in impls}
    baselines = {}
    for name in base_fns:
        entry = {"median_ms": statistics.median(base_times[name]) * 1e3, "rounds": len(base_times[name]),
                 "peak_extra_mb": mem[name].get("peak_extra_mb"), "error": mem[name].get("error")}
        entry["speedup"] = entry["median_ms"] / ms
        if entry["peak_extra_mb"] and mem["fitclip"].get("peak_extra_mb") is not None:
            entry["extra_mem_ratio"] = mem["fitclip"]["peak_extra_mb"] / entry["peak_extra_mb"]
        baselines[name] = {k: v for k, v in entry.items() if v is not None}

    with torch.no_grad():
        i, t, s, b = (x.detach() for x in inputs)
        ours = fitclip_ext.sigmoid_loss(i, t, s, b, backend="cpp").double()
        if B <= 16384:
            truth = sigmoid_loss_reference(i, t, s.double(), b.double(), upcast=True)
            reference = "torch float64"
        else:
            truth = fitclip_ext.sigmoid_loss(i.double(), t.double(), s.double(), b.double(), backend="cpp")
            reference = "fitclip cpp float64 (tested against the torch float64 reference in tests/)"
        rel_err = (ours - truth).abs().item() / truth.abs().item()
    gemm_a, gemm_b = i, t
    one_gemm_ms = statistics.median(time_once(lambda: gemm_a @ gemm_b.T) for _ in range(2 if B > 16384 else 3)) * 1e3
    case = {
        "op": "sigmoid_loss", "pass": "fwd+bwd", "backend": "cpp", "device": "cpu", "B": B, "D": D,
        "dtype": "float32", "median_ms": ms, "rounds": rounds, "peak_mb": mem["fitclip"].get("peak_extra_mb"),
        "grads_mb": 2 * B * D * 4 / 2**20, "rel_err": rel_err, "rel_err_reference": reference,
        "baselines": baselines, "one_gemm_ms": one_gemm_ms, "gemms": 3, "targets": TARGETS,
    }
    results("cpu").add(case)
    print(f"\nB={B}: fitclip {ms:.0f} ms ({ms / one_gemm_ms:.2f} GEMM times), peak extra {case['peak_mb']:.0f} MB; "
          + ", ".join(f"{n} {e['median_ms']:.0f} ms ({e['speedup']:.2f}x), {e.get('peak_extra_mb', float('nan')):.0f} MB"
                      for n, e in baselines.items()))
    assert rel_err < 1e-5
    if B == 16384:
        for name in BASELINES:
            assert baselines[name]["speedup"] >= TARGETS[name], (name, baselines[name])
            assert baselines[name]["extra_mem_ratio"] <= TARGETS["memory_fraction"], (name, baselines[name])
    if B == 65536:
        assert case["peak_mb"] < TARGETS["B65536_mb"]
