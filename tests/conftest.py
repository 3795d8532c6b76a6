import os

import torch

# Without a GPU the Triton kernels are tested through the interpreter. Triton reads this when a
# kernel is decorated, so it must be set before fitclip_ext.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
