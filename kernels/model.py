"""A per-launch model of what the CUDA ops cost on an H100, from the launchers' own plans.

    python -m fitclip_ext.kernels.model [--B 32768] [--D 512] [--frames 8192] [--T 16] [--json out.json]

For contrastive_loss, sigmoid_loss and distillation_loss at B x B (D features, bf16, forward and
backward) and topk_frame_similarity and video_contrastive_loss at C = V captions and videos of T
frames, every launch group the op makes (Triton kernels, cuBLAS products, torch passes) with:
its launches, matrix FLOPs, HBM bytes, L2-to-SM bytes (what the Triton tiles load: the interpreter's
`kernels.interpret.count` measures the same quantity), the grid (waves, or persistent), the
pipeline stages, and an estimated time

    time = launches x max(FLOPs / (fraction x 800 TFLOP/s), HBM bytes / 3.35 TB/s, L2 bytes / 10 TB/s)

per launch, summed, against the op's floor (its matrix FLOPs at the full 800 TFLOP/s). The
FLOP formulas are the ones `tests/test_kernel_counts.py` checks against the interpreter's counts
at small sizes, as are the bytes the forward's tiles load. L2 bytes are what the Triton tiles
load from L2 plus what a chunk meant to stay in L2 (G, S, a slab accumulator) moves there; the
column "L2 TB/s" is the bandwidth the modelled time asks of it.

The fractions of 800 TFLOP/s (stated, not measured here: this machine has no GPU; the GPU
check writes these estimates beside its measurements, so the first GPU run tests them):

- CUBLAS = 0.85: a large bf16 GEMM through cuBLAS (NVIDIA's "New cuBLAS 12.0 Features and
  Matrix Multiplication Performance on NVIDIA Hopper GPUs" shows H100 SXM bf16 GEMMs near
  their dense peak; 0.85 x 800 = 680 TFLOP/s, about 69% of the 989 TFLOP/s dense peak).
- TRITON = 0.65: a pipelined Triton tile loop (cp.async, three stages, one wgmma group in
  flight) with an elementwise epilogue over a 128 x 128 tile of 512-deep products. The Triton
  matmul tutorial reports cuBLAS parity for plain GEMMs; FlashAttention-3 (Shah et al., 2024)
  reports 75% of the H100's peak for a warp-specialised attention kernel and 35% for the
  FlashAttention-2 design (pipelined loads without warp specialisation, head dimension 64-128,
  where the softmax costs 4-8 times more per FLOP than here). 0.65 x 800 = 520 TFLOP/s sits
  between, nearer the GEMM (the epilogue is 2 exp per 1024 FLOPs at D = 512).
- Elementwise passes (no matrix FLOPs) are bandwidth-bound.
- L2 = 10 TB/s (an assumption, the model's weakest number): a 128 x 128-tile Triton matmul
  loads one byte from L2 per 64 FLOPs, and such kernels are reported near cuBLAS speed on an
  H100 (600+ TFLOP/s), which asks about 10 TB/s of the L2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

PEAK = 800e12  # bf16 dense FLOP/s the floors are stated against
HBM = 3.35e12  # bytes/s, H100 SXM
L2_BW = 10e12  # bytes/s from L2 to the SMs (an assumption: see the module docstring)
L2_BYTES = 50 << 20
SMS = 132
CUBLAS, TRITON = 0.85, 0.65
FRACTION = {"cublas": CUBLAS, "triton": TRITON, "torch": CUBLAS}


@dataclasses.dataclass
class Launches:
    """One group of identical launches (or a group whose totals are given)."""
    name: str
    kind: str  # "triton" (a tensor-core Triton kernel), "cublas", "elementwise" (Triton or torch, no matrix FLOPs)
    count: int
    flops: float  # all launches together
    hbm: float  # bytes from and to HBM, all launches together
    l2: float = 0.0  # bytes the Triton tiles load (L2 to SM), all launches together
    grid: str = "-"
    stages: int | None = None

    def time(self) -> float:
        rate = FRACTION.get(self.kind, 1.0) * PEAK
        per = max(self.flops / self.count / rate if self.flops else 0.0, self.hbm / self.count / HBM,
                  self.l2 / self.count / L2_BW)
        return self.count * per

    def l2_demand(self) -> float:
        """L2-to-SM bandwidth (bytes/s) the modelled time asks for."""
        return self.l2 / self.time() if self.l2 and self.time() else 0.0


def _grid_text(programs: int, persistent: bool = False, sms: int = SMS) -> str:
    from .common import waves

    if persistent:
        items = programs
        progs = min(items, sms)
        busiest = -(-items // progs)
        return f"persistent {progs} x <= {busiest} items ({items / (progs * busiest):.0%} even)"
    n_waves, last = waves(programs, sms)
    return f"{programs} programs, {n_waves} wave{'s' if n_waves > 1 else ''} (last {last:.0%})"


def _tile_l2(flops: float, block_m: int, block_n: int, itemsize: int = 2) -> float:
    """Bytes a streamed [block_m, block_n] tile product loads per FLOP x FLOPs: both operands per
    feature step, (block_m + block_n) x BLOCK_K x itemsize for 2 block_m block_n BLOCK_K FLOPs."""
    return flops * (block_m + block_n) * itemsize / (2 * block_m * block_n)


def contrastive(B: int, D: int, sms: int = SMS) -> list[Launches]:
    """contrastive_loss (symmetric InfoNCE), bf16, forward and backward: kernels/contrastive.py and
    kernels.common.chunked_backward."""
    import torch

    from . import contrastive
    from .common import backward_plan

    fwd = contrastive.candidates(torch.bfloat16, D, small=False, arch=90)[0]
    grad = contrastive.grad_candidates(torch.bfloat16, D, small=False, arch=90)[0]
    e, f4 = 2, 4
    rows_c, blocks, per, split = contrastive.lse_plan(B, B, fwd, sms)
    chunks = -(-B // rows_c)
    flops = 2.0 * B * B * D
    # forward: Q once, K once per row chunk (32 MB at B = 32768: it stays in L2 within a launch);
    # partials: [3, split, B] rows, [2, blocks, B] columns per chunk, written then read by the merges
    col_part = chunks * 2 * blocks * B * f4
    out = [Launches("contrastive_lse_kernel (forward)", "triton", chunks, flops,
                    B * D * e + chunks * B * D * e + 3 * split * B * f4 + col_part,
                    _tile_l2(flops, fwd["BLOCK_M"], fwd["BLOCK_N"]), _grid_text(blocks * split, sms=sms),
                    fwd["num_stages"]),
           Launches("merge partials (torch)", "elementwise", chunks, 0.0, 2 * col_part + 3 * split * B * f4)]
    slab, rows_g, blocks_g, per_g, split_g = backward_plan(B, B, D, e, grad["BLOCK_M"], grad["BLOCK_N"], sms)
    n_slabs, n_chunks = -(-B // slab), -(-B // rows_g)
    launches = n_slabs * n_chunks
    g_bytes = B * B * e  # G, written by the kernel and read by cuBLAS twice: in L2 (12 MB chunks)
    # the kernel: Q once per slab, K once (the slab stays in L2 across its chunks); G stays in L2
    out.append(Launches("contrastive_grad_kernel (G)", "triton", launches, flops, n_slabs * B * D * e + B * D * e,
                        _tile_l2(flops, grad["BLOCK_M"], grad["BLOCK_N"]) + g_bytes,
                        _grid_text(blocks_g * split_g, persistent=True, sms=sms), grad["num_stages"]))
    # dA += G K_slab: the float32 dA rows read and rewritten from HBM once per slab
    out.append(Launches("cuBLAS dQ += G K_slab", "cublas", launches, flops, n_slabs * B * D * 2 * f4))
    # dB_slab += G^T Q_c: the slab accumulator (16 MB) in L2; Q read from HBM once per slab
    out.append(Launches("cuBLAS dK_slab += G^T Q_c", "cublas", launches, flops, n_slabs * B * D * e))
    out.append(Launches("dK slab scale + cast (torch)", "elementwise", n_slabs, 0.0, B * D * e))
    out.append(Launches("dQ scale + cast (torch)", "elementwise", 1, 0.0, B * D * (2 * f4 + e)))
    return out


def sigmoid(B: int, D: int, sms: int = SMS) -> list[Launches]:
    """sigmoid_loss, bf16, forward and backward: kernels/sigmoid.py (per column slab and row chunk:
    cuBLAS S, one fused Triton pass, two cuBLAS gradient products)."""
    from .sigmoid import plan

    e, f4 = 2, 4
    slab, R = plan(B, B, D)
    n_slabs, n_chunks = -(-B // slab), -(-B // R)
    launches = n_slabs * n_chunks
    flops = 2.0 * B * B * D
    # S [R, slab] float32 and G stay in L2 (16 + 8 MB); K's slab is read once per slab, Q once per slab
    return [
        Launches("cuBLAS S = Q_c K_slab^T (float32)", "cublas", launches, flops, n_slabs * B * D * e + B * D * e,
                 l2=B * B * f4),
        Launches("sigmoid_rows_kernel (loss, G)", "elementwise", launches, 0.0, 0.0, l2=B * B * (f4 + e),
                 grid=f"{-(-R // 4)} programs"),
        # dQ's float32 rows read and rewritten from HBM once per slab
        Launches("cuBLAS dQ_c += G K_slab", "cublas", launches, flops, n_slabs * B * D * 2 * f4, l2=B * B * e),
        # dK's slab accumulator in L2, its float32 rows written once
        Launches("cuBLAS dK_slab += G^T Q_c", "cublas", launches, flops, B * D * f4, l2=B * B * e),
        Launches("row partials sum, casts (torch)", "elementwise", 1, 0.0, 2 * B * D * (f4 + e) + 3 * n_slabs * B * f4),
    ]


def distillation(B: int, D: int, sms: int = SMS) -> list[Launches]:
    """distillation_loss (student D = teacher D), bf16: kernels/distill.py, the same chunked
    backward as InfoNCE with both products per tile."""
    import torch

    from . import distill
    from .common import backward_plan, chunk_rows, column_split

    e, f4 = 2, 4
    cfg = distill.stats_candidates(torch.bfloat16, small=False)[0]
    grad = distill.grad_candidates(torch.bfloat16, D, small=False)[0]
    rows_c = chunk_rows(B, B, cfg["BLOCK_M"], (1 << 23) // 5 * cfg["BLOCK_M"])
    blocks = -(-rows_c // cfg["BLOCK_M"])
    per, split = column_split(B, blocks, cfg["BLOCK_N"], sms)
    chunks = -(-B // rows_c)
    both = 2.0 * B * B * (D + D)
    col_part = chunks * 5 * blocks * B * f4
    out = [Launches("distill_fwd_kernel (forward, both products)", "triton", chunks, both,
                    2 * B * D * e + chunks * 2 * B * D * e + 5 * split * B * f4 + col_part,
                    _tile_l2(both, cfg["BLOCK_M"], cfg["BLOCK_N"]), _grid_text(blocks * split, sms=sms),
                    cfg["num_stages"]),
           Launches("merge partials (torch)", "elementwise", chunks, 0.0, 2 * col_part)]
    slab, rows_g, blocks_g, _, split_g = backward_plan(B, B, D, e, grad["BLOCK_M"], grad["BLOCK_N"], sms)
    n_slabs, n_chunks = -(-B // slab), -(-B // rows_g)
    launches = n_slabs * n_chunks
    flops = 2.0 * B * B * D
    out.append(Launches("distill_grad_kernel (G, both products)", "triton", launches, both,
                        n_slabs * 2 * B * D * e + 2 * B * D * e,
                        _tile_l2(both, grad["BLOCK_M"], grad["BLOCK_N"]) + B * B * e,
                        _grid_text(blocks_g * split_g, persistent=True, sms=sms), grad["num_stages"]))
    out.append(Launches("cuBLAS dA += G B_slab", "cublas", launches, flops, n_slabs * B * D * 2 * f4))
    out.append(Launches("cuBLAS dB_slab += G^T A_c", "cublas", launches, flops, n_slabs * B * D * e))
    out.append(Launches("casts (torch)", "elementwise", 1, 0.0, 2 * B * D * (2 * f4 + e)))
    return out


def _frame_passes(T: int, D: int) -> dict:
    import torch
    import triton

    from . import frames

    t_pad = triton.next_power_of_2(T)
    sim = frames.sim_candidates(torch.bfloat16, D, T, small=False, arch=90)[0]
    dtext = frames.dtext_candidates(torch.bfloat16, T, small=False)[0]
    dfr = frames.dframes_candidates(torch.bfloat16, T, small=False)[0]
    return dict(t_pad=t_pad, sim=sim, dtext=dtext, dframes=dfr)


def _sim_programs(C: int, V: int, sim: dict, sms: int) -> int:
    """The similarity forward's grid, as its launcher plans it (kernels/frames.py)."""
    import triton

    from .common import column_split

    blocks = -(-C // sim["BLOCK_C"])
    _, split = column_split(V, blocks, sim["BLOCK_V"], sms, min_cols=triton.cdiv(512, sim["T_PAD"]))
    return blocks * split


def topk_frames(C: int, T: int, D: int, sms: int = SMS) -> list[Launches]:
    """topk_frame_similarity (C captions x V = C videos of T frames), bf16, forward and backward:
    the fused similarity + top-k forward and the two gradient kernels (kernels/frames.py)."""
    p = _frame_passes(T, D)
    e, f4 = 2, 4
    V = C
    unit = 2.0 * C * V * p["t_pad"] * D
    frames_b, text_b = V * T * D * e, C * D * e
    sim, dt, dfr = p["sim"], p["dtext"], p["dframes"]
    out_pairs = C * V * (f4 + 4 * ((T + 31) // 32))  # sim [C, V] float32 and the chosen frames' bits
    return [
        Launches("topk_sim_fwd_kernel", "triton", 1, unit, frames_b + text_b + out_pairs,
                 _tile_l2(unit, sim["BLOCK_C"], sim["BLOCK_V"] * p["t_pad"]),
                 _grid_text(_sim_programs(C, V, sim, sms), sms=sms), sim["num_stages"]),
        Launches("topk_sim_dtext_kernel", "triton", 1, unit, frames_b + out_pairs + C * D * f4,
                 unit / 101.0, "-", dt["num_stages"]),
        Launches("topk_sim_dframes_kernel", "triton", 1, unit, text_b + out_pairs + V * T * D * f4,
                 unit / 101.0, "-", dfr["num_stages"]),
        Launches("unit_grad_kernel (raw-input gradients)", "elementwise", 2, 0.0, 2 * (frames_b + V * T * D * f4)),
    ]


def video_contrastive(C: int, T: int, D: int, sms: int = SMS) -> list[Launches]:
    """video_contrastive_loss: the similarity forward, the InfoNCE over its [C, V] scores (torch
    on the C x V matrix) and the backward, which recomputes the forward per video block (the
    chosen frames' bits are not kept across the loss) before d text and d frames."""
    fwd = topk_frames(C, T, D, sms)
    recompute = dataclasses.replace(fwd[0], name="topk_sim_fwd_kernel (recomputed in the backward)")
    loss = Launches("InfoNCE over the [C, V] scores (torch)", "elementwise", 1, 0.0, 6 * C * C * 4)
    return [fwd[0], loss, recompute] + fwd[1:]


FLOOR_UNITS = {"contrastive_loss": 8, "sigmoid_loss": 6, "distillation_loss": 12,
               "topk_frame_similarity": 3, "video_contrastive_loss": 4}
TARGETS = {"contrastive_loss": 1.5, "sigmoid_loss": 1.3, "distillation_loss": 1.6, "topk_frame_similarity": 1.5,
           "video_contrastive_loss": 2.0}


def table(B: int = 32768, D: int = 512, C: int = 8192, T: int = 16, sms: int = SMS) -> dict:
    """{op: {"launches": [...], "time_ms", "floor_ms", "ratio", "target"}}."""
    ops = {
        "contrastive_loss": (contrastive(B, D, sms), B * B * D),
        "sigmoid_loss": (sigmoid(B, D, sms), B * B * D),
        "distillation_loss": (distillation(B, D, sms), B * B * D),
        "topk_frame_similarity": (topk_frames(C, T, D, sms), 2 * C * C * T * D),
        "video_contrastive_loss": (video_contrastive(C, T, D, sms), 2 * C * C * T * D),
    }
    out = {}
    for op, (launches, unit) in ops.items():
        floor = FLOOR_UNITS[op] * unit / PEAK
        total = sum(x.time() for x in launches)
        out[op] = {"launches": [dict(dataclasses.asdict(x), time_ms=x.time() * 1e3,
                                     l2_demand_tbs=x.l2_demand() / 1e12) for x in launches],
                   "time_ms": total * 1e3, "floor_ms": floor * 1e3, "ratio": total / floor, "target": TARGETS[op],
                   "flops": sum(x.flops for x in launches), "floor_flops": FLOOR_UNITS[op] * unit}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=32768)
    parser.add_argument("--D", type=int, default=512)
    parser.add_argument("--frames", type=int, default=8192, help="captions = videos of the frame ops")
    parser.add_argument("--T", type=int, default=16)
    parser.add_argument("--json", help="write the table as JSON")
    args = parser.parse_args(argv)
    t = table(args.B, args.D, args.frames, args.T)
    print(f"H100 model: {PEAK / 1e12:.0f} TFLOP/s x fraction (cuBLAS {CUBLAS}, Triton {TRITON}), "
          f"HBM {HBM / 1e12:.2f} TB/s, L2 {L2_BW / 1e12:.0f} TB/s; B = {args.B}, D = {args.D}, "
          f"frames C = V = {args.frames}, T = {args.T}, bf16")
    for op, row in t.items():
        print(f"\n{op}: {row['time_ms']:.2f} ms, floor {row['floor_ms']:.2f} ms -> {row['ratio']:.2f}x "
              f"(target <= {row['target']}x){'' if row['ratio'] <= row['target'] else '  OVER TARGET'}; "
              f"matrix FLOPs {row['flops'] / row['floor_flops']:.2f}x the floor")
        print(f"  {'launch':42} {'n':>4} {'TFLOP':>7} {'HBM GB':>7} {'L2 GB':>7} {'ms':>7} {'L2 TB/s':>7} "
              f"{'stg':>3}  grid")
        for x in row["launches"]:
            print(f"  {x['name']:42} {x['count']:4d} {x['flops'] / 1e12:7.3f} {x['hbm'] / 1e9:7.2f} "
                  f"{x['l2'] / 1e9:7.2f} {x['time_ms']:7.3f} {x['l2_demand_tbs']:7.1f} "
                  f"{x['stages'] or '-':>3}  {x['grid']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(t, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
