"""Backend choice: "triton" (CUDA tensors), "cpp" (CPU tensors, the C++ extension), "torch"
(the plain reference composition, which materialises the logits)."""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("triton", "cpp", "torch")

_cpp_error: BaseException | None = None
_cpp_loaded = False
_warned_fallback = False


def load_cpp() -> bool:
    """Imports fitclip_ext._C (which registers torch.ops.fitclip_ext.*); False if it is not built."""
    global _cpp_loaded, _cpp_error
    if _cpp_loaded:
        return True
    if _cpp_error is not None:
        return False
    try:
        importlib.import_module("fitclip_ext._C")
    except ImportError as err:  # not built, or built against another torch
        _cpp_error = err
        return False
    from . import _fake

    _fake.register()
    _cpp_loaded = True
    return True


def cpp_unavailable_message() -> str:
    return (
        "backend='cpp' needs the C++ extension fitclip_ext._C, which could not be imported "
        f"({_cpp_error}). Build it with `pip install -e . --no-build-isolation` (or `make build`) "
        "against the torch you run, or pass backend='torch' for the reference implementation."
    )


def load_triton() -> None:
    """Imports the Triton kernels, which registers their custom ops (torch.ops.fitclip_ext.triton_*),
    before any code that torch.compile traces calls them."""
    if torch.compiler.is_compiling():
        return
    importlib.import_module("fitclip_ext.kernels.infonce")
    importlib.import_module("fitclip_ext.kernels.frames")
    importlib.import_module("fitclip_ext.kernels.distill")


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str | None, device: torch.device) -> str:
    """Returns the backend to run for tensors on `device`, raising a clear error otherwise."""
    global _warned_fallback
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        if device.type == "cuda":
            load_triton()
            return "triton"
        if device.type == "cpu":
            if load_cpp():
                return "cpp"
            if not _warned_fallback:
                warnings.warn(
                    "fitclip_ext: C++ extension not available, using the torch reference, which "
                    f"materialises the logits ({_cpp_error})",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _warned_fallback = True
            return "torch"
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' takes CPU tensors, got tensors on {device}")
        if not load_cpp():
            raise RuntimeError(cpp_unavailable_message())
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and interpreting_triton()):
            raise ValueError(
                f"backend='triton' takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
            )
        load_triton()
    return backend
