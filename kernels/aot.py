"""Ahead-of-time compile of every shipped Triton kernel configuration, without a GPU.

    python -m fitclip_ext.kernels.aot [--arch 80 90] [--scope all|defaults|quick] [--no-sass] [--json out.json]

For each kernel, each dtype and each block configuration the dispatcher can pick (--scope
defaults: only those it launches without FITCLIP_TRITON_AUTOTUNE), compiles for sm_80 and
sm_90, in the two specialisations the JIT makes (sizes divisible by 16, as for D = 512, and odd
sizes), reads the registers and the stack frame (spills) of the cubin Triton built
(cuobjdump --dump-resource-usage) and the shared memory from the metadata, and checks for the
matrix instructions expected (HGMMA on sm_90, HMMA on sm_80, for bf16/fp16/tf32 dots) in the
SASS (or, with --no-sass, the PTX instructions ptxas turns into them). Exits non-zero on a
compile failure, a spill, a missing matrix instruction, or more shared memory than the
architecture gives a block. Each build also reports what its PTX says about overlapping loads
with products: the pipeline stages, the cp.async (and TMA) copies, the wgmma.wait_group values
(>= 1: a warpgroup MMA group left in flight) and the CTAs per SM its shared memory and registers
allow. An aligned bf16/fp16 tensor-core build that does not overlap (no cp.async/TMA, or on
sm_90 no wgmma group left in flight) is a problem like a spill (--allow-unpipelined reports it
without failing, for trying configurations). Must run without
TRITON_INTERPRET (interpreted kernels cannot be compiled). `make test` runs --scope defaults --no-sass (every launch the dispatcher makes by
default, about 2 minutes on 2 cores with a cold cache); `make aot` runs everything.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _ptr(dtype):
    return "*" + _TY[dtype]


SCOPES = ("defaults", "all", "quick")


def _cases(scope: str = "all"):
    """What the launchers can launch: (kernel, dtype, precision, label, signature, constexprs, cfg).
    scope "all": every candidate configuration (FITCLIP_TRITON_AUTOTUNE=1 may pick any);
    "defaults": for every kernel, dtype, flag combination and size bucket, the configuration the
    dispatcher launches without autotuning (the first candidate); "quick": defaults for bf16 and
    tf32 at D = 512, k = 4 only."""
    quick = scope == "quick"

    def pick(cands):  # the default is each candidate list's first entry
        return cands if scope == "all" else cands[:1]

    dtypes = [(torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee"),
              (torch.float64, "ieee")]
    if quick:
        dtypes = [(torch.bfloat16, "ieee"), (torch.float32, "tf32")]
    for dtype, prec in dtypes:
        for case in _dtype_cases(dtype, prec, quick, pick):
            if dtype == torch.float64:  # the kernels' buffers are in the compute dtype
                case = case[:5] + ({k: ("*fp64" if v == "*fp32" else v) for k, v in case[5].items()},) + case[6:]
            yield case


# Integer arguments that the launchers only ever pass as multiples of the block sizes (chunk
# starts, column ranges): divisible by 16 in every JIT specialisation, also when n and m are odd.
_ALIGNED = {"contrastive_lse_fwd": ("row0", "cols_per_split"), "contrastive_grad": ("row0", "col0", "cols_per_split"),
            "distill_fwd": ("row0", "cols_per_split"), "distill_grad": ("row0", "col0", "cols_per_split")}


def _dtype_cases(dtype, prec, quick, pick):
    """The builds of one (dtype, precision): see _cases."""
    from . import contrastive, distill, frames, sigmoid

    t = _ptr(dtype)
    # InfoNCE: both kernels share the configurations (by dtype and architecture; D's alignment)
    fwd_sig = {
        "q_ptr": t, "k_ptr": t, "scale_ptr": "*fp32", "row_part_ptr": "*fp32",
        "col_part_ptr": "*fp32", "n": "i32", "m": "i32", "D": "i32", "row0": "i32", "row_end": "i32",
        "offset": "i32", "cols_per_split": "i32", "row_field": "i32", "col_field": "i32",
        "stride_qn": "i32", "stride_qd": "i32", "stride_kn": "i32", "stride_kd": "i32",
    }
    grad_sig = {
        "q_ptr": t, "k_ptr": t, "g_ptr": t, "ds_part_ptr": "*fp32", "scale_ptr": "*fp32", "inv_w_ptr": "*fp32",
        "row_lse_ptr": "*fp32", "row_w_ptr": "*fp32", "col_lse_ptr": "*fp32", "col_w_ptr": "*fp32",
        "eps_ptr": "*fp32", "n": "i32", "m": "i32", "D": "i32", "row0": "i32", "row_end": "i32", "col0": "i32",
        "col_end": "i32", "offset": "i32", "cols_per_split": "i32", "splits": "i32",
        "stride_qn": "i32", "stride_qd": "i32", "stride_kn": "i32", "stride_kd": "i32", "stride_g": "i32",
    }
    for D, arch in itertools.product((512,) if quick else (40, 128, 512, 768, 1024), (80, 90)):
        for name, fn, cands, flag in (
                ("contrastive_lse_fwd", "contrastive.contrastive_lse_kernel",
                 contrastive.candidates(dtype, D, small=False, precision=prec, arch=arch), "WITH_COL"),
                ("contrastive_grad", "contrastive.contrastive_grad_kernel",
                 contrastive.grad_candidates(dtype, D, small=False, precision=prec, arch=arch), "HAS_COL")):
            for (i, cfg), with_col in itertools.product(enumerate(pick(cands)), (True, False)):
                yield (name, fn, dtype, prec, f"c{i} D{D} " + ("col" if with_col else "-"),
                       fwd_sig if name == "contrastive_lse_fwd" else grad_sig, {flag: with_col},
                       dict(cfg, ARCH=arch, D16=D % 16 == 0, ALIGNED=_ALIGNED[name]))
    dst_sig = {
        "a_ptr": t, "b_ptr": t, "c_ptr": t, "e_ptr": t, "s_scale_ptr": "*fp32", "t_scale_ptr": "*fp32",
        "row_part_ptr": "*fp32", "col_part_ptr": "*fp32", "n": "i32", "m": "i32", "D": "i32", "Dt": "i32",
        "row0": "i32", "row_end": "i32", "cols_per_split": "i32", "row_field": "i32", "col_field": "i32",
        "stride_an": "i32", "stride_ad": "i32", "stride_bn": "i32", "stride_bd": "i32",
        "stride_cn": "i32", "stride_cd": "i32", "stride_en": "i32", "stride_ed": "i32",
    }
    for i, cfg in enumerate(pick(distill.stats_candidates(dtype, small=False, precision=prec))):
        yield ("distill_fwd", "distill.distill_fwd_kernel", dtype, prec, f"c{i}", dst_sig, {},
               dict(cfg, ALIGNED=_ALIGNED["distill_fwd"]))
    dgr_sig = {
        "a_ptr": t, "b_ptr": t, "c_ptr": t, "e_ptr": t, "g_ptr": t, "ds_part_ptr": "*fp32",
        "s_scale_ptr": "*fp32", "t_scale_ptr": "*fp32", "inv_w_ptr": "*fp32", "row_s_ptr": "*fp32",
        "row_t_ptr": "*fp32", "row_w_ptr": "*fp32", "col_s_ptr": "*fp32", "col_t_ptr": "*fp32",
        "col_w_ptr": "*fp32", "n": "i32", "m": "i32", "D": "i32", "Dt": "i32", "row0": "i32",
        "row_end": "i32", "col0": "i32", "col_end": "i32", "cols_per_split": "i32", "splits": "i32",
        "stride_an": "i32", "stride_ad": "i32",
        "stride_bn": "i32", "stride_bd": "i32", "stride_cn": "i32", "stride_cd": "i32", "stride_en": "i32",
        "stride_ed": "i32", "stride_g": "i32",
    }
    for i, cfg in enumerate(pick(distill.grad_candidates(dtype, 512, small=False, precision=prec))):
        yield ("distill_grad", "distill.distill_grad_kernel", dtype, prec, f"c{i}", dgr_sig, {},
               dict(cfg, ALIGNED=_ALIGNED["distill_grad"]))
    # frame kernels: configurations change with T (T_PAD, bit-set words) and, for the forward,
    # with the architecture (the InfoNCE forward's tiles); k is a runtime loop bound
    sim_sig = {
        "text_ptr": t, "frames_ptr": t, "mask_ptr": "*i8", "sim_ptr": "*fp32", "bits_ptr": "*i32",
        "text_norm_ptr": "*fp32", "frames_norm_ptr": "*fp32", "C": "i32", "V": "i32", "T": "i32", "D": "i32",
        "k": "i32", "vids_per_split": "i32", "stride_tc": "i32", "stride_td": "i32", "stride_fv": "i32",
        "stride_ft": "i32", "stride_fd": "i32",
    }
    dtext_sig = {
        "grad_ptr": "*fp32", "gscale_ptr": "*fp32", "bits_ptr": "*i32", "frames_ptr": t, "out_ptr": "*fp32",
        "frames_norm_ptr": "*fp32", "C": "i32", "V": "i32", "T": "i32", "D": "i32", "k": "i32",
        "vids_per_split": "i32", "stride_fv": "i32", "stride_ft": "i32", "stride_fd": "i32",
    }
    dframes_sig = {
        "grad_ptr": "*fp32", "gscale_ptr": "*fp32", "bits_ptr": "*i32", "text_ptr": t, "out_ptr": "*fp32",
        "text_norm_ptr": "*fp32", "C": "i32", "V": "i32", "T": "i32", "D": "i32", "k": "i32",
        "caps_per_split": "i32", "stride_tc": "i32", "stride_td": "i32",
    }
    frame_ts = (16,) if quick else (4, 16, 32, 64)
    for D, T, arch in itertools.product((512,) if quick else (512, 768), frame_ts, (80, 90)):
        cands = frames.sim_candidates(dtype, D, T, small=False, precision=prec, arch=arch)
        for i, cfg in enumerate(pick(cands)):
            yield ("topk_sim_fwd", "frames.topk_sim_fwd_kernel", dtype, prec, f"c{i} D{D} T{T} mask norm",
                   sim_sig, {"HAS_MASK": True, "NORMALIZE": True},
                   dict(cfg, ARCH=arch, D16=D % 16 == 0, ALIGNED=("vids_per_split",)))
    for T in frame_ts:
        for i, gcfg in enumerate(pick(frames.dtext_candidates(dtype, T, small=False, precision=prec))):
            yield ("topk_sim_dtext", "frames.topk_sim_dtext_kernel", dtype, prec, f"c{i} T{T} norm", dtext_sig,
                   {"NORMALIZE": True}, gcfg)
        for i, gcfg in enumerate(pick(frames.dframes_candidates(dtype, T, small=False, precision=prec))):
            yield ("topk_sim_dframes", "frames.topk_sim_dframes_kernel", dtype, prec, f"c{i} T{T} norm",
                   dframes_sig, {"NORMALIZE": True}, gcfg)
    if prec == "ieee" or dtype != torch.float32:  # no tl.dot: one build per storage dtype
        unit_sig = {"g_ptr": "*fp32", "x_ptr": t, "norm_ptr": "*fp32", "R": "i32", "D": "i32", "T": "i32",
                    "stride_xo": "i32", "stride_xi": "i32", "stride_xd": "i32"}
        yield ("unit_grad", "frames.unit_grad_kernel", dtype, "-", "-", unit_sig, {}, frames.unit_config(512, dtype))
    if prec == "ieee" or dtype != torch.float32:  # no tl.dot (cuBLAS does the GEMMs): one build per G dtype
        rows_sig = {"s_ptr": "*fp32", "g_ptr": t, "loss_ptr": "*fp32", "stats_ptr": "*fp32", "w_ptr": "*fp32",
                    "scale_ptr": "*fp32", "bias_ptr": "*fp32", "rows": "i32", "m": "i32", "n": "i32", "row0": "i32",
                    "col0": "i32", "offset": "i32", "stride_s": "i32", "stride_g": "i32"}
        cfg = sigmoid.rows_config(small=False, dtype=dtype)
        for has_w, with_grad in ((False, True), (True, True), (False, False)):
            yield ("sigmoid_rows", "sigmoid.sigmoid_rows_kernel", dtype, "-",
                   ("w " if has_w else "") + ("grad" if with_grad else "loss"), rows_sig,
                   {"HAS_W": has_w, "WITH_GRAD": with_grad}, cfg)
    sel_sig = {
        "frames_ptr": t, "text_ptr": t, "mask_ptr": "*i8", "idx_ptr": "*i64", "B": "i32", "T": "i32", "D": "i32",
        "k": "i32", "stride_fb": "i32", "stride_ft": "i32", "stride_fd": "i32", "stride_tb": "i32", "stride_td": "i32",
    }
    if prec == "ieee" or dtype != torch.float32:  # no tl.dot: one build per storage dtype
        for T, D in ([(16, 512)] if quick else [(4, 512), (16, 512), (32, 768), (64, 512), (64, 40)]):
            cands = frames.select_candidates(D, T, small=False, dtype=dtype)
            for i, cfg in enumerate(pick(cands)):
                yield ("select_frames", "frames.select_frames_kernel", dtype, "-", f"c{i} T{T} D{D} mask", sel_sig,
                       {"HAS_MASK": True}, cfg)


def _bin(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_one(case, arch: int, div16: bool = True, sass_check: bool = True) -> dict:
    """One build. div16: the integer arguments (sizes, strides) divisible by 16, as the JIT
    specialises them for D = 512 and batch sizes that are multiples of 16 (vectorised loads,
    cp.async pipelining); else only the pointers and leading strides are (odd sizes).
    sass_check: look for the matrix instruction in the disassembled SASS (0.4 s a build), else
    in the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget

    import importlib

    kernel_name, fn_path, dtype, prec, label, sig, flags, cfg = case
    # ARCH: the architecture the dispatcher picks this configuration for; D16: the case's D is a
    # multiple of 16, which the JIT's specialisation keeps divisible whatever the other sizes;
    # ALIGNED: integer arguments the launchers always pass as multiples of the block sizes
    always = ({"D"} if cfg.get("D16") else set()) | set(cfg.get("ALIGNED", ()))
    cfg = {k: v for k, v in cfg.items() if k not in ("ARCH", "D16", "ALIGNED")}
    module, attr = fn_path.split(".")
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
    sig = dict(sig)
    launch = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in cfg.items() if k not in launch}
    constexprs.update(flags)
    if "INPUT_PRECISION" in fn.arg_names:
        constexprs["INPUT_PRECISION"] = prec
    # What the launcher's specialisation sees for contiguous inputs: unit inner strides,
    # 16-divisible pointers and leading strides.
    for name in list(sig):
        if name.startswith("stride_") and name[-1] == "d":
            constexprs[name] = 1
    for name in constexprs:
        sig[name] = "constexpr"
    names = fn.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if v.startswith("*") or (v == "i32" and (div16 or k.startswith("stride_") or k in always))}
    row = {"kernel": kernel_name, "dtype": str(dtype).replace("torch.", ""), "precision": prec,
           "label": label + (" /16" if div16 else " odd"), "config": cfg, "arch": f"sm_{arch}"}
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch)
    except Exception as err:  # reported, makes the run fail
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        row["error"] = f"{type(err).__name__}: {lines[-1][:300] if lines else ''}"
        return row
    row["shared_bytes"] = ck.metadata.shared
    row.update(pipeline_stats(ck.asm["ptx"], launch, ck.metadata.shared, arch))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        # Resource usage of the cubin Triton built (its own ptxas flags): registers, and the stack
        # frame, where spills go (a kernel without local arrays has none otherwise).
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True).stdout
        regs = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        local = re.search(r"LOCAL:(\d+)", usage)
        row["registers"] = int(regs.group(1)) if regs else None
        row["spill_bytes"] = (int(stack.group(1)) if stack else 0) + (int(local.group(1)) if local else 0)
        sass = subprocess.run([_bin("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True,
                              text=True).stdout if sass_check else None
    want = None
    if prec != "-" and dtype == torch.float64:
        want = "DMMA"  # (float64 mma.sync on sm_80 and sm_90)
    elif prec != "-" and (dtype != torch.float32 or prec == "tf32"):
        # Hopper's warpgroup MMA needs 64 rows per warpgroup; smaller tiles use the mma.sync
        # tensor-core path (d frames' rows are BLOCK_V * T_PAD frames).
        m_block = cfg.get("BLOCK_M", cfg.get("BLOCK_C", 0))
        if kernel_name == "topk_sim_dframes":
            m_block = cfg["BLOCK_V"] * cfg["T_PAD"]
        want = "HGMMA" if arch >= 90 and m_block >= 64 else "HMMA"
    row["matrix_instr"] = want
    if want:
        # The PTX instruction ptxas turns into that SASS one (wgmma.mma_async -> HGMMA,
        # mma.sync -> HMMA); with sass_check, the SASS itself.
        row["matrix_instr_found"] = (want in sass) if sass is not None else (PTX_MMA[want] in ck.asm["ptx"])
    else:
        row["matrix_instr_found"] = None
    row["local_memory_ops"] = len(re.findall(r"\b(LDL|STL)\b", sass)) if sass is not None else None
    return row


def pipeline_stats(ptx: str, launch: dict, shared: int, arch: int) -> dict:
    """What the PTX says about overlapping loads with products: the pipeline stages asked for,
    asynchronous global-to-shared copies (cp.async; cp.async.bulk is TMA), the values of
    wgmma.wait_group (a value >= 1 leaves a warpgroup MMA group in flight while the next is
    issued) and the CTAs per SM that the shared memory allows (registers are counted after
    the cubin is read, in `ctas_per_sm`)."""
    waits = sorted({int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)})
    return {"stages": launch.get("num_stages"), "warps": launch.get("num_warps"),
            "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)\.shared", ptx)),
            "tma": len(re.findall(r"cp\.async\.bulk", ptx)), "wgmma_waits": waits,
            "smem_ctas": SMEM_PER_SM[arch] // max(shared, 1) if shared else None}


# Shared memory per SM a kernel's blocks share, and registers per SM (64K 32-bit on both).
SMEM_PER_SM = {80: 167936, 90: 233472}
REGS_PER_SM = 65536


def ctas_per_sm(row) -> int | None:
    """Resident CTAs per SM given the build's shared memory and registers (at most 32)."""
    if row.get("registers") is None or not row.get("warps"):
        return None
    by_regs = REGS_PER_SM // (row["registers"] * 32 * row["warps"])
    by_smem = row.get("smem_ctas") or 32
    return max(0, min(32, by_regs, by_smem))


def overlaps(row) -> bool:
    """A tensor-core build that overlaps its loads with its products: asynchronous copies (cp.async
    or TMA) and, on sm_90 with warpgroup MMAs, a wait that leaves a group in flight."""
    if not (row.get("cp_async") or row.get("tma")):
        return False
    if row["arch"] == "sm_90" and row.get("matrix_instr") == "HGMMA":
        return any(w >= 1 for w in row.get("wgmma_waits") or [])
    return True


PTX_MMA = {"HGMMA": "wgmma.mma_async", "HMMA": "mma.sync", "DMMA": "mma.sync.aligned.m8n8k4.row.col.f64"}


# Shared memory a block may use (opt-in maximum): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB; a
# configuration above it fails at launch with OutOfResources.
SMEM_LIMIT = {"sm_80": 166912, "sm_90": 232448}


def _problems(row, require_pipeline: bool = False) -> list[str]:
    out = []
    if (require_pipeline and "error" not in row and row.get("matrix_instr") in ("HGMMA", "HMMA")
            and row["dtype"] in ("bfloat16", "float16") and row["label"].endswith("/16") and not overlaps(row)):
        out.append("tensor-core loop not pipelined (no cp.async/TMA, or no wgmma group left in flight)")
    if "error" in row:
        out.append("compile failed: " + row["error"])
    else:
        if row.get("spill_bytes"):
            out.append(f"{row['spill_bytes']} bytes of spills")
        limit = SMEM_LIMIT.get(row["arch"])
        if limit and (row.get("shared_bytes") or 0) > limit:
            out.append(f"{row['shared_bytes']} bytes of shared memory (limit {limit})")
        if row.get("matrix_instr_found") is False:
            out.append(f"no {row['matrix_instr']} in SASS")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM architectures to compile for")
    parser.add_argument("--scope", choices=SCOPES, default="all",
                        help="all: every candidate configuration (make aot); defaults: the configuration "
                             "launched without autotuning for every kernel, dtype and size bucket (make test); "
                             "quick: defaults for bf16 and tf32 at D=512 only")
    parser.add_argument("--json", type=Path, help="write the table as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--no-sass", action="store_true",
                        help="check the matrix instructions in the PTX instead of the disassembled SASS (faster)")
    parser.add_argument("--kernels", nargs="+", help="only these kernels (names as in the table, e.g. topk_sim_fwd)")
    parser.add_argument("--dtypes", nargs="+", help="only these dtypes (bfloat16, float16, float32, float64)")
    parser.add_argument("--allow-unpipelined", action="store_true",
                        help="report, without failing, bf16/fp16 tensor-core builds (16-aligned) whose loads do not "
                             "overlap their products (no cp.async/TMA, or every wgmma.wait_group waits for 0 groups)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    cases = [c for c in _cases(args.scope) if (not args.kernels or c[0] in args.kernels)
             and (not args.dtypes or str(c[2]).replace("torch.", "") in args.dtypes)]
    # a configuration marked ARCH is one the dispatcher picks for that architecture only
    jobs = [job for job in itertools.product(cases, args.arch, (True, False), (not args.no_sass,))
            if job[0][7].get("ARCH", job[1]) == job[1]]
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(tqdm(pool.map(compile_one, *zip(*jobs)), total=len(jobs), desc="compiling", unit="build",
                         disable=None))
    failed = 0
    unpipelined = 0
    print(f"{'kernel':17} {'arch':6} {'dtype':9} {'prec':5} {'case':31} {'regs':>4} {'spill':>5} {'smem':>7} "
          f"{'mma':5} {'stg':>3} {'cp.async':>8} {'tma':>3} {'waits':7} {'cta/sm':>6}")
    for row in rows:
        row["ctas_per_sm"] = ctas_per_sm(row)
        probs = _problems(row, not args.allow_unpipelined)
        failed += bool(probs)
        tensor_core = row.get("matrix_instr") in ("HGMMA", "HMMA") and row["dtype"] in ("bfloat16", "float16")
        unpipelined += tensor_core and row["label"].endswith("/16") and "error" not in row and not overlaps(row)
        mma = "-" if row.get("matrix_instr") is None else (row["matrix_instr"] if row.get("matrix_instr_found") else "MISSING")
        waits = ",".join(map(str, row.get("wgmma_waits") or [])) or "-"
        print(f"{row['kernel']:17} {row['arch']:6} {row['dtype']:9} {row['precision']:5} {row['label']:31} "
              f"{row.get('registers') or '-':>4} {row.get('spill_bytes', '-'):>5} {row.get('shared_bytes', '-'):>7} "
              f"{mma:5} {row.get('stages') or '-':>3} {row.get('cp_async', '-'):>8} {row.get('tma', '-'):>3} "
              f"{waits:7} {row.get('ctas_per_sm') or '-':>6}" + ("   <-- " + "; ".join(probs) if probs else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    print(f"{len(rows)} kernel builds, {failed} with problems; {unpipelined} aligned bf16/fp16 tensor-core builds "
          "do not overlap loads with products" + (" (allowed)" if args.allow_unpipelined else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
