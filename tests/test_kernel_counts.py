"""What the CUDA InfoNCE would do on an H100, counted under the Triton interpreter with the GPU's
block configurations (FITCLIP_TRITON_CONFIG=gpu): matrix FLOPs of every tl.dot and every torch
matmul, bytes every Triton load reads; bf16 numerics at the GPU's tile sizes; determinism and
no host synchronisation."""
from __future__ import annotations

import pytest
import torch

import fitclip_ext
from fitclip_ext.kernels import model
from fitclip_ext.reference import contrastive_loss_reference

# (slow: the GPU's block configurations under the interpreter, tens of seconds each; make test-fast leaves them out)
pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="counts are made under the interpreter"),
              pytest.mark.slow]


def _model_matches(launches, c, names) -> None:
    """The performance model's launches (kernels.model) against the interpreter's counts at the
    same size: each kernel's matrix FLOPs exactly, the torch (cuBLAS) products' FLOPs exactly,
    and the bytes the Triton tiles load within 2% (the count adds the per-row and per-column
    vectors the epilogues read)."""
    from fitclip_ext.kernels import contrastive
    from fitclip_ext.kernels.model import _tile_l2

    for kernel, prefix in names.items():
        rows = [x for x in launches if x.name.startswith(prefix)]
        assert sum(x.flops for x in rows) == c.kernels[kernel][0], kernel
    assert sum(x.flops for x in launches if x.kind == "cublas") == c.torch_flops
    if "contrastive_lse_kernel" in names:
        fwd = contrastive.candidates(torch.bfloat16, 512, small=False)[0]
        flops = c.kernels["contrastive_lse_kernel"][0]
        tiles = _tile_l2(flops, fwd["BLOCK_M"], fwd["BLOCK_N"])
        assert tiles <= c.kernels["contrastive_lse_kernel"][1] <= 1.02 * tiles, c.kernels["contrastive_lse_kernel"]


def _unit(b, d, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def _without_host_sync(monkeypatch, function_cls, run):
    """run() with .item() / bool() / .nonzero() / .tolist() on tensors raising while the autograd
    Function's forward and backward execute."""
    def forbidden(*_a, **_k):
        raise AssertionError("host synchronisation inside the op")

    def guarded(fn):
        def inner(*args):
            with monkeypatch.context() as mp:
                for name in ("item", "__bool__", "nonzero", "tolist"):
                    mp.setattr(torch.Tensor, name, forbidden)
                return fn(*args)
        return staticmethod(inner)

    with monkeypatch.context() as mp:
        mp.setattr(function_cls, "forward", guarded(function_cls.forward))
        mp.setattr(function_cls, "backward", guarded(function_cls.backward))
        return run()


@pytest.mark.parametrize("D", [512, 768])
def test_contrastive_loss_flop_and_byte_budgets(monkeypatch, D):
    pytest.importorskip("triton")
    from fitclip_ext.kernels.interpret import count

    monkeypatch.setenv("FITCLIP_TRITON_CONFIG", "gpu")
    B = 512
    q, k = _unit(B, D, 1).requires_grad_(), _unit(B, D, 2).requires_grad_()
    with count() as c:
        loss = fitclip_ext.contrastive_loss(q, k, 20.0, backend="triton")
        loss.backward()
    unit = B * B * D
    assert c.flops == 8 * unit, c  # the floor: forward 2, G recompute 2, dQ and dK GEMMs 2 + 2
    assert set(c.kernels) == {"contrastive_lse_kernel", "contrastive_grad_kernel"}
    _model_matches(model.contrastive(B, D), c, {"contrastive_lse_kernel": "contrastive_lse_kernel", "contrastive_grad_kernel": "contrastive_grad_kernel"})
    # streamed 128 x 128 (forward) and 128 x 64 (gradient) tiles, both operands per tile:
    # BLOCK_M BLOCK_N / (BLOCK_M + BLOCK_N) matrix FLOPs per loaded bf16 byte
    assert c.flops_per_byte("contrastive_lse_kernel") >= 63, c.kernels["contrastive_lse_kernel"]
    assert c.flops_per_byte("contrastive_grad_kernel") >= 42, c.kernels["contrastive_grad_kernel"]
    # and the GPU configuration's bf16 result against float64 on the same bf16 inputs
    truth_q, truth_k = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    truth = contrastive_loss_reference(truth_q, truth_k, torch.tensor(20.0, dtype=torch.float64))
    truth.backward()
    # bf16 products and outputs (unit roundoff 2^-8 = 3.9e-3): two roundings' worth, the
    # float32-input tests hold the kernels to the float64 rule
    assert abs(loss.double().item() - truth.item()) <= 8e-3 * abs(truth.item())  # the bf16 output's rounding
    for g, t in ((q.grad, truth_q.grad), (k.grad, truth_k.grad)):
        assert ((g.double() - t).norm() / t.norm()).item() < 1e-2  # G and the gradient rounded to bf16


def test_infonce_gpu_configuration_float32_exact_and_split(monkeypatch):
    """Float32 at the GPU's tiles, several row chunks and column splits, rectangular with an
    offset: float64-exact to float32 rounding."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FITCLIP_TRITON_CONFIG", "gpu")
    monkeypatch.setenv("FITCLIP_GPU_BLOCK_ELEMS", str(128 * 1100))  # chunks of 128 rows
    n, m, D = 300, 1100, 96
    q, k = _unit(n, D, 3, torch.float32).requires_grad_(), _unit(m, D, 4, torch.float32).requires_grad_()
    loss = fitclip_ext.infonce(q, k, 17.0, positive_offset=5, label_smoothing=0.1, backend="triton")
    loss.backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    truth = fitclip_ext.infonce(q64, k64, 17.0, positive_offset=5, label_smoothing=0.1, backend="torch")
    truth.backward()
    assert abs(loss.item() - truth.item()) < 1e-5 * abs(truth.item())
    for g, t in ((q.grad, q64.grad), (k.grad, k64.grad)):
        assert ((g.double() - t).norm() / t.norm()).item() < 1e-5


def test_contrastive_loss_deterministic_and_sync_free(monkeypatch):
    """Bitwise the same loss and gradients run to run, with column splits and row chunks, and no
    .item() / bool() / .nonzero() / .tolist() on tensors while the autograd op's forward and
    backward run (argument validation before it checks a CPU scale's finiteness)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FITCLIP_TRITON_CONFIG", "gpu")  # 128-row tiles: few interpreted programs
    monkeypatch.setenv("FITCLIP_TRITON_SMS", "8")
    monkeypatch.setenv("FITCLIP_GPU_BLOCK_ELEMS", str(256 * 1040))
    B, D = 1040, 32
    img, txt = _unit(B, D, 5, torch.float16), _unit(B, D, 6, torch.float16)
    scale = torch.tensor(30.0, requires_grad=True)

    def once():
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = scale.detach().clone().requires_grad_()
        loss = fitclip_ext.contrastive_loss(a, b, s, label_smoothing=0.1, backend="triton")
        loss.backward()
        return loss.detach(), a.grad, b.grad, s.grad

    from fitclip_ext.contrastive import _Contrastive

    first = once()
    second = _without_host_sync(monkeypatch, _Contrastive, once)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_float16_gradient_does_not_underflow():
    """A small upstream gradient (as a mean over a large batch gives): the float16 logit gradient
    is kept O(1) by the largest weight, so the features' gradient keeps its float64 value."""
    pytest.importorskip("triton")
    B, D = 96, 32
    q, k = _unit(B, D, 7, torch.float16).requires_grad_(), _unit(B, D, 8, torch.float16).requires_grad_()
    loss = fitclip_ext.contrastive_loss(q, k, 10.0, reduction="sum", backend="triton")
    (loss.float() * 1e-3).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    (contrastive_loss_reference(q64, k64, torch.tensor(10.0, dtype=torch.float64), reduction="sum") * 1e-3).backward()
    for g, t in ((q.grad, q64.grad), (k.grad, k64.grad)):
        assert ((g.double() - t).norm() / t.norm()).item() < 2e-3


@pytest.mark.parametrize("D,Dt", [(512, 512), (768, 768), (512, 256)])
def test_distillation_loss_flop_budget(monkeypatch, D, Dt):
    """distillation_loss at the GPU's tiles: 8 n m D + 4 n m Dt matrix FLOPs for forward and
    backward (the floor: both tile products in the forward and again for the logit gradient, the
    two gradient GEMMs), exactly; bf16 loss and gradients against float64."""
    pytest.importorskip("triton")
    from fitclip_ext.kernels.interpret import count
    from fitclip_ext.reference import distillation_loss_reference

    monkeypatch.setenv("FITCLIP_TRITON_CONFIG", "gpu")
    n = m = 512
    sv, st = _unit(n, D, 11).requires_grad_(), _unit(m, D, 12).requires_grad_()
    tv, tt = _unit(n, Dt, 13), _unit(m, Dt, 14)
    with count() as c:
        loss = fitclip_ext.distillation_loss(sv, st, tv, tt, 30.0, 60.0, backend="triton")
        loss.backward()
    floor = 8 * n * m * D + 4 * n * m * Dt
    assert c.flops == floor, c
    assert set(c.kernels) == {"distill_fwd_kernel", "distill_grad_kernel"}
    if D == Dt:
        _model_matches(model.distillation(n, D), c, {"distill_fwd_kernel": "distill_fwd_kernel", "distill_grad_kernel": "distill_grad_kernel"})
    for name in c.kernels:  # streamed 128 x 32 tiles (both operands per tile): 25.6
        assert c.flops_per_byte(name) >= 25, (name, c.kernels[name])
    s64, t64 = sv.detach().double().requires_grad_(), st.detach().double().requires_grad_()
    truth = distillation_loss_reference(s64, t64, tv.double(), tt.double(), 30.0, 60.0)
    truth.backward()
    assert abs(loss.double().item() - truth.item()) <= 8e-3 * abs(truth.item())
    for g, t in ((sv.grad, s64.grad), (st.grad, t64.grad)):
        assert ((g.double() - t).norm() / t.norm()).item() < 1e-2


def test_distillation_gpu_configuration_float32_chunks_and_splits(monkeypatch):
    """Float32 at the GPU's tiles with several row chunks (column partials merged across chunks)
    and column splits (row partials merged), rectangular, D != Dt: float64-exact to float32
    rounding; and bitwise repeatable without host synchronisation inside the op."""
    pytest.importorskip("triton")
    from fitclip_ext.distill import _Distill
    from fitclip_ext.reference import distillation_loss_reference

    monkeypatch.setenv("FITCLIP_TRITON_CONFIG", "gpu")
    monkeypatch.setenv("FITCLIP_TRITON_SMS", "16")
    monkeypatch.setenv("FITCLIP_GPU_BLOCK_ELEMS", str(64 * 1040))  # chunks of 64 rows
    n, m, D, Dt = 70, 1040, 48, 40  # (2 row chunks; 1040 columns: 2 column splits of >= 512)
    sv, st = _unit(n, D, 15, torch.float32), _unit(m, D, 16, torch.float32)
    tv, tt = _unit(n, Dt, 17, torch.float32), _unit(m, Dt, 18, torch.float32)

    def once():
        a, b = sv.clone().requires_grad_(), st.clone().requires_grad_()
        s = torch.tensor(25.0, requires_grad=True)
        loss = fitclip_ext.distillation_loss(a, b, tv, tt, s, 50.0, backend="triton")
        loss.backward()
        return loss.detach(), a.grad, b.grad, s.grad

    first = once()
    second = _without_host_sync(monkeypatch, _Distill, once)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    a64, b64 = sv.double().requires_grad_(), st.double().requires_grad_()
    s64 = torch.tensor(25.0, dtype=torch.float64, requires_grad=True)
    truth = distillation_loss_reference(a64, b64, tv.double(), tt.double(), s64, 50.0)
    truth.backward()
    assert abs(first[0].item() - truth.item()) < 1e-5 * abs(truth.item())
    for g, t in zip(first[1:], (a64.grad, b64.grad, s64.grad)):
        assert ((g.double() - t).norm() / t.norm()).item() < 1e-5


# ----------------------------------------------------------------------------- frame ops

def _frame_inputs(C, V, T, D, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    frames = torch.randn(V, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return text, frames


def _frame_op(op, text, frames, k):
    if op == "topk_frame_similarity":
        out = fitclip_ext.topk_frame_similarity(text, frames, k, backend="triton")
        w = torch.rand(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        loss = (out.double() * w).sum()
    else:
        loss = fitclip_ext.video_contrastive_loss(frames, text, 30.0, k=k, backend="triton")
    loss.backward()
    return loss


@pytest.mark.parametrize("op,budget,floor", [("topk_frame_similarity", 3.2, 3), ("video_contrastive_loss", 4.3, 4)])
def test_frame_ops_flop_and_byte_budgets(monkeypatch, op, budget, floor):
    """C = V = 128, T = 16, D = 512, k = 4, bf16, at the GPU's tiles: forward + backward within the
    budget in passes of 2 C V T D (the similarity forward, d text and d frames, plus the video
    loss's recomputed forward), the matrix FLOPs per loaded byte of each tile shape; and the
    result against float64 on the same bf16 inputs."""
    pytest.importorskip("triton")
    from fitclip_ext.kernels.interpret import count
    from fitclip_ext.reference import topk_frame_similarity_reference, video_contrastive_loss_reference

    monkeypatch.setenv("FITCLIP_TRITON_CONFIG", "gpu")
    C = V = 128
    T, D, k = 16, 512, 4
    text, frames = _frame_inputs(C, V, T, D, 21)
    with count() as c:
        loss = _frame_op(op, text, frames, k)
    unit = 2 * C * V * T * D
    assert c.flops <= budget * unit, c
    assert c.flops == floor * unit, c  # every pass a dense tensor-core product over the (padded) frames
    matrix = {name for name, (f, _) in c.kernels.items() if f}
    assert matrix == {"topk_sim_fwd_kernel", "topk_sim_dtext_kernel", "topk_sim_dframes_kernel"}, c
    launches = model.topk_frames(C, T, D) if op == "topk_frame_similarity" else model.video_contrastive(C, T, D)
    for name in matrix:  # the model's FLOPs per kernel are the counted ones
        assert sum(x.flops for x in launches if x.name.startswith(name)) == c.kernels[name][0], name
    # the forward streams 128 captions x 128 frame columns (64 FLOPs per byte); the gradient
    # kernels stream 128-row tiles against wider feature chunks (about 101)
    minimum = {"topk_sim_fwd_kernel": 63, "topk_sim_dtext_kernel": 96, "topk_sim_dframes_kernel": 96}
    for name in matrix:
        assert c.flops_per_byte(name) >= minimum[name], (name, c.kernels[name])
    t64, f64 = text.detach().double().requires_grad_(), frames.detach().double().requires_grad_()
    if op == "topk_frame_similarity":
        truth = (topk_frame_similarity_reference(t64, f64, k)
                 * torch.rand(C, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).sum()
    else:
        truth = video_contrastive_loss_reference(f64, t64, torch.tensor(30.0, dtype=torch.float64), k=k)
    truth.backward()
    assert abs(loss.double().item() - truth.item()) <= 8e-3 * abs(truth.item())
    for g, t in ((text.grad, t64.grad), (frames.grad, f64.grad)):
        assert ((g.double() - t).norm() / t.norm()).item() < 1e-2


def test_frame_ops_mean_pooling_flop_budget(monkeypatch):
    """k = T (FitCLIP's mean pooling), same sizes: one product with the mean unit frames, so far
    below the budgets (1/T of a pass forward, 3/T with the backward; the video loss is the
    InfoNCE's 8 B^2 D = 4/T passes). The similarity's matrix products are plain torch ones,
    forward and backward (FlopCounterMode sees the autograd engine's); the video loss's are all
    inside the InfoNCE ops (kernels.interpret.count sees them), with their tile shapes' FLOPs per
    loaded byte."""
    pytest.importorskip("triton")
    from torch.utils.flop_counter import FlopCounterMode

    from fitclip_ext.kernels.interpret import count

    monkeypatch.setenv("FITCLIP_TRITON_CONFIG", "gpu")
    C = V = 256
    T, D = 16, 512
    unit = 2 * C * V * T * D
    text, frames = _frame_inputs(C, V, T, D, 22)
    with FlopCounterMode(display=False) as fc:
        _frame_op("topk_frame_similarity", text, frames, T)
    assert fc.get_total_flops() == 3 * unit // T
    text, frames = _frame_inputs(C, V, T, D, 23)
    with count() as c:
        _frame_op("video_contrastive_loss", text, frames, T)
    assert c.flops == 4 * unit // T <= 4.3 * unit, c
    assert set(c.kernels) == {"contrastive_lse_kernel", "contrastive_grad_kernel"}
    assert c.flops_per_byte("contrastive_lse_kernel") >= 63, c.kernels
    assert c.flops_per_byte("contrastive_grad_kernel") >= 42, c.kernels


def test_backward_chunk_fits_the_memory_budget(monkeypatch):
    """The chunked backward's memory above inputs and gradients at B = 32768, D = 512 (bf16): the
    float32 dA accumulator's excess over the bf16 gradient (32 MB), the slab's float32 dB
    accumulator (16 MB, 8192 columns: meant to stay in the H100's 50 MB L2), the padded G chunk
    (12 MB, from the kernel to cuBLAS through L2) and the ds partials: within 64 MB. The knob
    overrides G's elements."""
    pytest.importorskip("triton")
    from fitclip_ext.kernels import common

    monkeypatch.delenv("FITCLIP_GPU_BLOCK_ELEMS", raising=False)
    B, D, bm, bn = 32768, 512, 128, 64
    slab, rows_c, _, _, split = common.backward_plan(B, B, D, 2, bm, bn, 132)
    assert (slab, rows_c) == (8192, 768)
    assert slab * D * 4 <= common.DB_SLAB_BYTES and rows_c * slab * 2 <= common.G_BYTES
    extra = common.backward_extra_bytes(B, B, D, 2, bm, bn, 132)
    assert extra == B * D * 2 + slab * D * 4 + rows_c * slab * 2 + split * B * 4 + B * 4
    assert extra <= common.MEMORY_BUDGET, extra
    monkeypatch.setenv("FITCLIP_GPU_BLOCK_ELEMS", str(1 << 24))
    assert common.backward_plan(B, B, D, 2, bm, bn, 132)[1] == 2048
