"""distillation_loss against float64 truth: forward, student gradients, every backend, bad input."""
from __future__ import annotations

import pytest
import torch

import fitclip_ext
from fitclip_ext.reference import distillation_loss_reference

from fitclip_ext.testing import assert_within_rule
from .helpers import backend_cases, device_for, distill_inputs

# (n videos, m captions, D student, D teacher)
SHAPES = [(1, 1, 1, 1), (2, 3, 8, 8), (7, 7, 3, 5), (64, 64, 32, 32), (127, 65, 65, 33), (256, 256, 512, 512),
          (1000, 17, 17, 9)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _run(fn, sv, st, tv, tt, s_scale):
    a, b = sv.detach().clone().requires_grad_(), st.detach().clone().requires_grad_()
    s = s_scale.detach().clone().requires_grad_()
    out = fn(a, b, tv, tt, s)
    return out, torch.autograd.grad(out, (a, b, s))


@pytest.mark.parametrize("backend,dtype,shape", backend_cases(SHAPES, DTYPES))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_distillation_loss_matches_float64(backend, dtype, shape, reduction):
    n, m, d, dt = shape
    dev = device_for(backend)
    sv, st, tv, tt = (x.to(dev) for x in distill_inputs(n, m, d, dt, dtype, seed=n + m))
    s_scale = torch.tensor(30.0)
    # FitCLIP's fixed temperature 0.015; the t^2 factor puts half-precision sums past 65504, so
    # those run with a smaller teacher scale.
    t_scale = 66.7 if dtype in (torch.float32, torch.float64) else 8.0
    out, grads = _run(lambda a, b, c, e, s: fitclip_ext.distillation_loss(a, b, c, e, s, t_scale, reduction=reduction,
                                                                          backend=backend), sv, st, tv, tt, s_scale)
    naive, ngrads = _run(lambda a, b, c, e, s: distillation_loss_reference(a, b, c, e, s, t_scale, reduction=reduction),
                         sv, st, tv, tt, s_scale)
    truth, tgrads = _run(lambda a, b, c, e, s: distillation_loss_reference(a, b, c, e, s.double(), t_scale,
                                                                           reduction=reduction, upcast=True),
                         sv, st, tv, tt, s_scale)
    assert out.dtype == dtype and out.shape == ()
    # A half-precision "sum" over many pairs can exceed the dtype itself (float16 at (1000, 17):
    # the true loss is 1.6e5 > 65504): then +inf is the one right answer, and the rule checks that
    # the loss is exactly that, declared here (the naive float16 result overflows too and bounds nothing).
    overflow = dtype in (torch.float16, torch.bfloat16) and bool(truth.abs() > torch.finfo(dtype).max)
    assert_within_rule("loss", out, naive, truth, dtype, overflow=overflow)
    for name, g, ng, tg in zip(["d_student_video", "d_student_text", "d_student_scale"], grads, ngrads, tgrads):
        assert g.dtype == ng.dtype and g.shape == tg.shape, name
        assert_within_rule(name, g, ng, tg, dtype)


@pytest.mark.parametrize("n,m", [(100, 37), (40, 300)])
def test_cpp_multi_block_column_merge(monkeypatch, n, m):
    """Tiny blocks (16 rows) so the column statistics are merged online across many blocks."""
    monkeypatch.setenv("FITCLIP_CPU_BLOCK_ELEMS", "64")
    sv, st, tv, tt = distill_inputs(n, m, 24, 12, torch.float32, seed=3, noise=2.0)
    out, grads = _run(lambda a, b, c, e, s: fitclip_ext.distillation_loss(a, b, c, e, s, 20.0, backend="cpp"),
                      sv, st, tv, tt, torch.tensor(40.0))
    truth, tgrads = _run(lambda a, b, c, e, s: distillation_loss_reference(a, b, c, e, s.double(), 20.0, upcast=True),
                         sv, st, tv, tt, torch.tensor(40.0))
    naive, ngrads = _run(lambda a, b, c, e, s: distillation_loss_reference(a, b, c, e, s, 20.0), sv, st, tv, tt,
                         torch.tensor(40.0))
    assert_within_rule("loss", out, naive, truth, torch.float32)
    for name, g, ng, tg in zip(["d_video", "d_text", "d_scale"], grads, ngrads, tgrads):
        assert_within_rule(name, g, ng, tg, torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_identical_student_and_teacher_give_zero(backend):
    dev = device_for(backend)
    sv, st, _, _ = (x.to(dev) for x in distill_inputs(20, 13, 16, 16, torch.float32, seed=5))
    out, grads = _run(lambda a, b, c, e, s: fitclip_ext.distillation_loss(a, b, c, e, s, 50.0, backend=backend),
                      sv, st, sv, st, torch.tensor(50.0))
    naive, ngrads = _run(lambda a, b, c, e, s: distillation_loss_reference(a, b, c, e, s, 50.0), sv, st, sv, st,
                         torch.tensor(50.0))
    # KL is 0 and so are its gradients, up to the float32 rounding of logits of size 50 (3e-6)
    # times t^2 / 2 * s = 62500 (the gradient's factor).
    assert abs(out.item()) < 1e-3
    for g in grads:
        assert g.abs().max().item() < 2e-2


def test_gradcheck_cpp_float64():
    sv, st, tv, tt = distill_inputs(6, 5, 4, 3, torch.float64, seed=7)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    for x in (sv, st):
        x.requires_grad_()
    for red in ("batchmean", "sum", "mean"):
        assert torch.autograd.gradcheck(
            lambda a, b, sc: fitclip_ext.distillation_loss(a, b, tv, tt, sc, 2.5, reduction=red, backend="cpp"),
            (sv, st, s))


def test_teacher_scale_tensor_and_reduction_defaults():
    sv, st, tv, tt = distill_inputs(9, 9, 8, 8, torch.float32, seed=8)
    a = fitclip_ext.distillation_loss(sv, st, tv, tt, torch.tensor(30.0), torch.tensor([66.7]))
    b = distillation_loss_reference(sv.double(), st.double(), tv.double(), tt.double(), 30.0, 66.7)
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_torch_backend_is_the_reference():
    sv, st, tv, tt = distill_inputs(5, 4, 8, 8, torch.float32, seed=9)
    a = fitclip_ext.distillation_loss(sv, st, tv, tt, 30.0, 66.7, reduction="sum", backend="torch")
    b = distillation_loss_reference(sv, st, tv, tt, 30.0, 66.7, reduction="sum")
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_bad_input():
    sv, st, tv, tt = distill_inputs(4, 3, 8, 6, torch.float32)
    f = fitclip_ext.distillation_loss
    with pytest.raises(ValueError, match="teacher_video requires grad"):
        f(sv, st, tv.clone().requires_grad_(), tt, 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher_scale requires grad"):
        f(sv, st, tv, tt, 1.0, torch.tensor(1.0, requires_grad=True))
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(sv, st, tv, tt, 1.0, 1.0, reduction="none")
    with pytest.raises(ValueError, match="teacher_video must score the student's 4 videos"):
        f(sv, st, tv[:3], tt, 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher_text must score the student's 3 captions"):
        f(sv, st, tv, tt[:2], 1.0, 1.0)
    with pytest.raises(ValueError, match="student_video and student_text must have the same feature size"):
        f(sv, st[:, :4], tv, tt, 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher_video and teacher_text must have the same feature size"):
        f(sv, st, tv, tt[:, :4], 1.0, 1.0)
    with pytest.raises(TypeError, match="student_video and teacher_text must have the same dtype"):
        f(sv, st, tv, tt.double(), 1.0, 1.0)
    with pytest.raises(ValueError, match="student_video must be 2-D"):
        f(sv[None], st, tv, tt, 1.0, 1.0)
    with pytest.raises(ValueError, match="student_scale must be finite"):
        f(sv, st, tv, tt, float("inf"), 1.0)
    with pytest.raises(TypeError, match="teacher_scale must be a real number"):
        f(sv, st, tv, tt, 1.0, "66")
    with pytest.raises(ValueError, match="student_text must have a non-empty batch"):
        f(sv, st[:0], tv, tt[:0], 1.0, 1.0)


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_nan_in_student_or_teacher_gives_nan(backend):
    """NaN in the features is data: the loss is NaN, as with the torch composition."""
    sv, st, tv, tt = distill_inputs(5, 4, 8, 8, torch.float32, seed=12)
    bad_s, bad_t = sv.clone(), tt.clone()
    bad_s[2, 3] = float("nan")
    bad_t[1, 0] = float("nan")
    assert torch.isnan(fitclip_ext.distillation_loss(bad_s, st, tv, tt, 10.0, 10.0, backend=backend))
    assert torch.isnan(fitclip_ext.distillation_loss(sv, st, tv, bad_t, 10.0, 10.0, backend=backend))


def test_triton_autotuning_on_request_matches_float64(monkeypatch):
    """FITCLIP_TRITON_AUTOTUNE=1: every candidate of the statistics and gradient kernels is timed
    and the loss and gradients still match float64; without it no tuner is made."""
    pytest.importorskip("triton")
    from fitclip_ext.kernels import common as kernel_common

    dev = device_for("triton")
    sv, st, tv, tt = (x.to(dev) for x in distill_inputs(37, 29, 24, 16, torch.float32, seed=5))
    s_scale = torch.tensor(30.0)

    def ours(a, b, c, e, s):
        return fitclip_ext.distillation_loss(a, b, c, e, s, 66.7, backend="triton")

    monkeypatch.setattr(kernel_common, "TUNERS", {})
    monkeypatch.delenv("FITCLIP_TRITON_AUTOTUNE", raising=False)
    _run(ours, sv, st, tv, tt, s_scale)
    assert not kernel_common.TUNERS
    monkeypatch.setenv("FITCLIP_TRITON_AUTOTUNE", "1")
    out, grads = _run(ours, sv, st, tv, tt, s_scale)
    truth, tgrads = _run(lambda a, b, c, e, s: distillation_loss_reference(a, b, c, e, s.double(), 66.7, upcast=True),
                         sv, st, tv, tt, s_scale)
    assert abs(out.item() - truth.item()) <= 1e-5 * max(1.0, abs(truth.item()))
    for g, t in zip(grads, tgrads):
        assert ((g.double() - t).norm() / t.norm()).item() < 1e-5
    assert sorted(t.base_fn.__name__ for t in kernel_common.TUNERS.values()) == ["distill_fwd_kernel", "distill_grad_kernel"]
    for t in kernel_common.TUNERS.values():
        assert len(t.configs_timings) == len(t.configs) > 1
