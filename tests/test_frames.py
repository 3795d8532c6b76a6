"""select_frames, gather_frames, topk_frame_similarity and video_contrastive_loss against float64
truth: indices exactly, values and gradients within the tolerance rule, on every backend."""
from __future__ import annotations

import pytest
import torch

import fitclip_ext
from fitclip_ext.reference import (select_frames_reference, topk_frame_similarity_reference,
                                   video_contrastive_loss_reference)

from fitclip_ext.testing import assert_within_rule, rel_err

T_VALUES = [1, 3, 7, 12, 16, 33]


def _k_values(t):
    return sorted({1, min(2, t), t})


TRITON_T_OTHER_DTYPES = (1, 7, 16)  # under the interpreter, for dtypes but float32: T = 1, odd, a power of two


def _cases(sizes, dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16)):
    """(backend, dtype, size, T, k): every case on the C++ backend; the Triton backend on CUDA,
    or through the interpreter for small sizes in every dtype (the bf16 dot made exact by
    tests/conftest.py; float64 computed in float64 by the kernels): every T and k in float32,
    and T in TRITON_T_OTHER_DTYPES in the others (each a minute of interpreter time less: the
    kernels' paths depend on T's padding and k, which float32 covers, the dtype only on loads,
    products and stores, which those T cover)."""
    out = []
    gpu = torch.cuda.is_available()
    for dtype in dtypes:
        for size in sizes:
            for t in T_VALUES:
                for k in _k_values(t):
                    out.append(pytest.param("cpp", dtype, size, t, k, id=f"cpp-{dtype}-{size}-T{t}-k{k}"))
                    interpreted = max(size) <= 40 and t <= 16 and (dtype == torch.float32 or t in TRITON_T_OTHER_DTYPES)
                    if gpu or interpreted:
                        out.append(pytest.param("triton", dtype, size, t, k, id=f"triton-{dtype}-{size}-T{t}-k{k}"))
    return out


VIDEO_LOSS_VARIANTS = [("mean", 0.0, False), ("none", 0.1, True), ("sum", 0.2, False)]


def _with_variants(cases, variants):
    """Each case with each variant (reduction, label smoothing, mask); under the interpreter the
    Triton cases take the variant that exercises the most at once (per-row losses, smoothing,
    masked frames), and all of them in float32 at the largest size."""
    out = []
    largest = max(c.values[2] for c in cases)
    for case in cases:
        backend, dtype, size = case.values[0], case.values[1], case.values[2]
        interpreted = backend == "triton" and not torch.cuda.is_available()
        every = not interpreted or (dtype == torch.float32 and size == largest)
        for v in variants if every else variants[1:2]:
            out.append(pytest.param(*case.values, *v, id="-".join(map(str, v)) + f"-{case.id}"))
    return out


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _rand(shape, dtype, seed, dev):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(dev)


def _random_mask(v, t, k, seed, dev):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(v, t, generator=g) < 0.7
    for i in range(v):  # keep at least k real frames
        if mask[i].sum() < k:
            mask[i, torch.randperm(t, generator=g)[:k]] = True
    return mask.to(dev)


def _grads(fn, inputs, weight_seed=0):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(weight_seed)
    w = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    return out, torch.autograd.grad((out * w).sum(), leaves)


@pytest.mark.parametrize("backend,dtype,size,t,k,masked", _with_variants(
    _cases([(5, 9), (16, 16), (37, 20)], (torch.float64, torch.float32, torch.float16))
    + _cases([(16, 16), (37, 20)], (torch.bfloat16,)), [(False,), (True,)]))
def test_topk_frame_similarity(backend, dtype, size, t, k, masked):
    c, v = size
    dev = device_for(backend)
    d = 24
    text, frames = _rand((c, d), dtype, 1, dev), _rand((v, t, d), dtype, 2, dev)
    mask = _random_mask(v, t, k, 3, dev) if masked else None
    out, grads = _grads(lambda a, b: fitclip_ext.topk_frame_similarity(a, b, k, mask=mask, backend=backend), [text, frames])
    naive, ngrads = _grads(lambda a, b: topk_frame_similarity_reference(a, b, k, mask=mask), [text, frames])
    truth, tgrads = _grads(lambda a, b: topk_frame_similarity_reference(a, b, k, mask=mask, upcast=True), [text, frames])
    assert out.shape == (c, v) and out.dtype == dtype
    assert_within_rule("sim", out, naive, truth, dtype)
    for name, g_, ng, tg in zip(["d_text", "d_frames"], grads, ngrads, tgrads):
        assert_within_rule(name, g_, ng, tg, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_elems", ["4096", "0"])  # small ragged forward tiles; the default
def test_cpp_tiles_and_caption_blocks(monkeypatch, dtype, block_elems):
    """The C++ forward's caption x video tiles (ragged in both directions at FITCLIP_CPU_BLOCK_ELEMS
    = 4096: 2 captions x 292 videos at T = 7) and the sparse backward's caption blocks of d frames
    (64 or 128 captions at D = 512, so 300 captions make 3-5 of them, the last ragged) against
    float64."""
    monkeypatch.setenv("FITCLIP_CPU_BLOCK_ELEMS", block_elems)
    c, v, t, k, d = 300, 301, 7, 2, 512
    _check_cpp_against_float64(c, v, t, k, d, dtype)


def test_cpp_sparse_backward_caption_chunks():
    """The sparse d frames' scratch is bounded: at k = 30 its captions go in chunks of 273, so 600
    captions make three, whose sums add up in the rows."""
    _check_cpp_against_float64(600, 20, 64, 30, 8, torch.float64)


def _check_cpp_against_float64(c, v, t, k, d, dtype):
    text, frames = _rand((c, d), dtype, 11, "cpu"), _rand((v, t, d), dtype, 12, "cpu")
    mask = _random_mask(v, t, k, 13, "cpu")
    out, grads = _grads(lambda a, b: fitclip_ext.topk_frame_similarity(a, b, k, mask=mask, backend="cpp"),
                        [text, frames])
    naive, ngrads = _grads(lambda a, b: topk_frame_similarity_reference(a, b, k, mask=mask), [text, frames])
    truth, tgrads = _grads(lambda a, b: topk_frame_similarity_reference(a, b, k, mask=mask, upcast=True),
                           [text, frames])
    assert_within_rule("sim", out, naive, truth, dtype)
    for name, g_, ng, tg in zip(["d_text", "d_frames"], grads, ngrads, tgrads):
        assert_within_rule(name, g_, ng, tg, dtype)


@pytest.mark.parametrize("k", range(1, 11))
def test_cpp_topk_every_k_with_nan_and_ties(k):
    """Every k the C++ top-k specialises (1-8, 16 videos per vector) and past it (9, 10), over 33
    videos (two full groups and a partial one): scores and gradients as float64's, a NaN frame
    makes its video's scores NaN, and a tie goes to the earlier frame (the gradient lands there)."""
    c, v, t, d = 5, 33, 12, 16
    text, frames = _rand((c, d), torch.float64, 21, "cpu"), _rand((v, t, d), torch.float64, 22, "cpu")
    frames[3, 5, 0] = float("nan")
    frames[20, 7] = frames[20, 2]  # a tie in every caption's ranking of video 20

    def ours(a, b):
        return fitclip_ext.topk_frame_similarity(a, b, k, backend="cpp")

    out, ref = ours(text, frames), topk_frame_similarity_reference(text, frames, k)
    assert out[:, 3].isnan().all() and ref[:, 3].isnan().all()
    torch.testing.assert_close(out[:, 20], ref[:, 20], rtol=1e-12, atol=1e-12)  # a tie: the same sum
    keep = torch.ones(v, dtype=torch.bool)
    keep[[3, 20]] = False  # torch.topk breaks ties in no documented order
    torch.testing.assert_close(out[:, keep], ref[:, keep], rtol=1e-12, atol=1e-12)
    frames[3, 5, 0] = 0.5  # gradients without the NaN (which reaches every caption's through the products)
    w = torch.rand(c, v, dtype=torch.float64) * keep  # away from the tie
    _, (gt, gf) = _grads(lambda a, b: ours(a, b) * w, [text, frames])
    _, (rt, rf) = _grads(lambda a, b: topk_frame_similarity_reference(a, b, k) * w, [text, frames])
    torch.testing.assert_close(gt, rt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gf[keep], rf[keep], rtol=1e-10, atol=1e-12)
    for i in range(c):  # per caption: frame 7 is never chosen over the equal, earlier frame 2
        w = torch.zeros(c, v, dtype=torch.float64)
        w[i, 20] = 1
        _, (_, gf) = _grads(lambda a, b: ours(a, b) * w, [text, frames])
        assert gf[20, 2].abs().sum() > 0 or gf[20, 7].abs().sum() == 0


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_topk_sim_ties_go_to_the_earlier_frame(backend, masked):
    """Frames 2 and 7 of every video equal: whichever k, a caption never takes frame 7 without
    frame 2, nor a masked frame (the chosen bit sets, read directly)."""
    from fitclip_ext import backends

    dev = device_for(backend)
    c, v, t, d = 5, 33, 12, 16
    text, frames = _rand((c, d), torch.float32, 31, dev), _rand((v, t, d), torch.float32, 32, dev)
    frames[:, 7] = frames[:, 2]
    ops = backends.get(backends.resolve(backend, torch.device(dev)))
    norms = ops.row_norms(text), ops.row_norms(frames)
    for k in (1, 2, 3, 4, 6, 9, 11):  # the C++ top-k's fixed-k registers (k <= 8) and its loop
        mask = None
        if masked:
            mask = _random_mask(v, t, k, 33 + k, dev)
            mask[:, [2, 7]] = True
        _, bits = ops.topk_sim(text, frames, k, mask, *norms)
        b = bits[..., 0].cpu()
        assert not ((b >> 7) & 1 & ~(b >> 2)).any(), f"k = {k}: frame 7 taken over the equal frame 2"
        if masked:
            masked_word = ((~mask.cpu()).int() << torch.arange(t)).sum(1).int()  # [V] bit sets
            assert not (b & masked_word).any(), f"k = {k}: a masked frame chosen"


def test_topk_frame_similarity_k_equals_t_is_mean_pooling():
    text, frames = _rand((6, 8), torch.float64, 4, "cpu"), _rand((5, 4, 8), torch.float64, 5, "cpu")
    out = fitclip_ext.topk_frame_similarity(text, frames, 4, backend="cpp")
    tn = torch.nn.functional.normalize(text, dim=-1)
    fn = torch.nn.functional.normalize(frames, dim=-1)
    mean_pooled = torch.einsum("cd,vtd->cvt", tn, fn).mean(-1)
    torch.testing.assert_close(out, mean_pooled, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,dtype,size,t,k", _cases([(1,), (6,), (33,)], (torch.float64, torch.float32, torch.float16,
                                                                               torch.bfloat16)))
@pytest.mark.parametrize("masked", [False, True])
def test_select_frames(backend, dtype, size, t, k, masked):
    (b,) = size
    dev = device_for(backend)
    frames, text = _rand((b, t, 16), dtype, 6, dev), _rand((b, 16), dtype, 7, dev)
    mask = _random_mask(b, t, k, 8, dev) if masked else None
    idx, scores = fitclip_ext.select_frames(frames, text, k, mask=mask, backend=backend)
    ref_idx, ref_scores = select_frames_reference(frames, text, k, mask=mask, upcast=True)
    assert idx.dtype == torch.int64 and idx.shape == (b, k)
    assert torch.equal(idx.cpu(), ref_idx.cpu()), f"first mismatch rows: {(idx.cpu() != ref_idx.cpu()).any(1).nonzero()[:5].tolist()}"
    assert (idx.diff(dim=1) > 0).all()  # ascending time order
    assert rel_err(scores, ref_scores) < {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3,
                                          torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_frames_half_agrees_with_float64_on_the_same_inputs(backend, dtype):
    """Half-precision features: the selection is float64's on the same (rounded) inputs: the
    captions are not normalised (and rounded) before the kernel, which works in float32."""
    dev = device_for(backend)
    frames, text = _rand((410, 16, 64), dtype, 11, dev), _rand((410, 64), dtype, 12, dev)
    idx, _ = fitclip_ext.select_frames(frames, text, 4, backend=backend)
    ref_idx, _ = select_frames_reference(frames.cpu().double(), text.cpu().double(), 4)
    assert torch.equal(idx.cpu(), ref_idx), (idx.cpu() != ref_idx).any(1).sum().item()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_topk_sim_backward_float16_small_gradient_does_not_underflow(backend):
    """The backward op with float16 features and a float32 upstream gradient of 1e-9 (what the
    video loss hands it at a large batch): grad / k rounded to float16 would flush to 0, so the
    weights are grad / max|grad| (O(1)) and the scale is put back in float32."""
    from fitclip_ext import backends

    dev = device_for(backend)
    text, frames = _rand((40, 16), torch.float16, 15, dev), _rand((12, 5, 16), torch.float16, 16, dev)
    ops = backends.get(backends.resolve(backend, text.device))
    norms = ops.row_norms(text), ops.row_norms(frames)
    t_op, f_op = ops.operand(text), ops.operand(frames)
    _, bits = ops.topk_sim(t_op, f_op, 2, None, *norms)
    grad = 1e-9 * (1 + torch.rand(40, 12, generator=torch.Generator().manual_seed(18))).to(dev)
    dtext, dframes = ops.topk_sim_bwd(t_op, f_op, bits, grad, 2, *norms)
    # float64 truth: d unit_text[c] = sum_{v, chosen t} grad / k * unit_frame, and the transpose
    tn = torch.nn.functional.normalize(text.cpu().double(), dim=-1)
    fn = torch.nn.functional.normalize(frames.cpu().double(), dim=-1)
    t_idx = torch.arange(5)
    chosen = ((bits.cpu()[..., 0:1] >> t_idx) & 1).double()  # [C, V, T]
    w = grad.cpu().double()[..., None] * chosen / 2
    assert rel_err(dtext.cpu(), torch.einsum("cvt,vtd->cd", w, fn)) < 1e-3
    assert rel_err(dframes.cpu(), torch.einsum("cvt,cd->vtd", w, tn)) < 1e-3


def test_triton_topk_takes_at_most_64_frames_per_video():
    """A video's frames are one tile of the Triton forward: past 64 frames a clear error (the C++
    and torch backends take any T)."""
    dev = device_for("triton")
    text, frames = _rand((3, 16), torch.float32, 41, dev), _rand((2, 65, 16), torch.float32, 42, dev)
    with pytest.raises(ValueError, match="T = 65 frames per video.*at most 64"):
        fitclip_ext.topk_frame_similarity(text, frames, 2, backend="triton")
    assert fitclip_ext.topk_frame_similarity(text.cpu(), frames.cpu(), 2, backend="torch").shape == (3, 2)


@pytest.mark.parametrize("sms", ["1", "64"])
@pytest.mark.parametrize("c,v", [(20, 200), (150, 4)])
def test_topk_sim_range_splits_give_the_same_result(monkeypatch, sms, c, v):
    """The forward and d text split the videos, d frames the captions, over programs when the
    blocks alone would leave SMs idle (partials summed by torch): the grid stays (caption or video
    blocks, D chunks, ranges) whatever V is, with no axis near CUDA's 65535 limit but the first
    (2^31 - 1). Many SMs against one: the same scores and gradients, float64's."""
    from fitclip_ext.kernels import frames as kframes

    dev = device_for("triton")
    monkeypatch.setattr(kframes, "num_sms", lambda device: int(sms))  # the device's count on CUDA
    monkeypatch.setattr(kframes, "MIN_SPLIT_CAPTIONS", 64)
    splits = []
    split_of = kframes._range_split

    def recorded(*args):
        out = split_of(*args)
        splits.append(out[1])
        return out

    monkeypatch.setattr(kframes, "_range_split", recorded)
    text, frames = _rand((c, 16), torch.float32, 19, dev), _rand((v, 5, 16), torch.float32, 20, dev)
    sim, (dt, df) = _grads(lambda x, f: fitclip_ext.topk_frame_similarity(x, f, 2, backend="triton"), [text, frames])
    ref, (dt_ref, df_ref) = _grads(lambda x, f: topk_frame_similarity_reference(x, f, 2),
                                   [text.cpu().double(), frames.cpu().double()])
    assert rel_err(sim.cpu(), ref) < 1e-5
    assert rel_err(dt.cpu(), dt_ref) < 1e-5 and rel_err(df.cpu(), df_ref) < 1e-5
    split_fwd, split_dtext, split_dframes = splits
    if sms == "1":
        assert splits == [1, 1, 1]
    elif v > c:
        assert split_fwd > 1 and split_dtext > 1
    else:
        assert split_dframes > 1


def test_select_frames_reads_the_frames_once(monkeypatch):
    """At the GPU's block configuration the kernel's loads are the frames once, the captions once
    and the mask: at most 1.1x the frames' bytes at T = 16 (counted under the interpreter)."""
    if torch.cuda.is_available():  # (load bytes are counted by patching the interpreter's builder)
        pytest.skip("counted under the interpreter")
    from fitclip_ext.kernels.interpret import count

    monkeypatch.setenv("FITCLIP_TRITON_CONFIG", "gpu")
    B, T, D = 64, 16, 512
    frames, text = _rand((B, T, D), torch.bfloat16, 13, "cpu"), _rand((B, D), torch.bfloat16, 14, "cpu")
    mask = torch.ones(B, T, dtype=torch.bool)
    with count() as c:
        fitclip_ext.select_frames(frames, text, 4, mask=mask, backend="triton")
    loaded = c.kernels["select_frames_kernel"][1]
    assert loaded <= 1.1 * B * T * D * 2, (loaded, B * T * D * 2)


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_select_frames_ties_go_to_the_earlier_frame(backend):
    frames = torch.zeros(2, 6, 4)
    frames[:, :, 0] = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 1.0])  # equal cosine 1.0 everywhere ...
    frames[:, :, 1] = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])  # ... except frames 0, 3, 5
    text = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    dev = device_for(backend)
    idx, _ = fitclip_ext.select_frames(frames.to(dev), text.to(dev), 2, backend=backend)
    assert idx.tolist() == [[1, 2], [1, 2]]


def test_gather_frames_uint8_and_features():
    video = torch.randint(0, 255, (3, 8, 3, 4, 4), dtype=torch.uint8)
    idx = torch.tensor([[0, 5], [2, 3], [7, 7]])
    out = fitclip_ext.gather_frames(video, idx)
    assert out.shape == (3, 2, 3, 4, 4) and out.dtype == torch.uint8
    assert torch.equal(out[1, 0], video[1, 2]) and torch.equal(out[2, 1], video[2, 7])
    feats = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: fitclip_ext.gather_frames(f, idx), (feats,))


def test_select_frames_scores_have_gradients():
    frames = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    text = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    idx, scores = fitclip_ext.select_frames(frames, text, 3, backend="cpp")
    _, ref = select_frames_reference(frames, text, 3)
    g = torch.autograd.grad(scores.sum(), (frames, text))
    rg = torch.autograd.grad(ref.sum(), (frames, text))
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,dtype,size,t,k,reduction,eps,masked", _with_variants(
    _cases([(1,), (8,), (29,)], (torch.float64, torch.float32, torch.float16)) + _cases([(29,)], (torch.bfloat16,)),
    VIDEO_LOSS_VARIANTS))
def test_video_contrastive_loss(backend, dtype, size, t, k, reduction, eps, masked):
    (b,) = size
    dev = device_for(backend)
    frames, text = _rand((b, t, 20), dtype, 9, dev), _rand((b, 20), dtype, 10, dev)
    mask = _random_mask(b, t, k, 11, dev) if masked else None
    scale = torch.tensor(30.0, dtype=torch.float64, device=dev)
    kw = dict(k=k, mask=mask, label_smoothing=eps, reduction=reduction)
    out, grads = _grads(lambda f, x, s: fitclip_ext.video_contrastive_loss(f, x, s, backend=backend, **kw), [frames, text, scale])
    naive, ngrads = _grads(lambda f, x, s: video_contrastive_loss_reference(f, x, s.to(dtype), **kw), [frames, text, scale])
    truth, tgrads = _grads(lambda f, x, s: video_contrastive_loss_reference(f, x, s, upcast=True, **kw), [frames, text, scale])
    assert out.dtype == dtype
    assert_within_rule("loss", out, naive, truth, dtype)
    for name, g_, ng, tg in zip(["d_frames", "d_text", "d_scale"], grads, ngrads, tgrads):
        assert_within_rule(name, g_, ng, tg, dtype)


def test_video_contrastive_loss_gradcheck():
    frames = _rand((4, 5, 3), torch.float64, 12, "cpu").requires_grad_()
    text = _rand((4, 3), torch.float64, 13, "cpu").requires_grad_()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, x, s: fitclip_ext.video_contrastive_loss(f, x, s, k=2, label_smoothing=0.1, reduction="none", backend="cpp"),
        (frames, text, scale))
    assert torch.autograd.gradcheck(lambda x, f: fitclip_ext.topk_frame_similarity(x, f, 3, backend="cpp"), (text, frames))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fitclip_ext.select_frames(torch.randn(2, 4, 8), torch.randn(2, 8), 5), ValueError, r"k must be in \[1, T\] = \[1, 4\], got 5"),
        (lambda: fitclip_ext.select_frames(torch.randn(2, 4, 8), torch.randn(2, 8), 0), ValueError, r"k must be in"),
        (lambda: fitclip_ext.select_frames(torch.randn(2, 4, 8), torch.randn(2, 8), 2.0), TypeError, r"k must be an int"),
        (lambda: fitclip_ext.select_frames(torch.randn(2, 4, 8), torch.randn(3, 8), 2), ValueError, r"same batch size B"),
        (lambda: fitclip_ext.select_frames(torch.randn(2, 8), torch.randn(2, 8), 1), ValueError, r"frame_features must be 3-D"),
        (lambda: fitclip_ext.select_frames(torch.randn(2, 4, 8), torch.randn(2, 7), 1), ValueError, r"same feature size D"),
        (lambda: fitclip_ext.select_frames(torch.randn(2, 4, 8), torch.randn(2, 8), 2,
                                           mask=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)),
         ValueError, r"mask leaves video 1 with 1 real frames, fewer than k=2"),
        (lambda: fitclip_ext.select_frames(torch.randn(2, 4, 8), torch.randn(2, 8), 2, mask=torch.ones(2, 4)),
         TypeError, r"mask must be a bool tensor"),
        (lambda: fitclip_ext.select_frames(torch.randn(2, 4, 8), torch.randn(2, 8), 2, mask=torch.ones(2, 3, dtype=torch.bool)),
         ValueError, r"mask must have shape \[videos, T\] = \[2, 4\]"),
        (lambda: fitclip_ext.topk_frame_similarity(torch.randn(3, 8), torch.randint(0, 5, (2, 4, 8)), 1), TypeError, r"frame_features must be float32"),
        (lambda: fitclip_ext.topk_frame_similarity(torch.randn(3, 8), torch.randn(2, 4, 8).double(), 1), TypeError, r"same dtype"),
        (lambda: fitclip_ext.video_contrastive_loss(torch.randn(2, 4, 8), torch.randn(2, 8), float("nan"), k=1), ValueError, r"logit_scale must be finite"),
        (lambda: fitclip_ext.video_contrastive_loss(torch.randn(2, 4, 8), torch.randn(2, 8), 1.0, k=1, reduction="max"), ValueError, r"reduction must be one of"),
        (lambda: fitclip_ext.gather_frames(torch.randn(2, 4, 8), torch.tensor([[0, 4], [1, 2]])), ValueError, r"indices must be in \[0, T\) = \[0, 4\)"),
        (lambda: fitclip_ext.gather_frames(torch.randn(2, 4, 8), torch.tensor([[0.0, 1.0], [1.0, 2.0]])), TypeError, r"indices must be int64"),
        (lambda: fitclip_ext.gather_frames(torch.randn(2, 4, 8), torch.tensor([[0, 1]])), ValueError, r"batch size 2 rows"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend,k", [("cpp", 1), ("cpp", 2), ("cpp", 4), ("cpp", 6),  # sparse (2k < T) and dense C++ backward
                                       ("triton", 1), ("triton", 4)])
def test_folded_normalisation_matches_f_normalize(backend, k):
    """The C++ and Triton kernels normalise inside (no normalised copy of the frames): values and
    raw-input gradients equal F.normalize's, including its clamp of tiny norms (a zero frame, a
    zero caption, large and tiny scales), for the similarity and the video loss."""
    g = torch.Generator().manual_seed(11)
    text = torch.randn(7, 16, generator=g, dtype=torch.float64) * torch.tensor([1, 1e3, 1e-3, 1, 1, 2, 1.0])[:, None].double()
    frames = torch.randn(5, 6, 16, generator=g, dtype=torch.float64) * 7.0
    frames[1, 2] = 0.0  # zero frame: F.normalize leaves it 0, its gradient is g / eps
    frames[3, 0] *= 1e-14  # norm below the 1e-12 clamp
    text[4] = 0.0
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    dev = device_for(backend)
    dtypes = (torch.float64, torch.float32) if backend == "cpp" else (torch.float32,)
    for dtype in dtypes:
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-4)
        t, f = text.to(dtype).to(dev).requires_grad_(), frames.to(dtype).to(dev).requires_grad_()
        out = fitclip_ext.topk_frame_similarity(t, f, k, backend=backend)
        gt, gf = torch.autograd.grad((out * w.to(dtype).to(dev)).sum(), (t, f))
        t2, f2 = text.clone().requires_grad_(), frames.clone().requires_grad_()
        ref = topk_frame_similarity_reference(t2, f2, k)
        rt, rf = torch.autograd.grad((ref * w).sum(), (t2, f2))
        torch.testing.assert_close(out.double().cpu(), ref, **tol)
        # compare the gradients relative to their size (the clamped rows' are ~1e12)
        for a, b in ((gt, rt), (gf, rf)):
            scale = b.abs().amax(-1, keepdim=True).clamp_min(1e-30)
            torch.testing.assert_close(a.double().cpu() / scale, b / scale, **tol)
        # the video loss (B = 5 pairs): same inputs, its own accumulation of the frames' gradient
        tv, fv = t.detach()[:5].clone().requires_grad_(), f.detach().clone().requires_grad_()
        loss = fitclip_ext.video_contrastive_loss(fv, tv, 3.0, k=k, label_smoothing=0.1, backend=backend)
        lt, lf = torch.autograd.grad(loss, (tv, fv))
        t3, f3 = text[:5].clone().requires_grad_(), frames.clone().requires_grad_()
        ref = video_contrastive_loss_reference(f3, t3, torch.tensor(3.0, dtype=torch.float64), k=k, label_smoothing=0.1)
        rt, rf = torch.autograd.grad(ref, (t3, f3))
        torch.testing.assert_close(loss.double().cpu(), ref, **tol)
        for a, b in ((lt, rt), (lf, rf)):
            scale = b.abs().amax(-1, keepdim=True).clamp_min(1e-30)
            torch.testing.assert_close(a.double().cpu() / scale, b / scale, **tol)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mean_pooling_shortcut_equals_the_topk_kernels(backend):
    """k = T runs as one product with the mean unit frame; the top-k kernels at k = T agree."""
    from fitclip_ext import frames as fr

    text = _rand((9, 16), torch.float32, 21, "cpu").requires_grad_()
    frames = _rand((7, 5, 16), torch.float32, 22, "cpu").requires_grad_()
    fast = fitclip_ext.topk_frame_similarity(text, frames, 5, backend=backend)
    kernel = fr._TopkSimilarity.apply(text, frames, 5, None, backend)  # the kernels normalise inside
    w = _rand((9, 7), torch.float32, 23, "cpu")
    g_fast = torch.autograd.grad((fast * w).sum(), (text, frames))
    g_kernel = torch.autograd.grad((kernel * w).sum(), (text, frames))
    torch.testing.assert_close(fast, kernel, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_kernel):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_triton_autotuning_on_request_matches_float64(monkeypatch):
    """FITCLIP_TRITON_AUTOTUNE=1 for the frame kernels: every candidate of the similarity forward,
    both gradient kernels (the video loss's d text accumulated outside them) and
    select_frames is timed, and the results still match float64; without it no tuner is made."""
    pytest.importorskip("triton")
    from fitclip_ext.kernels import common as kernel_common

    dev = device_for("triton")
    text, frames = _rand((21, 24), torch.float32, 31, dev), _rand((19, 9, 24), torch.float32, 32, dev)
    scale = torch.tensor(20.0, dtype=torch.float64, device=dev)
    k = 3

    def run():
        sim, (dt, df) = _grads(lambda x, f: fitclip_ext.topk_frame_similarity(x, f, k, backend="triton"), [text, frames])
        loss, lg = _grads(lambda f, x, s: fitclip_ext.video_contrastive_loss(f, x, s, k=k, label_smoothing=0.1,
                                                                              backend="triton"),
                          [frames[:19], text[:19], scale.float()])
        idx, _ = fitclip_ext.select_frames(frames, text[:19], k, backend="triton")
        return [sim, dt, df, loss, *lg[:2]], idx

    monkeypatch.setattr(kernel_common, "TUNERS", {})
    monkeypatch.delenv("FITCLIP_TRITON_AUTOTUNE", raising=False)
    default, default_idx = run()
    assert not kernel_common.TUNERS
    monkeypatch.setenv("FITCLIP_TRITON_AUTOTUNE", "1")
    tuned, tuned_idx = run()
    sim_t, (dt_t, df_t) = _grads(lambda x, f: topk_frame_similarity_reference(x, f, k, upcast=True),
                                 [text.double(), frames.double()])
    loss_t, lg_t = _grads(lambda f, x, s: video_contrastive_loss_reference(f, x, s, k=k, label_smoothing=0.1, upcast=True),
                          [frames[:19].double(), text[:19].double(), scale])
    for name, out, ref, truth in zip(["sim", "d_text", "d_frames", "loss", "loss d_frames", "loss d_text"], tuned,
                                     default, [sim_t, dt_t, df_t, loss_t, *lg_t[:2]]):
        assert rel_err(out, truth) < 1e-5, name
        assert rel_err(out, ref) < 1e-5, name  # the accumulated d frames were not counted twice
    assert torch.equal(tuned_idx, default_idx)
    assert torch.equal(tuned_idx.cpu(), select_frames_reference(frames.double(), text[:19].double(), k)[0].cpu())
    names = sorted(t.base_fn.__name__ + (f" ({ident[1]})" if ident[1] else "") for ident, t in kernel_common.TUNERS.items())
    assert names == ["select_frames_kernel", "topk_sim_dframes_kernel", "topk_sim_dtext_kernel",
                     "topk_sim_fwd_kernel"], names
    for t in kernel_common.TUNERS.values():
        assert len(t.configs_timings) == len(t.configs) > 1
