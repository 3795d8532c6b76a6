"""Inputs and implementations of the SigLIP-loss benchmarks (shared by pytest and the memory probe
child process): fitclip_ext.sigmoid_loss against open_clip's SigLipLoss, the plain torch
composition (fitclip_ext.sigmoid_loss_reference) and torch.compile of it."""
from __future__ import annotations

import torch

import fitclip_ext
from fitclip_ext.reference import sigmoid_loss_reference

from .contrastive_cases import fwd_bwd  # noqa: F401  (the same forward + backward of every input)


def make_inputs(B: int, D: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """Unit embeddings, SigLIP's initial scale and bias (10, -10), all requiring gradients."""
    g = torch.Generator(device=device).manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g, device=device), dim=-1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(B, D, generator=g, device=device), dim=-1).to(dtype)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    return img.requires_grad_(), txt.requires_grad_(), scale.requires_grad_(), bias.requires_grad_()


def loss_fn(impl: str, backend: str | None = None):
    if impl == "fitclip":
        return lambda i, t, s, b: fitclip_ext.sigmoid_loss(i, t, s, b, backend=backend)
    if impl == "open_clip":
        from open_clip.loss import SigLipLoss

        siglip = SigLipLoss()
        return lambda i, t, s, b: siglip(i, t, s, b)
    if impl == "torch":
        return sigmoid_loss_reference
    if impl == "torch_compile":
        return torch.compile(sigmoid_loss_reference, dynamic=False)
    raise ValueError(impl)
