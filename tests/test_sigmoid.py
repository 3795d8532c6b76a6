"""sigmoid_loss (SigLIP) against float64 truth: forward, both feature gradients, the scale's and the
bias's, every reduction and offset, every backend."""
from __future__ import annotations

import pytest
import torch

import fitclip_ext
from fitclip_ext.reference import sigmoid_loss_reference
from fitclip_ext.testing import assert_within_rule, rel_err

from .helpers import DTYPES, backend_cases, device_for, features

# (n, m, D, offset): square, rectangular with the positives inside the columns, negatives only
SHAPES = [(1, 1, 1, 0), (2, 8, 8, 3), (7, 7, 3, 0), (64, 96, 32, 32), (127, 127, 65, 0), (33, 70, 17, None),
          (256, 256, 512, 0), (1000, 1000, 17, 0)]


def sig_cases():
    cases = []
    for p in backend_cases([s[:2] + (s[2],) for s in SHAPES], DTYPES):
        backend, dtype, (n, m, d) = p.values
        off = next(s[3] for s in SHAPES if s[:3] == (n, m, d))
        cases.append(pytest.param(backend, dtype, (n, m, d, off), id=p.id))
    return cases


def _run(fn, img, txt, scale, bias, reduction):
    leaves = [img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_(),
              scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    out = fn(*leaves)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    return out, torch.autograd.grad((out * w).sum(), leaves)


@pytest.mark.parametrize("backend,dtype,shape", sig_cases())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sigmoid_loss_matches_float64(backend, dtype, shape, reduction):
    n, m, d, off = shape
    dev = device_for(backend)
    img, txt = features(n, d, dtype, 1).to(dev), features(m, d, dtype, 2).to(dev)
    if off is not None:  # aligned positives, as after training: large positive logits, so both branches of
        txt[off:off + n] = (0.6 * img.double() + 0.4 * txt[off:off + n].double()).to(dtype)  # softplus matter
    scale, bias = torch.tensor(10.0 if d > 1 else 3.0), torch.tensor(-10.0 if d > 1 else -1.0)
    kw = dict(positive_offset=off, reduction=reduction)
    out, grads = _run(lambda i, t, s, b: fitclip_ext.sigmoid_loss(i, t, s, b, backend=backend, **kw),
                      img, txt, scale, bias, reduction)
    naive, ngrads = _run(lambda i, t, s, b: sigmoid_loss_reference(i, t, s, b, **kw), img, txt, scale, bias, reduction)
    truth, tgrads = _run(lambda i, t, s, b: sigmoid_loss_reference(i, t, s.double(), b.double(), upcast=True, **kw),
                         img, txt, scale, bias, reduction)
    assert out.dtype == dtype and out.shape == truth.shape
    assert_within_rule("loss", out, naive, truth, dtype)
    for name, g, ng, tg in zip(["d_image", "d_text", "d_scale", "d_bias"], grads, ngrads, tgrads):
        assert g.dtype == ng.dtype and g.shape == tg.shape, name
        assert_within_rule(name, g, ng, tg, dtype)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_sigmoid_loss_extreme_logits_and_nan(backend):
    """Logits of +-200 (softplus linear, sigmoid saturated) stay exact; NaN in is NaN out."""
    dev = device_for(backend)
    img = features(9, 16, torch.float32, 3).to(dev)
    txt = torch.cat([img[:5], -img[5:]])  # five aligned pairs, four anti-aligned
    for scale, bias in ((200.0, 0.0), (50.0, -150.0), (1.0, 30.0)):
        for off in (0, None):
            got = fitclip_ext.sigmoid_loss(img, txt, scale, bias, positive_offset=off, reduction="none", backend=backend)
            ref = sigmoid_loss_reference(img.double(), txt.double(), scale, bias, positive_offset=off, reduction="none")
            assert torch.isfinite(got).all()
            # (losses below float32's smallest normal, 1e-38, may flush to 0)
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-30), (scale, bias, off, got, ref)
    bad = img.clone()
    bad[2, 3] = float("nan")
    out = fitclip_ext.sigmoid_loss(bad, txt, 10.0, -10.0, reduction="none", backend=backend)
    assert torch.isnan(out[2]) and torch.isfinite(out[torch.arange(9) != 2]).all()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_sigmoid_loss_matches_open_clip(backend):
    """The value and gradients of open_clip 3.3.0's SigLipLoss (one process) on the same inputs."""
    from open_clip.loss import SigLipLoss

    dev = device_for(backend)
    img, txt = features(48, 32, torch.float32, 5).to(dev), features(48, 32, torch.float32, 6).to(dev)
    scale, bias = torch.tensor(10.0, device=dev), torch.tensor(-10.0, device=dev)
    ours, og = _run(lambda i, t, s, b: fitclip_ext.sigmoid_loss(i, t, s, b, backend=backend), img, txt, scale, bias, "mean")
    theirs, tg = _run(lambda i, t, s, b: SigLipLoss()(i, t, s, b), img, txt, scale, bias, "mean")
    assert rel_err(ours, theirs) < 1e-5
    for g, t in zip(og, tg):
        assert rel_err(g, t) < 1e-5


def test_sigmoid_loss_without_grad_runs_only_the_loss(monkeypatch):
    """No input requires a gradient: the backend is asked for the loss alone (the 2-unit pass)."""
    from fitclip_ext.backends import cpp

    calls = []
    real = cpp.sigmoid_loss
    monkeypatch.setattr(cpp, "sigmoid_loss", lambda *a: calls.append(a[-1]) or real(*a))
    img, txt = features(16, 8, torch.float32, 1), features(16, 8, torch.float32, 2)
    fitclip_ext.sigmoid_loss(img, txt, 10.0, -10.0, backend="cpp")
    with torch.no_grad():
        fitclip_ext.sigmoid_loss(img.requires_grad_(), txt, 10.0, -10.0, backend="cpp")
    loss = fitclip_ext.sigmoid_loss(img, txt, 10.0, -10.0, backend="cpp")
    assert calls == [False, False, True]
    loss.backward()  # the mean's backward scales the saved gradient: no further pass
    assert calls == [False, False, True]


def test_sigmoid_loss_retain_graph_backward_twice():
    img = features(20, 8, torch.float32, 1).requires_grad_()
    txt = features(20, 8, torch.float32, 2)
    loss = fitclip_ext.sigmoid_loss(img, txt, 10.0, -10.0, backend="cpp")
    (g1,) = torch.autograd.grad(loss, img, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, img)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(positive_offset=5), r"positive_offset must be in \[0, m - n\] = \[0, 4\]"),
    (dict(positive_offset=-1), r"positive_offset must be in"),
    (dict(positive_offset=1.0), r"positive_offset must be an int or None"),
    (dict(reduction="batchmean"), r"reduction must be one of"),
    (dict(backend="cuda"), r"backend must be one of"),
])
def test_sigmoid_loss_bad_arguments(kwargs, match):
    img, txt = torch.randn(4, 8), torch.randn(8, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        fitclip_ext.sigmoid_loss(img, txt, 10.0, -10.0, **kwargs)


def test_sigmoid_loss_bad_tensors():
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="same feature size D"):
        fitclip_ext.sigmoid_loss(img, torch.randn(4, 7), 10.0, -10.0)
    with pytest.raises(TypeError, match="same dtype"):
        fitclip_ext.sigmoid_loss(img, txt.double(), 10.0, -10.0)
    with pytest.raises(ValueError, match="image_features must be 2-D"):
        fitclip_ext.sigmoid_loss(img[0], txt, 10.0, -10.0)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        fitclip_ext.sigmoid_loss(img, txt, 10.0, torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        fitclip_ext.sigmoid_loss(img, txt, float("nan"), -10.0)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        fitclip_ext.sigmoid_loss(img, txt, 10.0, torch.zeros(2))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sigmoid_loss_triton_bfloat16_interpreted(reduction):
    """The Triton path has no tl.dot (its GEMMs are cuBLAS on a GPU), so bf16 runs correctly under the
    interpreter too: the GPU's numerics (bf16 operands, float32 products, G rounded to bf16)."""
    if torch.cuda.is_available():  # on a GPU, backend_cases runs bf16 Triton in the float64 test above
        pytest.skip("covered by the bf16 cases on the GPU")
    dtype = torch.bfloat16
    img, txt = features(45, 32, dtype, 1), features(45, 32, dtype, 2)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    kw = dict(reduction=reduction)
    out, grads = _run(lambda i, t, s, b: fitclip_ext.sigmoid_loss(i, t, s, b, backend="triton", **kw),
                      img, txt, scale, bias, reduction)
    naive, ngrads = _run(lambda i, t, s, b: sigmoid_loss_reference(i, t, s, b, **kw), img, txt, scale, bias, reduction)
    truth, tgrads = _run(lambda i, t, s, b: sigmoid_loss_reference(i, t, s.double(), b.double(), upcast=True, **kw),
                         img, txt, scale, bias, reduction)
    assert_within_rule("loss", out, naive, truth, dtype)
    for name, g, ng, tg in zip(["d_image", "d_text", "d_scale", "d_bias"], grads, ngrads, tgrads):
        assert_within_rule(name, g, ng, tg, dtype)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_sigmoid_loss_several_blocks(backend, monkeypatch):
    """Row blocks smaller than n (the block loop and dK's accumulation across blocks)."""
    monkeypatch.setenv("FITCLIP_CPU_BLOCK_ELEMS", "64")   # 32-row blocks (the C++ minimum)
    monkeypatch.setenv("FITCLIP_GPU_BLOCK_ELEMS", "900")  # 9-row blocks
    dev = device_for(backend)
    img, txt = features(77, 16, torch.float32, 3).to(dev), features(100, 16, torch.float32, 4).to(dev)
    scale, bias = torch.tensor(7.0), torch.tensor(-3.0)
    for off in (23, None):
        out, grads = _run(lambda i, t, s, b: fitclip_ext.sigmoid_loss(i, t, s, b, positive_offset=off, backend=backend),
                          img, txt, scale, bias, "mean")
        truth, tgrads = _run(lambda i, t, s, b: sigmoid_loss_reference(i, t, s.double(), b.double(), positive_offset=off,
                                                                       upcast=True), img, txt, scale, bias, "mean")
        assert rel_err(out, truth) < 1e-5
        for g, t in zip(grads, tgrads):
            assert rel_err(g, t) < 1e-5


def test_sigmoid_loss_triton_autocast():
    """Under autocast, float32 features run the Triton path in the autocast dtype (as a matmul
    would) and the loss comes back in float32; gradients reach the float32 leaves."""
    dev = device_for("triton")
    img = features(40, 32, torch.float32, 1).to(dev).requires_grad_()
    txt = features(40, 32, torch.float32, 2).to(dev).requires_grad_()
    low = torch.bfloat16
    with torch.autocast(dev, dtype=low):
        out = fitclip_ext.sigmoid_loss(img, txt, 10.0, -10.0, backend="triton")
    out.backward()
    assert out.dtype == torch.float32 and img.grad.dtype == torch.float32
    ref = sigmoid_loss_reference(img.detach().to(low).double(), txt.detach().to(low).double(), 10.0, -10.0)
    assert rel_err(out, ref) < 1e-3
    ri, rt = img.detach().to(low).double().requires_grad_(), txt.detach().to(low).double().requires_grad_()
    sigmoid_loss_reference(ri, rt, 10.0, -10.0).backward()
    assert rel_err(img.grad, ri.grad) < 2e-2 and rel_err(txt.grad, rt.grad) < 2e-2


def _op_samples(backend):
    g = torch.Generator().manual_seed(0)
    dev = device_for(backend)
    q, k = torch.randn(5, 8, generator=g).to(dev), torch.randn(9, 8, generator=g).to(dev)
    s, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    if backend == "triton":
        fitclip_ext.backends.load_triton()
        op = torch.ops.fitclip_ext.triton_sigmoid_loss
        s, b = s.float().to(dev), b.float().to(dev)
    else:
        op = torch.ops.fitclip_ext.sigmoid_loss
    w = torch.linspace(0.1, 1.0, 5).to(dev)
    return op, [(q, k, s, b, 2, None, True), (q, k, s, b, -1, w, True), (q, k, s, b, 0, None, False)]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_sigmoid_opcheck(backend):
    op, cases = _op_samples(backend)
    for args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_sigmoid_loss_compile_fullgraph(backend):
    dev = device_for(backend)
    compile_backend = "inductor" if backend == "cpp" or torch.cuda.is_available() else "aot_eager"
    img = torch.nn.functional.normalize(features(33, 16, torch.float32, 8), dim=-1).to(dev).requires_grad_()
    txt = torch.nn.functional.normalize(features(33, 16, torch.float32, 9), dim=-1).to(dev).requires_grad_()
    scale = torch.tensor(10.0, device=dev, requires_grad=True)
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)
    fn = torch.compile(lambda i, t, s, b: fitclip_ext.sigmoid_loss(i, t, s, b, backend=backend), fullgraph=True,
                       backend=compile_backend)
    out = fn(img, txt, scale, bias)
    grads = torch.autograd.grad(out, (img, txt, scale, bias))
    leaves = [x.detach().double().requires_grad_() for x in (img, txt, scale, bias)]
    truth = sigmoid_loss_reference(*leaves)
    tgrads = torch.autograd.grad(truth, leaves)
    assert rel_err(out, truth) < 1e-5
    for g, t in zip(grads, tgrads):
        assert rel_err(g, t) < 1e-5


@pytest.mark.parametrize("reduction,need_grad,budget,exact", [("mean", True, 6.3, 6), ("sum", True, 6.3, 6),
                                                              ("none", True, 8.5, 8), ("mean", False, 2.0, 2)])
def test_sigmoid_loss_flop_count(monkeypatch, reduction, need_grad, budget, exact):
    """Matrix FLOPs of forward + backward on the Triton path, counted under the interpreter at the
    GPU's block sizes (every torch matmul, fitclip_ext.kernels.interpret.count): at most 6.3 B^2 D for
    "mean"/"sum" (6 by construction), 8.5 for "none" (8: the backward reruns the pass with the row
    weights), 2 without a gradient; several row blocks included."""
    from fitclip_ext.kernels.interpret import count

    fitclip_ext.backends.load_triton()
    monkeypatch.setenv("FITCLIP_GPU_BLOCK_ELEMS", str(1 << 18))  # 4 blocks of 256 rows
    B, D = 1024, 32
    img = features(B, D, torch.float32, 1).to(device_for("triton")).requires_grad_(need_grad)
    txt = features(B, D, torch.float32, 2).to(device_for("triton")).requires_grad_(need_grad)
    with count() as c:
        loss = fitclip_ext.sigmoid_loss(img, txt, 10.0, -10.0, reduction=reduction, backend="triton")
        if need_grad:
            loss.sum().backward()
    units = c.flops / (B * B * D)
    assert c.torch_calls >= 4 and units <= budget and units == exact, units
