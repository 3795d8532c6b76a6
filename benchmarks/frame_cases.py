"""Inputs and implementations of the frame-op benchmarks (pytest and the memory child)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fitclip_ext


def torch_topk_similarity(text, frames, k):
    """What users write: einsum to C x V x T, topk, mean."""
    sims = torch.einsum("cd,vtd->cvt", F.normalize(text, dim=-1), F.normalize(frames, dim=-1))
    return sims.topk(k, dim=-1).values.mean(-1)


def torch_video_loss(frames, text, scale, k):
    sim = torch_topk_similarity(text, frames, k)
    logits = scale * sim.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def torch_select_frames(frames, text, k):
    """What users write: cosine similarities of each caption with its video's frames, topk, sort."""
    sims = torch.einsum("btd,bd->bt", F.normalize(frames, dim=-1), F.normalize(text, dim=-1))
    idx = sims.topk(k, dim=-1).indices.sort(dim=-1).values
    return idx, sims.gather(1, idx)


def make(op: str, C: int, V: int, T: int, D: int, seed: int = 0, device="cpu", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    text = torch.randn(C, D, generator=g, device=device).to(dtype).requires_grad_()
    frames = torch.randn(V, T, D, generator=g, device=device).to(dtype).requires_grad_()
    return text, frames


def fwd_bwd(op: str, impl: str, text, frames, k: int, backend="cpp"):
    scale = torch.tensor(50.0, device=text.device, requires_grad=True)
    if op == "topk_frame_similarity":
        fn = (lambda: fitclip_ext.topk_frame_similarity(text, frames, k, backend=backend)) if impl == "fitclip" \
            else (lambda: torch_topk_similarity(text, frames, k))
        w = torch.randn(text.shape[0], frames.shape[0], device=text.device)

        def run():
            torch.autograd.grad((fn() * w).sum(), (text, frames))
    elif op == "video_contrastive_loss":
        fn = (lambda: fitclip_ext.video_contrastive_loss(frames, text, scale, k=k, backend=backend)) if impl == "fitclip" \
            else (lambda: torch_video_loss(frames, text, scale, k))

        def run():
            torch.autograd.grad(fn(), (text, frames, scale))
    elif op == "select_frames":  # selection, then the chosen frames' scores with gradient
        fn = (lambda: fitclip_ext.select_frames(frames, text, k, backend=backend)) if impl == "fitclip" \
            else (lambda: torch_select_frames(frames, text, k))
        w = torch.randn(text.shape[0], k, device=text.device)

        def run():
            _, scores = fn()
            torch.autograd.grad((scores * w).sum(), (text, frames))
    else:
        raise ValueError(op)
    return run


def fwd_bwd_topk(impl, C, V, T, D, k, op="topk_frame_similarity"):
    text, frames = make(op, C, V, T, D)
    return fwd_bwd(op, impl, text, frames, k)
