"""Tools for the Triton interpreter (TRITON_INTERPRET=1): an exact bf16 `tl.dot`, and counting what
the kernels would do on a GPU.

- `exact_bf16_dot()`: the interpreter's `tl.dot` multiplies bf16 operands as their raw 16-bit
  patterns (wrong by ~1e10 on a 16x16 product, Triton 3.6 to 3.8), while bf16 loads and
  conversions are right. Inside this context manager bf16 operands are widened to float32
  first (bits << 16, exact), so the kernels' bf16 paths can be tested against float64.
- `count()`: while active, counts the matrix FLOPs of every `tl.dot` (2 * M * N * K from the
  operand shapes), the bytes every Triton load reads (the masked-in lanes times the item size:
  what each program pulls from L2, a proxy for L2 traffic), per kernel, and the FLOPs of the
  torch matrix products issued around the kernels (torch.mm / addmm / matmul / bmm and their
  Tensor-method and in-place forms, patched by name while counting). The counts mean what a GPU would do only with the GPU's block
  configurations: run with FITCLIP_TRITON_CONFIG=gpu (slow; B = 512 with 128-wide tiles takes
  seconds).

    python -m fitclip_ext.kernels.interpret   # the tables of docs/DESIGN.md (B = 512; frames C = V = 256)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys

import numpy as np
import torch


def _widened(h) -> np.ndarray:
    if h.dtype.is_bf16():
        return (h.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return h.data


def _dot(original, builder, a, b, d, *rest):
    if a.dtype.is_bf16() or b.dtype.is_bf16():
        from triton.runtime import interpreter

        out = np.matmul(_widened(a), _widened(b), dtype=np.float32).astype(d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)
    return original(builder, a, b, d, *rest)


@contextlib.contextmanager
def exact_bf16_dot():
    """tl.dot on bf16 operands widened to float32 under the interpreter (see the module docstring)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, *rest):
        return _dot(original, self, a, b, d, *rest)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = original


@dataclasses.dataclass
class Counts:
    """What the counted code did: per kernel [tl.dot FLOPs, loaded bytes], and torch matmul FLOPs
    and calls."""
    kernels: dict = dataclasses.field(default_factory=dict)
    torch_flops: int = 0
    torch_calls: int = 0

    @property
    def dot_flops(self) -> int:
        return sum(v[0] for v in self.kernels.values())

    @property
    def flops(self) -> int:
        return self.dot_flops + self.torch_flops

    def flops_per_byte(self, kernel: str) -> float:
        f, b = self.kernels[kernel]
        return f / b if b else math.inf


# The torch matrix products, patched by name while counting (a TorchFunctionMode would not see
# the ones inside the launchers' custom ops): (owner, attribute, index of the first operand).
_MATMULS = [(torch, "mm", 0), (torch, "matmul", 0), (torch, "bmm", 0), (torch, "addmm", 1), (torch, "baddbmm", 1),
            (torch.Tensor, "mm", 0), (torch.Tensor, "matmul", 0), (torch.Tensor, "__matmul__", 0),
            (torch.Tensor, "bmm", 0), (torch.Tensor, "addmm", 1), (torch.Tensor, "addmm_", 1),
            (torch.Tensor, "baddbmm_", 1)]


def _matmul_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.dim() == 1 or b.dim() == 1:
        return 2 * a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
    batch = a.shape[:-2].numel() if a.dim() > 2 else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


@contextlib.contextmanager
def count():
    """Yields a `Counts` filled while the block runs (interpreter only); bf16 dots are exact
    inside (as with `exact_bf16_dot`)."""
    from triton.runtime import interpreter

    counts = Counts()
    builder = interpreter.InterpreterBuilder
    executor = interpreter.GridExecutor
    orig_dot, orig_load, orig_call = builder.create_dot, builder.create_masked_load, executor.__call__
    current = ["?"]

    def entry():
        return counts.kernels.setdefault(current[0], [0, 0])

    def create_dot(self, a, b, d, *rest):
        m, k = a.data.shape[-2:]
        entry()[0] += 2 * m * k * b.data.shape[-1] * (int(np.prod(a.data.shape[:-2])) if a.data.ndim > 2 else 1)
        return _dot(orig_dot, self, a, b, d, *rest)  # bf16 widened: counting implies exact_bf16_dot

    def create_masked_load(self, ptrs, mask, other, *rest):
        item = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        entry()[1] += int(np.count_nonzero(mask.data)) * item
        return orig_load(self, ptrs, mask, other, *rest)

    def call(self, *args, **kwargs):
        saved, current[0] = current[0], self.fn.__name__
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            current[0] = saved

    def counted(fn, first):
        def wrapper(*args, **kwargs):
            counts.torch_flops += _matmul_flops(args[first], args[first + 1])
            counts.torch_calls += 1
            return fn(*args, **kwargs)
        return wrapper

    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in _MATMULS]
    builder.create_dot, builder.create_masked_load, executor.__call__ = create_dot, create_masked_load, call
    try:
        for owner, name, first in _MATMULS:
            setattr(owner, name, counted(getattr(owner, name), first))
        yield counts
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        builder.create_dot, builder.create_masked_load, executor.__call__ = orig_dot, orig_load, orig_call


# ----------------------------------------------------------------------------- the docs' table

def _contrastive_case(B: int, D: int, dtype: torch.dtype) -> Counts:
    import fitclip_ext

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype).requires_grad_()
    with count() as c:
        fitclip_ext.contrastive_loss(q, k, 20.0, backend="triton").backward()
    return c


def _distill_case(B: int, D: int, dtype: torch.dtype) -> Counts:
    import fitclip_ext

    g = torch.Generator().manual_seed(0)
    sv, st, tv, tt = (torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype) for _ in range(4))
    sv.requires_grad_()
    st.requires_grad_()
    with count() as c:
        fitclip_ext.distillation_loss(sv, st, tv, tt, 20.0, 66.7, backend="triton").backward()
    return c


def _frame_case(op: str, C: int, T: int, D: int, k: int, dtype: torch.dtype) -> Counts:
    import fitclip_ext

    g = torch.Generator().manual_seed(0)
    text = torch.randn(C, D, generator=g).to(dtype).requires_grad_()
    frames = torch.randn(C, T, D, generator=g).to(dtype).requires_grad_()
    with count() as c:
        if op == "topk_frame_similarity":
            fitclip_ext.topk_frame_similarity(text, frames, k, backend="triton").float().sum().backward()
        else:
            fitclip_ext.video_contrastive_loss(frames, text, 30.0, k=k, backend="triton").backward()
    return c


def _print(title: str, c: Counts, unit: int, units: str = "B^2 D") -> None:
    print(f"{title}: {c.flops / unit:.2f} {units} matrix FLOPs fwd+bwd "
          f"(tl.dot {c.dot_flops / unit:.2f}, cuBLAS {c.torch_flops / unit:.2f})")
    for name, (f, b) in sorted(c.kernels.items()):
        print(f"  {name:24} {f / unit:5.2f} {units}, {b / 2**20:7.2f} MiB loaded, "
              f"{f / b if b else float('inf'):6.1f} FLOPs per byte")


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("FITCLIP_TRITON_CONFIG") != "gpu":
        print("run with TRITON_INTERPRET=1 FITCLIP_TRITON_CONFIG=gpu (the GPU's block configurations)",
              file=sys.stderr)
        return 2
    B = 512
    for D in (512, 768):
        _print(f"contrastive_loss bf16 B={B} D={D}", _contrastive_case(B, D, torch.bfloat16), B * B * D)
    for D in (512, 768):
        _print(f"distillation_loss bf16 B={B} D=Dt={D}", _distill_case(B, D, torch.bfloat16), B * B * D)
    C, T, D, k = 256, 16, 512, 4
    for op in ("topk_frame_similarity", "video_contrastive_loss"):
        _print(f"{op} bf16 C=V={C} T={T} D={D} k={k}", _frame_case(op, C, T, D, k, torch.bfloat16),
               2 * C * C * T * D, "passes of 2 C V T D,")
    return 0


if __name__ == "__main__":
    sys.exit(main())
