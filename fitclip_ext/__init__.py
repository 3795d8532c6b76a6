"""fitclip-ext: fused CLIP contrastive loss and top-k frame kernels, and a FitCLIP video trainer.

Public ops pick a backend per call: "triton" for CUDA tensors, "cpp" (the C++ extension) for CPU
tensors, "torch" (plain reference) on request or where the extension is not built.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"
__all__ = [
    "ClipLoss", "SigLipLoss", "contrastive_loss", "sigmoid_loss", "sigmoid_loss_reference", "distillation_loss", "infonce", "select_frames", "gather_frames", "topk_frame_similarity",
    "video_contrastive_loss", "contrastive_loss_reference", "distillation_loss_reference", "infonce_reference", "select_frames_reference",
    "topk_frame_similarity_reference", "video_contrastive_loss_reference",
]


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Maps `fitclip_ext.kernels` to the repository's top-level kernels/ folder when the package
    runs from a source checkout (PYTHONPATH=.); installs put kernels/ inside the package."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.root / "__init__.py", submodule_search_locations=[str(self.root)]
        )


def _install_kernels_finder() -> None:
    here = Path(__file__).resolve().parent
    if (here / "kernels" / "__init__.py").exists():
        return
    src = here.parent / "kernels"
    if (src / "__init__.py").exists() and not any(isinstance(f, _SourceTreeKernels) for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeKernels(src))


_install_kernels_finder()  # before the op modules, whose backends import fitclip_ext.kernels

from .contrastive import contrastive_loss, infonce  # noqa: E402
from .distill import distillation_loss  # noqa: E402
from .distributed import ClipLoss, SigLipLoss  # noqa: E402
from .sigmoid import sigmoid_loss  # noqa: E402
from .frames import gather_frames, select_frames, topk_frame_similarity, video_contrastive_loss  # noqa: E402
from .reference import (contrastive_loss_reference, distillation_loss_reference, infonce_reference, select_frames_reference,
                        sigmoid_loss_reference, topk_frame_similarity_reference, video_contrastive_loss_reference)  # noqa: E402

# Register the C++ ops now (a cheap import of the built module; nothing is compiled), and the
# Triton ops where they can run, so that code traced by torch.compile never reaches an import. A
# missing extension is recorded and reported when backend="cpp" is asked for.
from . import backends  # noqa: E402

backends.load_cpp()
backends.load_triton_where_usable()
