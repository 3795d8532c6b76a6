"""The C++ ops are proper torch custom ops: opcheck passes (schema, fake implementation,
dispatch), and torch.compile(fullgraph=True) traces the public losses without graph breaks."""
import pytest
import torch

import fitclip_ext
from fitclip_ext import backends
from fitclip_ext.reference import (contrastive_loss_reference, distillation_loss_reference,
                                   video_contrastive_loss_reference)

from fitclip_ext.testing import assert_within_rule
from .test_distill import distill_inputs

pytestmark = pytest.mark.skipif(not backends.load_cpp(), reason="C++ extension not built")

ops = torch.ops.fitclip_ext if backends.load_cpp() else None


def _samples():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    qs, ks = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    s = torch.tensor(3.0, dtype=torch.float64)
    row_lse, _ = ops.infonce_lse(q, k, s, False)
    rl, cl = ops.infonce_lse(qs, ks, s, True)
    w = torch.full((6,), 0.1)
    text, frames = torch.randn(6, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 4] = False
    sim, bits = ops.topk_sim(text, frames, 2, mask)
    tn, fn = text.norm(dim=-1), frames.norm(dim=-1)
    sv, st, tv, tt = (torch.randn(r, 8, generator=g) for r in (6, 4, 6, 4))
    dstats = ops.distill_stats(sv, st, tv, tt, s, s)
    return [
        (ops.infonce_lse, (q, k, s, False)),
        (ops.infonce_lse, (qs, ks, s, True)),
        (ops.infonce_grad, (q, k, s, row_lse, torch.full((5,), 0.2), None, None)),
        (ops.infonce_grad, (qs, ks, s, rl, w, cl, w)),
        (ops.topk_sim, (text, frames, 2, mask)),
        (ops.topk_sim_bwd, (text, frames, bits, torch.randn(6, 6, generator=g), 2)),
        (ops.topk_sim_bwd_acc, (text, frames, bits, torch.randn(6, 6, generator=g), 2, torch.zeros(6, 8))),
        (ops.unit_grad, (torch.randn(6, 5, 8, generator=g), frames, fn)),
        (ops.select_frames, (frames, text, 3, mask)),
        (ops.topk_sim, (text, frames, 2, mask, tn, fn)),  # normalisation folded in
        (ops.topk_sim_bwd, (text, frames, bits, torch.randn(6, 6, generator=g), 2, tn, fn)),
        (ops.topk_sim_bwd_acc, (text, frames, bits, torch.randn(6, 6, generator=g), 2, torch.zeros(6, 8), tn, fn)),
        (ops.distill_stats, (sv, st, tv, tt, s, s)),
        (ops.distill_grad, (sv, st, tv, tt, s, s, dstats[0], dstats[1], torch.full((6,), 0.3), dstats[3], dstats[4],
                            torch.full((4,), 0.2))),
    ]


@pytest.mark.parametrize("i", range(14))
def test_opcheck(i):
    op, args = _samples()[i]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _compile_case(op: str, dev: str, seed: int):
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


def _check_compiled(op: str, backend: str, dev: str, compile_backend: str, seed: int) -> None:
    """torch.compile(fullgraph=True) of the loss: value and gradients against float64 truth with
    the project's rule (kernel error <= 2 x naive fp32 error + 1e-5)."""
    loss, ref, inputs = _compile_case(op, dev, seed)
    out = torch.compile(lambda *x: loss(backend, *x), fullgraph=True, backend=compile_backend)(*inputs)
    grads = torch.autograd.grad(out, inputs)
    naive = ref(*inputs, upcast=False)
    ngrads = torch.autograd.grad(naive, inputs)
    truth = ref(*inputs, upcast=True)
    tgrads = torch.autograd.grad(truth, inputs)
    assert_within_rule(f"{op} loss", out, naive, truth, torch.float32)
    for i, (a, n, t) in enumerate(zip(grads, ngrads, tgrads)):
        assert_within_rule(f"{op} grad {i}", a, n, t, torch.float32)


# Inductor as users run it; aot_eager for the video loss (its fake top-k bookkeeping makes the
# Inductor compile slow, and the op boundary it checks is the same).
@pytest.mark.parametrize("op,compile_backend", [("contrastive_loss", "inductor"), ("video_contrastive_loss", "aot_eager"),
                                                ("distillation_loss", "inductor")])
def test_compile_fullgraph(op, compile_backend):
    _check_compiled(op, "cpp", "cpu", compile_backend, seed=1)


# ----------------------------------------------------------------------------- Triton ops
# On CUDA these are triton_op/wrap_triton ops (torch.compile sees the kernels); under the
# interpreter (no GPU) the same launchers are opaque custom ops with the same schemas and fakes
# (kernels/common.py), so opcheck and fullgraph tracing are exercised here too.

TDEV = "cuda" if torch.cuda.is_available() else "cpu"
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"  # Inductor cannot run interpreted kernels


def _triton_samples():
    backends.load_triton()
    t = torch.ops.fitclip_ext
    g = torch.Generator().manual_seed(4)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(TDEV)

    s = torch.tensor([3.0], device=TDEV)
    q, k = r(5, 16), r(7, 16)
    qs, ks = r(6, 16), r(6, 16)
    rl, cl, _, _ = t.triton_infonce_lse(qs, ks, s, True, 0)
    w = torch.full((6,), 0.1, device=TDEV)
    text = torch.nn.functional.normalize(r(6, 16), dim=-1)
    frames = torch.nn.functional.normalize(r(6, 5, 16), dim=-1)
    mask = torch.ones(6, 5, dtype=torch.bool, device=TDEV)
    mask[0, 4] = False
    sim, bits = t.triton_topk_sim(text, frames, 2, mask)
    raw_t, raw_f = 3.0 * r(6, 16), r(6, 5, 16)
    sv, st, tv, tt = r(6, 16), r(4, 16), r(6, 16), r(4, 16)
    a = t.triton_distill_stats(sv, st, tv, tt, s, s)
    return [
        (t.triton_infonce_lse, (q, k, s, False, 1)),
        (t.triton_infonce_lse, (qs, ks, s, True, 0)),
        (t.triton_infonce_grad, (qs, ks, s, rl, w, cl, w, 0, 0.1)),
        (t.triton_infonce_grad, (q, k, s, t.triton_infonce_lse(q, k, s, False, 1)[0], torch.full((5,), 0.2, device=TDEV),
                                 None, None, 1, 0.0)),
        (t.triton_topk_sim, (text, frames, 2, mask)),
        (t.triton_topk_sim, (raw_t, raw_f, 2, mask, raw_t.norm(dim=-1), raw_f.norm(dim=-1))),  # normalisation folded in
        (t.triton_topk_sim_bwd, (text, frames, bits, r(6, 6), 2)),
        (t.triton_topk_sim_bwd, (raw_t, raw_f, bits, r(6, 6), 2, raw_t.norm(dim=-1), raw_f.norm(dim=-1))),
        (t.triton_topk_sim_bwd_acc, (text, frames, bits, r(6, 6), 2, torch.zeros(6, 16, device=TDEV))),
        (t.triton_unit_grad, (r(6, 5, 16), raw_f, raw_f.norm(dim=-1))),
        (t.triton_select_frames, (frames, text, 3, mask)),
        (t.triton_distill_stats, (sv, st, tv, tt, s, s)),
        (t.triton_distill_grad, (sv, st, tv, tt, s, s, a[0], a[1], w, a[3], a[4], torch.full((4,), 0.2, device=TDEV))),
    ]


@pytest.mark.parametrize("i", range(13))
def test_triton_opcheck(i):
    op, args = _triton_samples()[i]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("op", ["contrastive_loss", "video_contrastive_loss", "distillation_loss"])
def test_triton_compile_fullgraph(op):
    # fp32 products: on a GPU TF32 tiles err about 1e-3, where the naive fp32 product the rule
    # measures against does not (the interpreter always runs IEEE fp32).
    matmul = torch.backends.cuda.matmul
    saved, matmul.allow_tf32 = matmul.allow_tf32, False
    try:
        _check_compiled(op, "triton", TDEV, COMPILE_BACKEND, seed=6)
    finally:
        matmul.allow_tf32 = saved


def test_forward_ops_are_differentiable_on_their_own():
    """infonce_lse and topk_sim carry autograd formulas (through their gradient ops):
    gradcheck in float64 and opcheck with inputs that require grad."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    for with_col in (False, True):
        f = (lambda a, b, c: ops.infonce_lse(a, b, c, True)) if with_col else \
            (lambda a, b, c: ops.infonce_lse(a, b, c, False)[0])
        assert torch.autograd.gradcheck(f, (q, k, s))
        torch.library.opcheck(ops.infonce_lse, (q, k, s, with_col))
    text = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    frames = torch.randn(4, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for normalize in (False, True):
        def norms(t, fr):  # the norms are inputs of their own: the gradient reaches x through both
            return (t.norm(dim=-1), fr.norm(dim=-1)) if normalize else (None, None)

        assert torch.autograd.gradcheck(lambda t, fr: ops.topk_sim(t, fr, 2, None, *norms(t, fr))[0], (text, frames))
        torch.library.opcheck(ops.topk_sim, (text, frames, 2, None, *norms(text, frames)))
