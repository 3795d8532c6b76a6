import os

import torch

# Without a GPU the Triton kernels are tested through the interpreter. Triton reads this when a
# kernel is decorated, so it must be set before fitclip_ext.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest


@pytest.fixture(autouse=True)
def _skip_cpp_cases_without_extension(request):
    """The GPU check machine runs the tests from the source tree without building the C++
    extension (gpu_check.sh sets FITCLIP_ALLOW_NO_CPP=1); everywhere else a missing extension
    fails the C++ cases instead of skipping them."""
    callspec = getattr(request.node, "callspec", None)
    if os.environ.get("FITCLIP_ALLOW_NO_CPP") == "1" and callspec is not None and callspec.params.get("backend") == "cpp":
        from fitclip_ext import _backend

        if not _backend.load_cpp():
            # only under FITCLIP_ALLOW_NO_CPP=1 (the GPU machine, which runs the Triton cases from
            # the source tree); make test builds the extension and a missing one fails there
            pytest.skip("C++ extension fitclip_ext._C not built")
