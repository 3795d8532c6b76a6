"""Inputs and implementations of the distillation-loss benchmarks (pytest and the memory child)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fitclip_ext
from fitclip_ext.reference import distillation_loss_reference


def make_inputs(B: int, D: int, device="cpu", seed: int = 0, *, m: int | None = None, dtype=torch.float32,
                scale: float = 66.7):
    """B student/teacher video and m (default B) caption embeddings, the student a noisy copy of
    the teacher, in `dtype`; the student's features and scale require grad."""
    m = B if m is None else m
    g = torch.Generator(device=device).manual_seed(seed)
    tv = F.normalize(torch.randn(B, D, generator=g, device=device), dim=-1)
    tt = F.normalize(torch.randn(m, D, generator=g, device=device), dim=-1)
    sv = F.normalize(tv + 0.5 * torch.randn(B, D, generator=g, device=device) / D**0.5, dim=-1)
    st = F.normalize(tt + 0.5 * torch.randn(m, D, generator=g, device=device) / D**0.5, dim=-1)
    s_scale = torch.tensor(scale, device=device)
    sv, st, tv, tt = (x.to(dtype) for x in (sv, st, tv, tt))
    return sv.requires_grad_(), st.requires_grad_(), tv, tt, s_scale.requires_grad_()


def loss_fn(impl: str, backend: str | None = None):
    t_scale = 66.7  # FitCLIP's temperature 0.015
    if impl == "fitclip":
        return lambda sv, st, tv, tt, s: fitclip_ext.distillation_loss(sv, st, tv, tt, s, t_scale, backend=backend)
    if impl == "torch":  # the composition FitCLIP's code (and our trainer before the fused op) runs
        return lambda sv, st, tv, tt, s: distillation_loss_reference(sv, st, tv, tt, s, t_scale)
    if impl == "torch_compile":
        compiled = torch.compile(distillation_loss_reference, dynamic=False)
        return lambda sv, st, tv, tt, s: compiled(sv, st, tv, tt, s, t_scale)
    raise ValueError(impl)


def fwd_bwd(fn, inputs):
    sv, st, tv, tt, s = inputs

    def run():
        loss = fn(sv, st, tv, tt, s)
        torch.autograd.grad(loss, (sv, st, s))

    return run
