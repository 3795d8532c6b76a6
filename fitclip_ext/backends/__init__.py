"""The backends and their one contract.

A public op picks a backend per call (`resolve`): "triton" for CUDA tensors (kernels/ through
`fitclip_ext.backends.triton`), "cpp" for CPU tensors (the C++ extension in csrc/, through
`fitclip_ext.backends.cpp`), "torch" (the plain reference composition in
`fitclip_ext.reference`, which materialises the logits) on request or where the extension is
not built. The autograd Functions in contrastive.py, frames.py and distill.py are written once
against the `Backend` protocol below; `get(name)` returns the module that implements it.

Every tiled primitive has the same name, arguments and split of work on both fused backends
(the torch custom ops under them are fitclip_ext::<name> for C++ and fitclip_ext::triton_<name>
for Triton); each method's contract is its docstring in `Backend`. "Compute dtype": float64 for
float64 inputs on both, float32 otherwise.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Protocol

import torch

from ..kernels import interpreting

BACKENDS = ("triton", "cpp", "torch")

_state: dict = {"cpp_error": None, "cpp_loaded": False, "warned_fallback": False}


class Backend(Protocol):
    """What fitclip_ext.backends.cpp and fitclip_ext.backends.triton provide, by public op."""

    # --- contrastive_loss / infonce: L = scale * query @ keys^T (n x m), positive of row i at
    # key offset + i, label smoothing eps
    def contrastive_lse(self, query, keys, scale, with_col, offset=0):
        """-> (row_lse [n], col_lse [m] or None, row_gap [n], col_gap [m] or None), compute dtype.
        gap = lse - positive logit (row i's at key offset + i, column j's at query j): each row's
        (column's) cross-entropy without label smoothing, >= 0. Triton forms it as (max -
        positive) + log-sum from the same tile products (exact where the positive dominates, as
        log_softmax is), C++ as lse - the row dot, clamped at 0."""

    def contrastive_grad(self, query, keys, scale, row_lse, row_weight, col_lse, col_weight, *, offset, eps):
        """-> (dquery, dkeys in the inputs' dtype, dscale 0-d): the full gradient of
        sum_i row_weight_i CE_row_i (+ sum_j col_weight_j CE_col_j when col_lse is given), softmax,
        one-hot, label-smoothing and scale terms included."""

    # --- topk_frame_similarity / video_contrastive_loss / select_frames: text [C, D] against
    # frames [V, T, D]; norms are `row_norms` of the raw inputs, or None for unit inputs; chosen
    # frames are int32 bit sets [C, V, ceil(T / 32)] (bit t % 32 of word t // 32)
    def row_norms(self, x):
        """-> [...] the norms of x's last-dimension rows, compute dtype."""

    def operand(self, x):
        """-> x in the form the ops read without a copy (made once per loss, not per block)."""

    def topk_sim(self, text, frames, k, mask, text_norm, frames_norm):
        """-> (sim [C, V] compute dtype: the mean of each caption's k most similar frame cosines
        of each video, bits: the frames chosen)."""

    def topk_sim_bwd(self, text, frames, bits, grad, k, text_norm, frames_norm, dtext=None):
        """-> (dtext, dframes) with respect to the unit vectors, compute dtype; accumulates into
        `dtext` (text's shape, compute dtype) when given (the video loss's backward loops over
        video blocks: each block's dframes is written once, dtext [C, D] accumulates)."""

    def unit_grad(self, grad, x, norm):
        """-> grad, in place: the unit vectors' gradient turned into the raw x's."""

    def select_frames(self, frames, text, k, mask):
        """-> [B, k] int64, ascending: the k frames of each video most similar to its caption
        (the ranking of cosines; text raw)."""

    def video_block_rows(self, B, T):
        """-> captions (forward) and videos (backward) per block of video_contrastive_loss's
        block loops."""

    # --- distillation_loss: student logits Y = student_scale * student_video @ student_text^T,
    # teacher X = teacher_scale * teacher_video @ teacher_text^T; log-sum-exp statistics [2, n]
    # as (max, log-sum) in the backend's own units, read only by the same backend
    def distill_stats(self, student_video, student_text, teacher_video, teacher_text, student_scale,
                      teacher_scale):
        """-> (row_stats_student, row_stats_teacher, row_kl, col_stats_student, col_stats_teacher,
        col_kl): per row (video) and column (caption), the two softmaxes' statistics and
        KL(teacher || student)."""

    def distill_grad(self, student_video, student_text, teacher_video, teacher_text, student_scale,
                     teacher_scale, row_stats_student, row_stats_teacher, row_weight, col_stats_student,
                     col_stats_teacher, col_weight):
        """-> (dstudent_video, dstudent_text in their dtype, dstudent_scale 0-d): the gradient of
        sum_i row_weight_i KL_row_i + sum_j col_weight_j KL_col_j."""

    # --- sigmoid_loss: L = scale * query @ keys^T + bias, positive of row i at key offset + i
    # (offset -1: none), G = diag(row_weight or 1) (sigmoid(L) - positives)
    def sigmoid_loss(self, query, keys, scale, bias, offset, row_weight, with_grad):
        """-> (loss [n] = sum_j softplus(-z_ij L_ij), then, when with_grad (else empty): G @ keys
        [n, D], G^T @ query [m, D], stats [2, n] = (sum_j G_ij S_ij, sum_j G_ij)), compute dtype;
        one pass over the products computes all four."""


def get(name: str) -> ModuleType:
    """The module implementing `Backend` for "cpp" or "triton" (plain lookups: torch.compile
    traces through them)."""
    if name not in _MODULES:
        raise ValueError(f"no fused backend named {name!r} (expected 'cpp' or 'triton')")
    return _MODULES[name]


def load_cpp() -> bool:
    """Imports fitclip_ext._C (which registers torch.ops.fitclip_ext.*); False if it is not built."""
    if _state["cpp_loaded"]:
        return True
    if _state["cpp_error"] is not None:
        return False
    try:
        importlib.import_module("fitclip_ext._C")
    except ImportError as err:  # not built, or built against another torch
        _state["cpp_error"] = err
        return False
    cpp.register()
    _state["cpp_loaded"] = True
    return True


def cpp_unavailable_message() -> str:
    return (
        "backend='cpp' needs the C++ extension fitclip_ext._C, which could not be imported "
        f"({_state['cpp_error']}). Build it with `pip install -e . --no-build-isolation` (or `make build`) "
        "against the torch you run, or pass backend='torch' for the reference implementation."
    )


def load_triton() -> None:
    """Imports the Triton kernels, which registers their custom ops (torch.ops.fitclip_ext.triton_*),
    before any code that torch.compile traces calls them."""
    if torch.compiler.is_compiling():
        return
    importlib.import_module("fitclip_ext.kernels.contrastive")
    importlib.import_module("fitclip_ext.kernels.frames")
    importlib.import_module("fitclip_ext.kernels.distill")
    importlib.import_module("fitclip_ext.kernels.sigmoid")


def load_triton_where_usable() -> None:
    """At import, where the Triton backend can run (a CUDA device, or TRITON_INTERPRET=1): registers
    its ops, so that a first call that torch.compile traces finds them (tracing cannot import;
    about a second, so CPU-only machines skip it and import on first use). A missing or broken
    Triton is left for that first use to report."""
    if not (interpreting() or torch.cuda.is_available()):
        return
    try:
        load_triton()
    except ImportError:
        pass


def resolve(backend: str | None, device: torch.device) -> str:
    """Returns the backend to run for tensors on `device`, raising a clear error otherwise."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        if device.type == "cuda":
            load_triton()
            return "triton"
        if device.type == "cpu":
            if load_cpp():
                return "cpp"
            if not _state["warned_fallback"]:
                warnings.warn(
                    "fitclip_ext: C++ extension not available, using the torch reference, which "
                    f"materialises the logits ({_state['cpp_error']})",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _state["warned_fallback"] = True
            return "torch"
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' takes CPU tensors, got tensors on {device}")
        if not load_cpp():
            raise RuntimeError(cpp_unavailable_message())
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise ValueError(
                f"backend='triton' takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
            )
        load_triton()
    return backend


# Both are thin modules over torch.ops (neither imports Triton nor the extension).
from . import cpp, triton  # noqa: E402

_MODULES = {"cpp": cpp, "triton": triton}
