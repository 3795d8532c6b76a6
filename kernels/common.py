"""What every Triton kernel module shares: the registration of launchers as torch custom ops,
the block-configuration dispatcher, the tile product, input precision and small configurations.

On CUDA every launcher is a `torch.library.triton_op` whose kernels are launched through
`wrap_triton`: torch.compile sees the kernels themselves (no graph break, Inductor schedules them)
and the fake implementation is the launcher traced on fake tensors (allocations only).

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors: the CI machine has no GPU),
wrap_triton cannot trace interpreted kernels, so the launchers become plain opaque
`torch.library.custom_op`s instead, with the same schema; their fake implementation runs the
launcher with kernel launches skipped. opcheck and torch.compile(fullgraph=True) then exercise
the same schemas, fake implementations and autograd plumbing on the CPU.

Block configurations: each launcher has a list of candidates, known good first. By default the
first is launched (no timing, no device query). With FITCLIP_TRITON_AUTOTUNE=1 the launcher goes
through a `triton.autotune` over all candidates instead: each distinct shape key is timed once
per process and the fastest kept (outputs that kernels accumulate into are restored between
timings). Graphs traced by torch.compile always use the default.
"""
from __future__ import annotations

import functools
import os
import threading

import torch
import triton
import triton.language as tl

from . import interpreting

_state = threading.local()
TUNERS: dict = {}  # (kernel, site, candidates, key, restore) -> triton.autotune, per process


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) through wrap_triton (skipped while computing fake outputs
    under the interpreter, where the kernel cannot see fake tensors)."""
    if getattr(_state, "skip", False):
        return
    if interpreting():  # an opaque op: nothing to trace, and torch < 2.12's wrap_triton rejects interpreted kernels
        kernel[grid](*args, **kwargs)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def triton_op(name: str, mutates_args=()):
    """Decorator: the launcher `fn` as the custom op fitclip_ext::<name>."""
    qualname = "fitclip_ext::" + name

    def dec(fn):
        if not interpreting():
            return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)

        @functools.wraps(fn)
        def fake(*args, **kwargs):
            _state.skip = True
            try:
                return fn(*args, **kwargs)
            finally:
                _state.skip = False

        op.register_fake(fake)
        return op

    return dec


def autotuning() -> bool:
    return os.environ.get("FITCLIP_TRITON_AUTOTUNE", "0") not in ("", "0")


def _do_bench(kernel_call, quantiles):
    """The autotuner's timer: CUDA events on a GPU; the wall clock under the interpreter."""
    if interpreting():
        import time

        t0 = time.perf_counter()
        kernel_call()
        ms = (time.perf_counter() - t0) * 1e3
        return [ms] * len(quantiles)
    import triton.testing

    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


def configured(kernel, candidates: list[dict], key: list[str], restore_value: tuple[str, ...] = (), site: str = ""):
    """(kernel to launch, its block configuration as launch keywords) for a candidate list whose
    first entry is the default: the plain kernel and the default, or under
    FITCLIP_TRITON_AUTOTUNE=1 a triton.autotune over every candidate (keyed on `key` and the
    tensor dtypes) and no keywords, one per launch site (its configs_timings then belong to that
    site's latest shape). Grids must then be functions of the configuration."""
    if len(candidates) == 1 or not autotuning() or _tracing():
        return kernel, dict(candidates[0])
    ident = (kernel, site, tuple(tuple(sorted(c.items())) for c in candidates), tuple(key), tuple(restore_value))
    tuner = TUNERS.get(ident)
    if tuner is None:
        configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in candidates]
        tuner = triton.autotune(configs, key=list(key), restore_value=list(restore_value), do_bench=_do_bench)(kernel)
        TUNERS[ident] = tuner
    return tuner, {}


# ----------------------------------------------------------------------------- tiles and configurations

@triton.jit
def tile_product(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_an, stride_ad, stride_bn, stride_bd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A[rows] @ B[cols]^T, float32 accumulate."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dk = d0 + offs_k
        a = tl.load(a_ptr + rows[:, None] * stride_an + dk[None, :] * stride_ad,
                    mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + dk[:, None] * stride_bd,
                    mask=col_ok[None, :] & (dk[:, None] < D), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's float32 matmul setting; half types run on tensor cores anyway."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def small_configs(small: bool | None) -> bool:
    """The minimum tl.dot tiles: when `small` says so, else with FITCLIP_TRITON_CONFIG=small, or
    under the interpreter unless FITCLIP_TRITON_CONFIG=gpu (the block configurations an H100
    launches, also under the interpreter: for the tests that count FLOPs and bytes and for bf16
    numerics at the GPU's tile sizes)."""
    if small is not None:
        return small
    mode = os.environ.get("FITCLIP_TRITON_CONFIG", "")
    if mode == "gpu":
        return False
    return interpreting() or mode == "small"


def block_config(bm, bn, bk, warps, stages, **extra) -> dict:
    """A tile configuration as launch keywords (BLOCK_M/N/K, extras, num_warps, num_stages)."""
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra, num_warps=warps, num_stages=stages)


def half_grad_candidates(D: int) -> list[dict]:
    """bf16/fp16 candidates of the distillation's gradient kernel, which accumulates
    out[rows, D chunk] = G @ B[:, D chunk] in registers, default first: each D chunk
    recomputes the tile, so a wider chunk saves tile products at the price of smaller tiles
    (register budget: no spills with Triton 3.6 and 3.8)."""
    block_do = 256 if D > 128 else 128
    out = [block_config(64, 64, 64, 8, 2, BLOCK_DO=block_do), block_config(64, 64, 64, 8, 3, BLOCK_DO=block_do),
           block_config(64, 32, 64, 8, 2, BLOCK_DO=block_do)]
    if D > 256:
        out.append(block_config(64, 16, 64, 8, 2, BLOCK_DO=512))  # one chunk up to D = 512: no recomputed tiles
    return out


def scale_tensor(scale: torch.Tensor, device) -> torch.Tensor:
    """A logit scale as the [1] float32 device tensor the kernels read."""
    return scale.detach().to(device=device, dtype=torch.float32).reshape(1)


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 with float32 accumulation: cuBLAS with a float32 output for half inputs on
    CUDA; under the interpreter the same operands upcast on the CPU."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())
