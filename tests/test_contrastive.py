"""contrastive_loss and infonce against float64 truth: forward, every gradient, every backend."""
from __future__ import annotations

import pytest
import torch

import fitclip_ext
from fitclip_ext import backends
from fitclip_ext.reference import contrastive_loss_reference, infonce_reference

from fitclip_ext.testing import assert_within_rule, rel_err

from .helpers import DTYPES, FUSED, backend_cases, device_for, features

SHAPES = [(1, 1), (2, 8), (7, 3), (64, 32), (127, 65), (256, 512), (1000, 17)]


def _run(fn, args, scale, bias, grads):
    """Calls fn and returns the output and the gradients of (sum of out * fixed weights)."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    s = scale.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(*leaves, s, b)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    inputs = leaves + [s] + ([b] if b is not None else [])
    g = torch.autograd.grad((out * w).sum(), inputs, allow_unused=True) if grads else None
    return out, g


@pytest.mark.parametrize("backend,dtype,shape", backend_cases(SHAPES, DTYPES))
@pytest.mark.parametrize("reduction,eps,with_bias", [("mean", 0.0, False), ("sum", 0.1, True), ("none", 0.0, True), ("none", 0.3, False)])
def test_contrastive_loss_matches_float64(backend, dtype, shape, reduction, eps, with_bias):
    b, d = shape
    dev = device_for(backend)
    img, txt = features(b, d, dtype, 1).to(dev), features(b, d, dtype, 2).to(dev)
    scale = torch.tensor(14.3, dtype=torch.float32)
    bias = torch.tensor(-2.5, dtype=torch.float32) if with_bias else None
    kw = dict(label_smoothing=eps, reduction=reduction)

    out, grads = _run(lambda i, t, s, bb: fitclip_ext.contrastive_loss(i, t, s, bb, backend=backend, **kw),
                      [img, txt], scale, bias, True)
    naive, ngrads = _run(lambda i, t, s, bb: contrastive_loss_reference(i, t, s, bb, **kw), [img, txt], scale, bias, True)
    truth, tgrads = _run(lambda i, t, s, bb: contrastive_loss_reference(i, t, s.double(), None if bb is None else bb.double(), upcast=True, **kw),
                         [img, txt], scale, bias, True)
    assert out.dtype == dtype and out.shape == truth.shape
    assert_within_rule("loss", out, naive, truth, dtype)
    for name, g, ng, tg in zip(["d_image", "d_text", "d_scale"], grads, ngrads, tgrads):
        assert g.dtype == ng.dtype and g.shape == tg.shape
        assert_within_rule(name, g, ng, tg, dtype)
    if with_bias:  # the loss is shift invariant: exactly zero gradient
        assert grads[3] is not None and grads[3].item() == 0.0


@pytest.mark.parametrize("backend,dtype,shape", backend_cases(
    [(1, 1, 0), (3, 10, 7), (64, 128, 64), (100, 37 + 100, 37), (129, 1031, 500)],
    [torch.float64, torch.float32, torch.bfloat16, torch.float16]))
@pytest.mark.parametrize("reduction,eps", [("mean", 0.0), ("sum", 0.2), ("none", 0.1)])
def test_infonce_matches_float64(backend, dtype, shape, reduction, eps):
    n, m, offset = shape
    d = 48
    dev = device_for(backend)
    q, k = features(n, d, dtype, 3).to(dev), features(m, d, dtype, 4).to(dev)
    scale = torch.tensor(30.0, dtype=torch.float64)
    kw = dict(positive_offset=offset, label_smoothing=eps, reduction=reduction)
    out, grads = _run(lambda a, b, s, bb: fitclip_ext.infonce(a, b, s, bb, backend=backend, **kw), [q, k], scale, None, True)
    naive, ngrads = _run(lambda a, b, s, bb: infonce_reference(a, b, s.to(dtype), bb, **kw), [q, k], scale, None, True)
    truth, tgrads = _run(lambda a, b, s, bb: infonce_reference(a, b, s, bb, upcast=True, **kw), [q, k], scale, None, True)
    assert_within_rule("loss", out, naive, truth, dtype)
    for name, g, ng, tg in zip(["d_query", "d_keys", "d_scale"], grads, ngrads, tgrads):
        assert_within_rule(name, g, ng, tg, dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_aligned_pairs_at_scale_100_never_negative(backend, noise):
    """Aligned pairs at open_clip's largest scale: every per-pair loss is >= 0 and, on Triton
    (positives and maxima from the same tiles), as exact near 0 as log_softmax on materialised
    float32 logits; C++ (positives as row dots) clamps the rounding below 0."""
    g = torch.Generator().manual_seed(int(noise * 100))
    img = torch.nn.functional.normalize(torch.randn(96, 32, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(img + noise * torch.randn(96, 32, generator=g, dtype=torch.float64), dim=-1)
    i, t = img.float().to(device_for(backend)), txt.float().to(device_for(backend))
    out = fitclip_ext.contrastive_loss(i, t, 100.0, reduction="none", backend=backend).cpu()
    truth = contrastive_loss_reference(i.double().cpu(), t.double().cpu(), torch.tensor(100.0, dtype=torch.float64),
                                       reduction="none")
    naive = contrastive_loss_reference(i.cpu(), t.cpu(), torch.tensor(100.0), reduction="none")
    assert (out >= 0).all()
    err, naive_err = (out.double() - truth).abs().max().item(), (naive.double() - truth).abs().max().item()
    if backend == "triton":
        assert err <= naive_err + 1e-6, (err, naive_err)
    else:
        assert err <= 1e-4, err


@pytest.mark.parametrize("symmetric,n,m,offset", [(True, 300, 300, 0), (False, 70, 611, 333)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_row_and_column_blocks(monkeypatch, symmetric, n, m, offset, dtype):
    """Small C++ blocks: 32-row forward blocks and backward blocks of 32 rows x 256 columns, so the
    backward's column blocks (one narrower at the end) and the row blocks are both exercised."""
    monkeypatch.setenv("FITCLIP_CPU_BLOCK_ELEMS", "4096")
    q, k = features(n, 17, dtype, 5), features(m, 17, dtype, 6)
    scale = torch.tensor(25.0, dtype=torch.float64)
    if symmetric:
        op = lambda a, b, s, bb: fitclip_ext.contrastive_loss(a, b, s, backend="cpp", label_smoothing=0.1)
        ref = lambda a, b, s, bb: contrastive_loss_reference(a, b, s, label_smoothing=0.1, upcast=True)
    else:
        op = lambda a, b, s, bb: fitclip_ext.infonce(a, b, s, positive_offset=offset, reduction="none", backend="cpp")
        ref = lambda a, b, s, bb: infonce_reference(a, b, s, positive_offset=offset, reduction="none", upcast=True)
    out, grads = _run(op, [q, k], scale, None, True)
    truth, tgrads = _run(ref, [q, k], scale, None, True)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert rel_err(out, truth) < tol
    for g, t in zip(grads[:3], tgrads[:3]):
        assert rel_err(g, t) < tol


@pytest.mark.parametrize("backend", FUSED)
def test_large_scale_and_unnormalised_features_stay_finite(backend):
    # Logits up to ~1e3: a naive exp overflows, a log-sum-exp must not.
    dev = device_for(backend)
    img = features(33, 16, torch.float32, 5, normalize=False).to(dev)
    txt = features(33, 16, torch.float32, 6, normalize=False).to(dev)
    scale = torch.tensor(100.0)
    out, grads = _run(lambda i, t, s, b: fitclip_ext.contrastive_loss(i, t, s, backend=backend), [img, txt], scale, None, True)
    truth, tgrads = _run(lambda i, t, s, b: contrastive_loss_reference(i, t, s.double(), upcast=True), [img, txt], scale, None, True)
    assert torch.isfinite(out) and rel_err(out, truth) < 1e-5
    for g, tg in zip(grads, tgrads):
        assert rel_err(g, tg) < 1e-4


@pytest.mark.parametrize("backend", ["cpp", "triton"])  # both compute float64 inputs in float64
def test_gradcheck_float64(backend):
    img = features(5, 3, torch.float64, 7).requires_grad_()
    txt = features(5, 3, torch.float64, 8).requires_grad_()
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for red in ["mean", "none"]:
        assert torch.autograd.gradcheck(
            lambda i, t, s, b: fitclip_ext.contrastive_loss(i, t, s, b, label_smoothing=0.1, reduction=red, backend=backend),
            (img, txt, scale, bias))
    q = features(3, 4, torch.float64, 9).requires_grad_()
    k = features(8, 4, torch.float64, 10).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, s: fitclip_ext.infonce(a, b, s, positive_offset=2, label_smoothing=0.2, reduction="none", backend=backend),
        (q, k, scale))


@pytest.mark.parametrize("backend", FUSED)
def test_noncontiguous_inputs_and_python_scale(backend):
    base_i = features(40, 64, torch.float32, 11).to(device_for(backend))
    base_t = features(64, 40, torch.float32, 12).to(device_for(backend))
    img = base_i[::2]  # strided rows
    txt = base_t.T[::2]  # transposed view
    assert not img.is_contiguous() and not txt.is_contiguous()
    out = fitclip_ext.contrastive_loss(img, txt, 20.0, backend=backend)
    truth = contrastive_loss_reference(img, txt, 20.0, upcast=True)
    assert rel_err(out, truth) < 1e-5


@pytest.mark.parametrize("backend", FUSED)
def test_open_clip_style_parameter_scale_gets_gradient(backend):
    # open_clip passes model.logit_scale.exp(), a 0-d tensor; a [1]-shaped one must work too.
    dev = device_for(backend)
    img = features(16, 8, torch.float32, 13).to(dev).requires_grad_()
    txt = features(16, 8, torch.float32, 14).to(dev).requires_grad_()
    log_scale = torch.nn.Parameter(torch.full((1,), 2.6592, device=dev))
    loss = fitclip_ext.contrastive_loss(img, txt, log_scale.exp(), backend=backend)
    loss.backward()
    ref_scale = torch.nn.Parameter(torch.full((1,), 2.6592, device=dev))
    contrastive_loss_reference(img.detach().double(), txt.detach().double(), ref_scale.double().exp()).backward()
    assert log_scale.grad.shape == (1,)
    assert rel_err(log_scale.grad, ref_scale.grad) < 1e-5


@pytest.mark.parametrize("backend", FUSED)
def test_nan_in_features_gives_nan_like_torch(backend):
    dev = device_for(backend)
    img, txt = features(8, 4, torch.float32, 15).to(dev), features(8, 4, torch.float32, 16).to(dev)
    img[3, 1] = float("nan")
    out = fitclip_ext.contrastive_loss(img, txt, 10.0, backend=backend)
    assert torch.isnan(out)
    per = fitclip_ext.infonce(img, txt, 10.0, reduction="none", backend=backend)
    ref = infonce_reference(img, txt, 10.0, reduction="none")
    assert torch.equal(torch.isnan(per), torch.isnan(ref))


def test_default_backend_on_cpu_is_cpp():
    assert backends.resolve(None, torch.device("cpu")) == "cpp"


def test_matches_open_clip_cliploss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img = features(50, 32, torch.float32, 17).requires_grad_()
    txt = features(50, 32, torch.float32, 18).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    ours = fitclip_ext.contrastive_loss(img, txt, scale)
    g_ours = torch.autograd.grad(ours, (img, txt, scale))
    theirs = open_clip_loss.ClipLoss()(img, txt, scale)
    g_theirs = torch.autograd.grad(theirs, (img, txt, scale))
    assert rel_err(ours, theirs) < 1e-5
    for a, b in zip(g_ours, g_theirs):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("backend", FUSED)
def test_column_far_above_its_positive(backend):
    # Column 0's positive logit is -100 while another row scores +100 on it: the Triton forward
    # shifts each column by its positive logit, so this column takes the exact fallback path.
    dev = device_for(backend)
    img = features(20, 8, torch.float32, 19)
    txt = features(20, 8, torch.float32, 20)
    img[0] = -txt[0]
    img[5] = txt[0]
    img, txt = img.to(dev), txt.to(dev)
    out, grads = _run(lambda i, t, s, b: fitclip_ext.contrastive_loss(i, t, s, reduction="none", backend=backend),
                      [img, txt], torch.tensor(100.0), None, True)
    truth, tgrads = _run(lambda i, t, s, b: contrastive_loss_reference(i, t, s.double(), reduction="none", upcast=True),
                         [img, txt], torch.tensor(100.0), None, True)
    assert torch.isfinite(out).all() and rel_err(out, truth) < 1e-5
    for g, tg in zip(grads, tgrads):
        assert rel_err(g, tg) < 1e-4


@pytest.mark.parametrize("symmetric", [True, False])
def test_triton_autotuning_on_request_matches_float64(monkeypatch, symmetric):
    """FITCLIP_TRITON_AUTOTUNE=1: every candidate configuration is timed and the result still
    matches float64; without it no tuner is made."""
    pytest.importorskip("triton")
    from fitclip_ext.kernels import common as kernel_common

    dev = device_for("triton")
    n, m, d = (45, 45, 40) if symmetric else (21, 50, 40)
    x = features(n, d, torch.float32, 11).to(dev)
    y = features(m, d, torch.float32, 12).to(dev)
    scale = torch.tensor(9.0, dtype=torch.float64)

    def fn(a, b, s, _bias):
        if symmetric:
            return fitclip_ext.contrastive_loss(a, b, s, label_smoothing=0.1, backend="triton")
        return fitclip_ext.infonce(a, b, s, positive_offset=7, label_smoothing=0.1, backend="triton")

    def ref(a, b, s, _bias):
        if symmetric:
            return contrastive_loss_reference(a, b, s, label_smoothing=0.1)
        return infonce_reference(a, b, s, positive_offset=7, label_smoothing=0.1)

    monkeypatch.setattr(kernel_common, "TUNERS", {})
    monkeypatch.delenv("FITCLIP_TRITON_AUTOTUNE", raising=False)
    _run(fn, [x, y], scale.float(), None, True)
    assert not kernel_common.TUNERS
    monkeypatch.setenv("FITCLIP_TRITON_AUTOTUNE", "1")
    out, grads = _run(fn, [x, y], scale.float(), None, True)
    truth, truth_grads = _run(ref, [x.double(), y.double()], scale, None, True)
    assert rel_err(out, truth) < 1e-5
    for g, t in zip(grads, truth_grads):
        assert rel_err(g, t) < 1e-5
    tuners = list(kernel_common.TUNERS.values())  # the forward and the backward's G kernel
    assert sorted(t.base_fn.__name__ for t in tuners) == ["contrastive_grad_kernel", "contrastive_lse_kernel"]
    for t in tuners:
        assert len(t.configs_timings) == len(t.configs) > 1
