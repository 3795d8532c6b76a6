"""GPU check: the Triton ops against float64 on the GPU, the fused-loss peers' agreement, then the
GPU benchmarks beside open_clip, torch, torch.compile and the peers (inf-cl, memeff,
siglip-kernel), the card's measured ceilings, in one results JSON rewritten after every case.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --tiny --out DIR     # anywhere: CPU tensors through the Triton
                                                         # interpreter, tiny sizes (proves the script)

One time budget (--budget-seconds, what gpu_check.sh has left of its 540 s) governs the run: the
sections below run in priority order and each starts only if its estimate fits in what is left
(docs/TESTING.md has the table); what does not fit is recorded as skipped with the reason, and a
deadline alarm stops whatever overruns. `"finished": true` is written last in every case.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (section, estimate on an H100 in seconds, estimate under --tiny on a 2-core CPU): the estimate is
# what the section needs left in the budget to start (docs/TESTING.md says how each was made).
# Correctness first, then the benchmarks in priority order; the large sizes and the autotune
# sweeps only with --extended (a second call, where the lease has time for one).
PLAN = [
    ("ceilings", 10, 1),
    ("contrastive_loss correctness", 45, 40),
    ("peers agreement", 25, 15),
    ("sigmoid_loss correctness", 35, 30),
    ("frame ops correctness", 70, 60),
    ("distillation_loss correctness", 30, 30),
    ("contrastive_loss robustness", 20, 10),
    ("contrastive_loss B=32768 D=512", 45, 8),
    ("contrastive_loss B=8192, 65536 D=512", 30, 8),
    ("sigmoid_loss B=32768, 8192, 65536 D=512", 40, 8),
    ("frame ops benchmarks", 30, 15),
    ("distillation_loss benchmarks", 30, 8),
    ("infonce keys past 2^31 elements", 15, 5),
    ("topk_frame_similarity past 65535 video blocks", 10, 5),
]
EXTENDED = [
    ("contrastive_loss large: B=32768 D=768, 262144, 1048576", 50, 8),
    ("sigmoid_loss large: B=131072, 1048576", 25, 5),
    ("autotune: contrastive_loss", 30, 15),
    ("autotune: frame ops", 30, 25),
    ("autotune: distillation_loss", 20, 10),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results JSON")
    p.add_argument("--budget-seconds", type=float, default=float(os.environ.get("GPU_CHECK_SECONDS", 465)),
                   help="the whole check's time budget (gpu_check.sh passes what is left of its own)")
    p.add_argument("--extended", action="store_true",
                   help="also the large sizes (B up to 1048576) and the autotune sweeps (always under --tiny)")
    p.add_argument("--only", nargs="*", default=None, help="run only the sections whose names contain one of these")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before fitclip_ext.kernels is imported
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    import fitclip_ext  # noqa: F401  (registers the Triton ops where they can run)
    from benchmarks.gpucheck import contrastive, distill, frames, harness as h, peers, sigmoid

    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "device": "cpu (interpreter, --tiny)" if args.tiny else torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
        "commit": os.environ.get("FITCLIP_COMMIT", "unknown"), "tiny": args.tiny, "finished": False,
    }
    slug = "tiny-cpu" if args.tiny else "".join(c if c.isalnum() else "-" for c in doc["device"]).strip("-").lower()
    path = args.out / f"{slug}-{doc['date']}.json"
    h.init(args.tiny, args.budget_seconds, path, doc)
    doc["model"] = h.model_table()  # the per-launch estimates (kernels.model) the measurements test
    if args.tiny:  # the interpreter's own bf16 tl.dot multiplies raw bit patterns: widen them (as the tests do)
        from fitclip_ext.kernels.interpret import exact_bf16_dot

        bf16_dot = exact_bf16_dot()  # (held for the whole run: a dropped context manager restores the dot)
        bf16_dot.__enter__()
    h.save()

    def ceil():
        doc["ceilings"] = h.ceilings()
        h.log("ceilings", doc["ceilings"])

    def tflops():
        return doc.get("ceilings", {}).get("bf16_matmul_tflops")

    tiny = args.tiny
    peer_cases = [("contrastive", n) for n in peers.CONTRASTIVE] + [("sigmoid", n) for n in peers.SIGMOID]
    B_small, D_small = (48, 256) if tiny else (1000, 256)  # (inf-cl splits D in heads of 256)
    run = {
        "ceilings": ceil,
        "contrastive_loss correctness": contrastive.correctness,
        "peers agreement": lambda: peers.check_all(peer_cases, B_small, D_small,
                                                   torch.float32 if tiny else torch.bfloat16),
        "sigmoid_loss correctness": sigmoid.correctness,
        "frame ops correctness": frames.correctness,
        "distillation_loss correctness": distill.correctness,
        "contrastive_loss robustness": contrastive.robustness,
        "contrastive_loss B=32768 D=512": lambda: contrastive.benchmark(
            *((64, 32) if tiny else (32768, 512)), ("open_clip", "torch", "torch_compile", "inf_cl", "memeff"), 40,
            tflops()),
        "contrastive_loss B=8192, 65536 D=512": lambda: [
            contrastive.benchmark(B, D, names, 15, tflops()) for B, D, names in (
                [(100, 48, ("torch", "inf_cl", "memeff"))] if tiny else
                [(8192, 512, ("open_clip", "torch", "torch_compile", "inf_cl", "memeff")),
                 (65536, 512, ("open_clip", "inf_cl", "memeff"))])],
        "sigmoid_loss B=32768, 8192, 65536 D=512": lambda: [
            sigmoid.benchmark(B, D, names, 13, tflops()) for B, D, names in (
                [(64, 32, ("open_clip", "siglip_kernel", "siglip_kernel_chunked_bf16"))] if tiny else
                [(32768, 512, ("open_clip", "torch_compile", "siglip_kernel", "siglip_kernel_chunked_bf16")),
                 (8192, 512, ("open_clip", "torch_compile", "siglip_kernel", "siglip_kernel_chunked_bf16")),
                 (65536, 512, ("open_clip", "siglip_kernel", "siglip_kernel_chunked_bf16"))])],
        "frame ops benchmarks": lambda: frames.benchmarks(tflops(), doc.get("ceilings", {}).get("copy_gbps"), 25),
        "distillation_loss benchmarks": lambda: distill.benchmarks(tflops(), 25),
        "contrastive_loss large: B=32768 D=768, 262144, 1048576": lambda: [
            contrastive.benchmark(B, D, names, est, tflops()) for B, D, names, est in (
                [(128, 48, (), 3)] if tiny else
                [(32768, 768, ("open_clip", "inf_cl", "memeff"), 15), (262144, 512, ("memeff",), 15),
                 (1048576, 512, (), 25)])],
        "sigmoid_loss large: B=131072, 1048576": lambda: [
            sigmoid.benchmark(B, 512 if not tiny else 32, names, est, tflops()) for B, names, est in (
                [(96, (), 3)] if tiny else [(131072, ("siglip_kernel",), 8), (1048576, (), 15)])],
        "infonce keys past 2^31 elements": contrastive.large_index,
        "topk_frame_similarity past 65535 video blocks": frames.large_grid,
        "autotune: contrastive_loss": lambda: contrastive.autotune(25),
        "autotune: frame ops": lambda: frames.autotune(25),
        "autotune: distillation_loss": lambda: distill.autotune(15),
    }
    plan = PLAN + (EXTENDED if args.extended or tiny else [])
    for name, est_gpu, est_tiny in plan:
        if args.only is not None and not any(s in name for s in args.only):
            continue
        h.section(name, est_tiny if tiny else est_gpu, run[name])
    doc["seconds"] = round(h.left() * -1 + args.budget_seconds, 1)
    doc["finished"] = True
    h.save()
    h.log("wrote", path)
    bad = [c for c in doc.get("correctness", []) if not c.get("ok")]
    errors = [c for c in doc.get("cases", []) if "error" in c]
    broken = [s for s in doc["sections"] if s["status"] == "error"]
    return 0 if not bad and not errors and not broken else 1


if __name__ == "__main__":
    sys.exit(main())
