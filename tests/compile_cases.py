"""The public losses on inputs like the real ones, compiled with torch.compile(fullgraph=True) and
checked against float64 truth (shared by the C++ and the Triton custom-op tests)."""
import torch

import fitclip_ext
from fitclip_ext.reference import (contrastive_loss_reference, distillation_loss_reference,
                                   video_contrastive_loss_reference)
from fitclip_ext.testing import assert_within_rule

from .helpers import distill_inputs


def compile_case(op: str, dev: str, seed: int):
    """(loss(backend, *inputs), reference(*inputs, upcast), inputs) on inputs like the real ones:
    unit-norm embeddings and the logit scales the recipes use (open_clip's 100, FitCLIP's 66.7)."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(dev).requires_grad_()

    if op == "contrastive_loss":
        inputs = (unit(33, 16), unit(33, 16), torch.tensor(100.0, device=dev, requires_grad=True))

        def loss(backend, i, t, s):
            return fitclip_ext.contrastive_loss(i, t, s, label_smoothing=0.1, backend=backend)

        def ref(i, t, s, upcast):
            return contrastive_loss_reference(i, t, s.double() if upcast else s, label_smoothing=0.1, upcast=upcast)
    elif op == "video_contrastive_loss":
        inputs = (unit(9, 6, 16), unit(9, 16), torch.tensor(66.7, device=dev, requires_grad=True))

        def loss(backend, f, t, s):
            return fitclip_ext.video_contrastive_loss(f, t, s, k=3, backend=backend)

        def ref(f, t, s, upcast):
            return video_contrastive_loss_reference(f, t, s.double() if upcast else s, k=3, upcast=upcast)
    else:
        sv, st, tv, tt = (x.to(dev) for x in distill_inputs(10, 7, 16, 8, torch.float32, seed=seed))
        inputs = (sv.requires_grad_(), st.requires_grad_(), torch.tensor(50.0, device=dev, requires_grad=True))

        def loss(backend, a, b, s):
            return fitclip_ext.distillation_loss(a, b, tv, tt, s, 66.7, backend=backend)

        def ref(a, b, s, upcast):
            return distillation_loss_reference(a, b, tv, tt, s.double() if upcast else s, 66.7, upcast=upcast)
    return loss, ref, inputs


def check_compiled(op: str, backend: str, dev: str, compile_backend: str, seed: int) -> None:
    """torch.compile(fullgraph=True) of the loss: value and gradients against float64 truth with
    the project's rule (kernel error <= 2 x naive fp32 error + 1e-5)."""
    loss, ref, inputs = compile_case(op, dev, seed)
    out = torch.compile(lambda *x: loss(backend, *x), fullgraph=True, backend=compile_backend)(*inputs)
    grads = torch.autograd.grad(out, inputs)
    naive = ref(*inputs, upcast=False)
    ngrads = torch.autograd.grad(naive, inputs)
    truth = ref(*inputs, upcast=True)
    tgrads = torch.autograd.grad(truth, inputs)
    assert_within_rule(f"{op} loss", out, naive, truth, torch.float32)
    for i, (a, n, t) in enumerate(zip(grads, ngrads, tgrads)):
        assert_within_rule(f"{op} grad {i}", a, n, t, torch.float32)
