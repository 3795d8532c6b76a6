"""Triton kernels of fitclip_ext (importable as `fitclip_ext.kernels`). Importing this package
compiles nothing, queries no device and does not import Triton; kernels compile on first launch.

contrastive.py, sigmoid.py, distill.py, frames.py: the kernels and their launchers (torch custom ops named
fitclip_ext::triton_<stem>_*); common.py: what they share; aot.py: the ahead-of-time compile.
"""
import os


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1: kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
