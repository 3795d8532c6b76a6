"""The C++ ops are proper torch custom ops: opcheck passes (schema, fake implementation,
dispatch), and torch.compile(fullgraph=True) traces the public losses without graph breaks.
(The Triton ops' own: tests/test_triton_ops.py, which runs where the extension is not built.)"""
import pytest
import torch

from fitclip_ext import backends

from .compile_cases import check_compiled

pytestmark = pytest.mark.skipif(not backends.load_cpp(), reason="C++ extension not built")

ops = torch.ops.fitclip_ext if backends.load_cpp() else None


def _samples():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    qs, ks = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    s = torch.tensor(3.0, dtype=torch.float64)
    row_lse, _ = ops.contrastive_lse(q, k, s, False)
    rl, cl = ops.contrastive_lse(qs, ks, s, True)
    w = torch.full((6,), 0.1)
    text, frames = torch.randn(6, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 4] = False
    sim, bits = ops.topk_sim(text, frames, 2, mask)
    tn, fn = text.norm(dim=-1), frames.norm(dim=-1)
    sv, st, tv, tt = (torch.randn(r, 8, generator=g) for r in (6, 4, 6, 4))
    dstats = ops.distill_stats(sv, st, tv, tt, s, s)
    return [
        (ops.contrastive_lse, (q, k, s, False)),
        (ops.contrastive_lse, (qs, ks, s, True)),
        (ops.contrastive_grad, (q, k, s, row_lse, torch.full((5,), 0.2), None, None)),
        (ops.contrastive_grad, (qs, ks, s, rl, w, cl, w)),
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


# Inductor as users run it; aot_eager for the video loss (its fake top-k bookkeeping makes the
# Inductor compile slow, and the op boundary it checks is the same).
@pytest.mark.parametrize("op,compile_backend", [("contrastive_loss", "inductor"), ("video_contrastive_loss", "aot_eager"),
                                                ("distillation_loss", "inductor")])
def test_compile_fullgraph(op, compile_backend):
    check_compiled(op, "cpp", "cpu", compile_backend, seed=1)


def test_forward_ops_are_differentiable_on_their_own():
    """contrastive_lse and topk_sim carry autograd formulas (through their gradient ops):
    gradcheck in float64 and opcheck with inputs that require grad."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    for with_col in (False, True):
        f = (lambda a, b, c: ops.contrastive_lse(a, b, c, True)) if with_col else \
            (lambda a, b, c: ops.contrastive_lse(a, b, c, False)[0])
        assert torch.autograd.gradcheck(f, (q, k, s))
        torch.library.opcheck(ops.contrastive_lse, (q, k, s, with_col))
    text = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    frames = torch.randn(4, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for normalize in (False, True):
        def norms(t, fr):  # the norms are inputs of their own: the gradient reaches x through both
            return (t.norm(dim=-1), fr.norm(dim=-1)) if normalize else (None, None)

        assert torch.autograd.gradcheck(lambda t, fr: ops.topk_sim(t, fr, 2, None, *norms(t, fr))[0], (text, frames))
        torch.library.opcheck(ops.topk_sim, (text, frames, 2, None, *norms(text, frames)))
