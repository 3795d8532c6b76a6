"""The fused losses under torch.autocast: float32 features (as F.normalize returns them inside an
autocast region) are multiplied in the autocast dtype, as open_clip's matmul would be, and the
loss comes back in float32, on the C++ backend and on Triton (CUDA, or the interpreter)."""
from __future__ import annotations

import pytest
import torch

import fitclip_ext
from fitclip_ext.reference import (contrastive_loss_reference, distillation_loss_reference, infonce_reference,
                                   sigmoid_loss_reference)
from fitclip_ext.testing import rel_err

from .helpers import device_for


def _feats(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1).float()
            for s in shapes]


# (name, feature shapes, how many get a gradient, fused op, float64 reference)
CASES = {
    "contrastive_loss": ([(37, 24), (37, 24)], 2,
                         lambda f, b: fitclip_ext.contrastive_loss(*f, 20.0, label_smoothing=0.1, backend=b),
                         lambda f: contrastive_loss_reference(*f, 20.0, label_smoothing=0.1)),
    "infonce": ([(19, 24), (45, 24)], 2,
                lambda f, b: fitclip_ext.infonce(*f, 20.0, positive_offset=7, backend=b),
                lambda f: infonce_reference(*f, 20.0, positive_offset=7)),
    "distillation_loss": ([(29, 24), (33, 24), (29, 16), (33, 16)], 2,
                          lambda f, b: fitclip_ext.distillation_loss(*f, 20.0, 50.0, backend=b),
                          lambda f: distillation_loss_reference(*f, 20.0, 50.0)),
    "sigmoid_loss": ([(37, 24), (37, 24)], 2,
                     lambda f, b: fitclip_ext.sigmoid_loss(*f, 10.0, -10.0, backend=b),
                     lambda f: sigmoid_loss_reference(*f, 10.0, -10.0)),
}


def _grads(fn, feats, n_grad):
    leaves = [f.detach().clone().requires_grad_(i < n_grad) for i, f in enumerate(feats)]
    out = fn(leaves)
    out.backward()
    return out, [leaf.grad for leaf in leaves[:n_grad]]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_float32_features(name, backend, low):
    shapes, n_grad, op, ref = CASES[name]
    dev = device_for(backend)
    feats = [f.to(dev) for f in _feats(shapes, 1)]
    with torch.autocast(dev, dtype=low):
        out, grads = _grads(lambda f: op(f, backend), feats, n_grad)
    assert out.dtype == torch.float32, f"{name} under autocast returned {out.dtype}, expected float32"
    assert all(g.dtype == torch.float32 for g in grads)
    # the same as casting the features to the autocast dtype by hand (outside autocast), except
    # that the loss is not rounded to that dtype
    low_out, low_grads = _grads(lambda f: op([x.to(low) for x in f], backend), feats, n_grad)
    assert low_out.dtype == low
    assert torch.equal(out.to(low), low_out), (out, low_out)
    for g, lg in zip(grads, low_grads):
        assert torch.equal(g, lg.float())
    # and against float64 truth on the rounded features: products exact, accumulated in float32
    truth, truth_grads = _grads(lambda f: ref(f), [f.cpu().to(low).double() for f in feats], n_grad)
    assert rel_err(out.cpu(), truth) < 2e-5, (out, truth)
    for g, t in zip(grads, truth_grads):
        assert rel_err(g.cpu(), t) < 1e-2  # (the gradients are rounded to the autocast dtype)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_autocast_leaves_float64_and_other_devices_alone(backend):
    """float64 features are not autocast (as torch.matmul's are not); autocast on another device
    type changes nothing."""
    dev = device_for(backend)
    feats = [f.to(dev) for f in _feats([(21, 16), (21, 16)], 2)]
    plain = fitclip_ext.contrastive_loss(*feats, 20.0, backend=backend)
    other = "cuda" if dev == "cpu" else "cpu"
    with torch.autocast(other, dtype=torch.bfloat16, enabled=other == "cpu" or torch.cuda.is_available()):
        assert torch.equal(fitclip_ext.contrastive_loss(*feats, 20.0, backend=backend), plain)
    if backend == "cpp":
        f64 = [f.double() for f in feats]
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = fitclip_ext.contrastive_loss(*f64, 20.0, backend=backend)
        assert out.dtype == torch.float64
        assert rel_err(out, contrastive_loss_reference(*f64, 20.0)) < 1e-12


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_select_frames_under_autocast(backend, low):
    """The trainer's top-k temporal sampling runs under --precision bf16's autocast: the same
    frames as without it, on half and on float32 features (the C++ op's own products once ran in
    the autocast dtype and failed)."""
    dev = device_for(backend)
    frames, text = [f.to(dev) for f in _feats([(9, 7, 16), (9, 16)], 3)]
    for f, t in ((frames, text), (frames.to(low), text.to(low))):
        plain, _ = fitclip_ext.select_frames(f, t, 3, backend=backend)
        with torch.autocast(dev, dtype=low):
            idx, scores = fitclip_ext.select_frames(f, t, 3, backend=backend)
        assert torch.equal(idx, plain) and torch.isfinite(scores).all()
