"""Inputs and implementations of the contrastive-loss benchmarks (shared by pytest and the
memory probe child process)."""
from __future__ import annotations

import torch

import fitclip_ext
from fitclip_ext.reference import contrastive_loss_reference


def make_inputs(B: int, D: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g, device=device), dim=-1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(B, D, generator=g, device=device), dim=-1).to(dtype)
    scale = torch.tensor(100.0, device=device)  # open_clip's clamp value: the hardest case for exp
    return img.requires_grad_(), txt.requires_grad_(), scale.requires_grad_()


def loss_fn(impl: str, backend: str | None = None):
    if impl == "fitclip":
        return lambda i, t, s: fitclip_ext.contrastive_loss(i, t, s, backend=backend)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        return lambda i, t, s: clip_loss(i, t, s)
    if impl == "torch":
        return contrastive_loss_reference
    if impl == "torch_compile":
        return torch.compile(contrastive_loss_reference, dynamic=False)
    if impl == "inf_cl":
        from inf_cl import cal_inf_loss

        def inf_cl_loss(i, t, s):
            # inf-cl all-reduces the scale's gradient (torch.distributed) even on one GPU, which
            # fails without a process group: the scale goes in detached (its gradient is one
            # B-term sum, nothing next to the loss) and s stays in the graph so every
            # implementation is differentiated with respect to the same inputs.
            sd = s.detach()
            labels = torch.arange(i.shape[0], device=i.device)
            loss = (cal_inf_loss(i, t, labels=labels, scale=sd) + cal_inf_loss(t, i, labels=labels, scale=sd)) / 2
            return loss + 0.0 * s

        return inf_cl_loss
    raise ValueError(impl)


def fwd_bwd(fn, inputs):
    def run():
        loss = fn(*inputs)
        torch.autograd.grad(loss, inputs)

    return run
