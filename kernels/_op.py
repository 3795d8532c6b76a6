"""Registration of the Triton launchers as torch custom ops.

On CUDA every launcher is a `torch.library.triton_op` whose kernels are launched through
`wrap_triton`: torch.compile sees the kernels themselves (no graph break, Inductor schedules them)
and the fake implementation is the launcher traced on fake tensors (allocations only).

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors: the CI machine has no GPU),
wrap_triton cannot trace interpreted kernels, so the launchers become plain opaque
`torch.library.custom_op`s instead, with the same schema; their fake implementation runs the
launcher with kernel launches skipped. opcheck and torch.compile(fullgraph=True) then exercise
the same schemas, fake implementations and autograd plumbing on the CPU.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

_state = threading.local()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) through wrap_triton (skipped while computing fake outputs
    under the interpreter, where the kernel cannot see fake tensors)."""
    if getattr(_state, "skip", False):
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
