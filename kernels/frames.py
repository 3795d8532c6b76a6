"""Triton kernels of the frame ops (`fitclip_ext.topk_frame_similarity`, `video_contrastive_loss`,
`select_frames` on CUDA): caption-frame cosine similarity fused with top-k selection.

The frames [V, T, D] are one matrix of V * T rows (frame t of video v at v * stride_v +
t * stride_t, any strides); a tile's columns are BLOCK_V whole videos of T_PAD (T rounded up to a
power of two) frames, BLOCK_V * T_PAD columns in all, so every tile product is a full-size
tensor-core `tl.dot` and each video's frames sit in one tile.

`topk_sim_fwd_kernel` (grid: caption blocks x video ranges): a program streams the frame tiles
of its range of videos against its BLOCK_C caption rows, both operands pipelined over D as the
InfoNCE forward does (kernels.common.stream_tile); the epilogue of each tile reshapes the
[BLOCK_C, BLOCK_V * T_PAD] similarities to [BLOCK_C, BLOCK_V, T_PAD] and takes k rounds of
(max, index of the first max) over the frames: the pooled mean [C, V] and the chosen frames as
bit sets [C, V, ceil(T / 32)] (int32, bit t % 32 of word t // 32: the C++ backend's format),
saved for the backward. Ties go to the earlier frame; a NaN similarity makes the pair's score
NaN. Video ranges are split over programs when the caption blocks alone would not fill the GPU
(each program keeps at least 512 frame columns).

Backward (no recomputation: the chosen frames come from the forward's bits). The weights
W[c, (v, t)] = grad[c, v] / k * [t chosen for (c, v)] are built in registers, tile by tile, from
grad and the bits ([BLOCK_C, BLOCK_V] loads expanded over the frames), rounded to the inputs'
dtype after division by max|grad| (O(1) entries: no float16 underflow however small the upstream
gradient; max|grad| is put back in float32):
- `topk_sim_dtext_kernel` (grid: caption blocks x D chunks x video ranges): dtext = W @ frames,
  frame tiles of BLOCK_V whole videos streaming;
- `topk_sim_dframes_kernel` (grid: video blocks x D chunks x caption ranges): dframes = W^T @ text,
  each program owning BLOCK_V * T_PAD frame rows of the output, written once.
Both are dense tensor-core products over the padded frames (one pass of 2 C V T D each).
A range split (when the blocks alone would leave SMs idle) writes float32 partials [split, ...]
that torch sums; without a split the output is written once.

`select_frames_kernel` (grid: batch blocks): cosine of each caption with its own T frames, one
read of the frames and of the captions (float32 products and norms for every dtype), then k rounds
of max (ties to the earlier frame); chosen frame indices out (sorted by the launcher).
The similarity kernels take the raw embeddings and their row norms and divide each tile by them
(F.normalize's clamp included); the gradient kernels give the gradients with respect to the unit
vectors and `unit_grad_kernel` turns them into the raw inputs' ones, in place: no normalised copy
of the V x T x D frames is made.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import contrastive
from .common import (acc_zeros, arch_of, column_split, compute_dtype, configured, input_precision, launch, num_sms,
                     safe_index, small_configs, stream_tile, triton_op)

EPS = tl.constexpr(1e-12)  # F.normalize's clamp of the norm
MAX_T = 64  # frames per video the similarity kernels take (T_PAD columns of one tile; 128 spills)
MIN_SPLIT_CAPTIONS = 256  # captions per program at least when d frames splits them


@triton.jit
def _frame_columns(v0, v_end, T, stride_fv, stride_ft, BLOCK_V: tl.constexpr, T_PAD: tl.constexpr):
    """The BLOCK_V * T_PAD frame columns of videos v0, v0 + 1, ...: (video [BN] int64, frame
    index [BN], element offset of the frame's row, in range: video < v_end and t < T). A column
    out of range has the offset of frame 0 of video v0 (a real frame of the range: see
    kernels.common.safe_index)."""
    j = tl.arange(0, BLOCK_V * T_PAD)
    vid = v0 + (j // T_PAD).to(tl.int64)
    t = j % T_PAD
    ok = (vid < v_end) & (t < T)
    return vid, t, tl.where(ok, vid, v0) * stride_fv + tl.where(ok, t, 0) * stride_ft, ok


@triton.jit
def _load_words(bits_ptr, pair, ok, N_WORDS: tl.constexpr):
    """Up to 4 int32 bit-set words of the pairs at `pair` (pair index, any shape)."""
    w0 = tl.load(bits_ptr + pair * N_WORDS, mask=ok, other=0)
    w1 = w0
    w2 = w0
    w3 = w0
    if N_WORDS > 1:
        w1 = tl.load(bits_ptr + pair * N_WORDS + 1, mask=ok, other=0)
    if N_WORDS > 2:
        w2 = tl.load(bits_ptr + pair * N_WORDS + 2, mask=ok, other=0)
    if N_WORDS > 3:
        w3 = tl.load(bits_ptr + pair * N_WORDS + 3, mask=ok, other=0)
    return w0, w1, w2, w3


@triton.jit
def _chosen(w0, w1, w2, w3, tt, N_WORDS: tl.constexpr):
    """Bit tt of the words (broadcast: words and tt of compatible shapes), as a bool."""
    word = w0
    if N_WORDS > 1:
        word = tl.where(tt >= 32, w1, word)
    if N_WORDS > 2:
        word = tl.where(tt >= 64, w2, word)
    if N_WORDS > 3:
        word = tl.where(tt >= 96, w3, word)
    return ((word >> (tt % 32)) & 1) != 0


@triton.jit
def topk_sim_fwd_kernel(
    text_ptr, frames_ptr, mask_ptr, sim_ptr, bits_ptr, text_norm_ptr, frames_norm_ptr,
    C, V, T, D, k, vids_per_split,
    stride_tc, stride_td, stride_fv, stride_ft, stride_fd,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, T_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
    N_WORDS: tl.constexpr, HAS_MASK: tl.constexpr,
    NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """sim[c, v] = mean of the k largest cosines of caption c with video v's real frames, and the
    chosen frames' bits [C, V, N_WORDS], for the program's caption block and video range."""
    pid_c = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    text_off = safe_index(rc, c_ok) * stride_tc
    if NORMALIZE:  # cosine of the raw rows: divide by max(norm, eps) as F.normalize does
        inv_c = 1.0 / tl.maximum(tl.load(text_norm_ptr + rc, mask=c_ok, other=1.0), EPS)
    tt = tl.arange(0, T_PAD)[None, None, :]
    v_begin = pid_p * vids_per_split
    v_end = tl.minimum(v_begin + vids_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        vid, t, safe_off, ok = _frame_columns(v0, v_end, T, stride_fv, stride_ft, BLOCK_V, T_PAD)
        s = stream_tile(text_ptr, frames_ptr, text_off, safe_off, D, stride_td, stride_fd, BLOCK_C, BLOCK_V * T_PAD,
                        BLOCK_K, INPUT_PRECISION)
        if NORMALIZE:
            inv_f = 1.0 / tl.maximum(tl.load(frames_norm_ptr + vid * T + t, mask=ok, other=1.0), EPS)
            s = s * inv_c[:, None] * inv_f[None, :]
        live = ok
        if HAS_MASK:
            live = live & (tl.load(mask_ptr + vid * T + t, mask=ok, other=0) != 0)
        nan = tl.max(tl.reshape(((s != s) & ok[None, :]).to(tl.int32), (BLOCK_C, BLOCK_V, T_PAD)), 2)
        s3 = tl.reshape(tl.where(live[None, :] & (s == s), s, float("-inf")), (BLOCK_C, BLOCK_V, T_PAD))
        total = tl.zeros((BLOCK_C, BLOCK_V), sim_ptr.dtype.element_ty)
        w0 = tl.zeros((BLOCK_C, BLOCK_V), tl.int32)
        w1 = w0
        w2 = w0
        w3 = w0
        for _ in range(0, k):  # k rounds of max: the largest, the earliest frame among equal ones
            best, idx = tl.max(s3, 2, return_indices=True, return_indices_tie_break_left=True)
            total += best
            bit = 1 << (idx % 32)
            w0 |= tl.where(idx < 32, bit, 0)
            if N_WORDS > 1:
                w1 |= tl.where((idx >= 32) & (idx < 64), bit, 0)
            if N_WORDS > 2:
                w2 |= tl.where((idx >= 64) & (idx < 96), bit, 0)
            if N_WORDS > 3:
                w3 |= tl.where(idx >= 96, bit, 0)
            s3 = tl.where(tt == idx[:, :, None], float("-inf"), s3)
        total = tl.where(nan != 0, float("nan"), total / k)
        rv = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        out_ok = c_ok[:, None] & (rv < v_end)[None, :]
        pair = rc[:, None] * V + rv[None, :]
        tl.store(sim_ptr + pair, total, mask=out_ok)
        tl.store(bits_ptr + pair * N_WORDS, w0, mask=out_ok)
        if N_WORDS > 1:
            tl.store(bits_ptr + pair * N_WORDS + 1, w1, mask=out_ok)
        if N_WORDS > 2:
            tl.store(bits_ptr + pair * N_WORDS + 2, w2, mask=out_ok)
        if N_WORDS > 3:
            tl.store(bits_ptr + pair * N_WORDS + 3, w3, mask=out_ok)


@triton.jit
def topk_sim_dtext_kernel(
    grad_ptr, gscale_ptr, bits_ptr, frames_ptr, out_ptr, frames_norm_ptr,
    C, V, T, D, k, vids_per_split,
    stride_fv, stride_ft, stride_fd,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, T_PAD: tl.constexpr, BLOCK_DO: tl.constexpr,
    N_WORDS: tl.constexpr, NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out[p, c, d] = sum over the videos of range p of W[c, (v, t)] frames[v, t, d] (unit frames
    when NORMALIZE: W divided by the frames' norms), W = grad / k on the chosen frames."""
    pid_c = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2).to(tl.int64)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    acc = tl.zeros((BLOCK_C, BLOCK_DO), out_ptr.dtype.element_ty)
    inv_g = tl.load(gscale_ptr) / k  # weights / max|grad|: O(1), no float16 underflow
    tt = tl.arange(0, T_PAD)[None, None, :]
    v_begin = pid_p * vids_per_split
    v_end = tl.minimum(v_begin + vids_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64: pair and row offsets may pass 2^31
        ok = c_ok[:, None] & (rv < v_end)[None, :]
        pair = rc[:, None] * V + rv[None, :]
        g = tl.load(grad_ptr + pair, mask=ok, other=0.0) * inv_g
        w0, w1, w2, w3 = _load_words(bits_ptr, pair, ok, N_WORDS)
        on = _chosen(w0[:, :, None], w1[:, :, None], w2[:, :, None], w3[:, :, None], tt, N_WORDS)
        w = tl.reshape(tl.where(on, g[:, :, None], 0.0), (BLOCK_C, BLOCK_V * T_PAD))
        vid, t, off, f_ok = _frame_columns(v0, v_end, T, stride_fv, stride_ft, BLOCK_V, T_PAD)
        if NORMALIZE:  # W @ unit frames = (W / frame norms) @ raw frames
            w = w / tl.maximum(tl.load(frames_norm_ptr + vid * T + t, mask=f_ok, other=1.0), EPS)[None, :]
        f = tl.load(frames_ptr + off[:, None] + do[None, :] * stride_fd, mask=f_ok[:, None] & do_ok[None, :],
                    other=0.0)
        acc = tl.dot(w.to(f.dtype), f, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    out = out_ptr + pid_p * C * D + rc[:, None] * D + do[None, :]
    tl.store(out, acc * tl.load(gscale_ptr + 1), mask=c_ok[:, None] & do_ok[None, :])


@triton.jit
def topk_sim_dframes_kernel(
    grad_ptr, gscale_ptr, bits_ptr, text_ptr, out_ptr, text_norm_ptr,
    C, V, T, D, k, caps_per_split,
    stride_tc, stride_td,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, T_PAD: tl.constexpr, BLOCK_DO: tl.constexpr,
    N_WORDS: tl.constexpr, NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """out[p, v, t, d] = sum over the captions of range p of W[c, (v, t)] text[c, d] (unit
    captions when NORMALIZE) for the program's BLOCK_V videos: [V, T, D] float32 per range."""
    pid_v = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2).to(tl.int64)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = rv < V
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    acc = tl.zeros((BLOCK_V * T_PAD, BLOCK_DO), out_ptr.dtype.element_ty)
    inv_g = tl.load(gscale_ptr) / k  # weights / max|grad|, as in topk_sim_dtext_kernel
    tt = tl.arange(0, T_PAD)[None, :, None]
    c_begin = pid_p * caps_per_split
    c_end = tl.minimum(c_begin + caps_per_split, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        c_ok = rc < c_end
        ok = v_ok[:, None] & c_ok[None, :]  # [BLOCK_V, BLOCK_C]: transposed pairs
        pair = rc[None, :] * V + rv[:, None]
        g = tl.load(grad_ptr + pair, mask=ok, other=0.0) * inv_g
        if NORMALIZE:  # W^T @ unit captions = (W / caption norms)^T @ raw captions
            g = g / tl.maximum(tl.load(text_norm_ptr + rc, mask=c_ok, other=1.0), EPS)[None, :]
        w0, w1, w2, w3 = _load_words(bits_ptr, pair, ok, N_WORDS)
        on = _chosen(w0[:, None, :], w1[:, None, :], w2[:, None, :], w3[:, None, :], tt, N_WORDS)
        wt = tl.reshape(tl.where(on, g[:, None, :], 0.0), (BLOCK_V * T_PAD, BLOCK_C))
        x = tl.load(text_ptr + rc[:, None] * stride_tc + do[None, :] * stride_td,
                    mask=c_ok[:, None] & do_ok[None, :], other=0.0)
        acc = tl.dot(wt.to(x.dtype), x, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    vid, t, _, f_ok = _frame_columns(pid_v * BLOCK_V, V, T, 0, 0, BLOCK_V, T_PAD)
    out = out_ptr + pid_p * V * T * D + (vid * T + t)[:, None] * D + do[None, :]
    tl.store(out, acc * tl.load(gscale_ptr + 1), mask=f_ok[:, None] & do_ok[None, :])


@triton.jit
def unit_grad_kernel(
    g_ptr, x_ptr, norm_ptr, R, D, T, stride_xo, stride_xi, stride_xd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """In place, for each row r: g <- d/dx of <g, x / max(|x|, eps)> = (g - <g, x> x / |x|^2) / |x|,
    or g / eps where the clamp holds (F.normalize's backward). g: float32 [R, D] contiguous; row r
    of x lies at (r // T) * stride_xo + (r % T) * stride_xi (frames [V, T, D] of any strides)."""
    pid = tl.program_id(0).to(tl.int64)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    x_row = (rr // T) * stride_xo + (rr % T) * stride_xi
    offs = tl.arange(0, BLOCK_D)
    nrm = tl.load(norm_ptr + rr, mask=r_ok, other=1.0)
    inv = 1.0 / tl.maximum(nrm, EPS)
    dot = tl.zeros((BLOCK_R,), g_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs
        m2 = r_ok[:, None] & (dd[None, :] < D)
        g = tl.load(g_ptr + rr[:, None] * D + dd[None, :], mask=m2, other=0.0)
        x = tl.load(x_ptr + x_row[:, None] + dd[None, :] * stride_xd, mask=m2, other=0.0).to(g_ptr.dtype.element_ty)
        dot += tl.sum(g * x, 1)
    coef = tl.where(nrm > EPS, dot * inv * inv, 0.0)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs
        m2 = r_ok[:, None] & (dd[None, :] < D)
        g = tl.load(g_ptr + rr[:, None] * D + dd[None, :], mask=m2, other=0.0)
        x = tl.load(x_ptr + x_row[:, None] + dd[None, :] * stride_xd, mask=m2, other=0.0).to(g_ptr.dtype.element_ty)
        tl.store(g_ptr + rr[:, None] * D + dd[None, :], (g - coef[:, None] * x) * inv[:, None], mask=m2)


@triton.jit
def select_frames_kernel(
    frames_ptr, text_ptr, mask_ptr, idx_ptr,
    B, T, D, k,
    stride_fb, stride_ft, stride_fd, stride_tb, stride_td,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, T_PAD: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """idx[b, :] = the k frames of video b with the largest cosine to caption b (in selection
    order; the launcher sorts them). Each program streams its videos' [BLOCK_B, T, BLOCK_D] frame
    chunks once and the captions' [BLOCK_B, BLOCK_D] chunk once per chunk of features (float32
    products and norms whatever the dtype); the caption's norm does not change the ranking, so raw
    captions are used. Then k rounds of max: the largest cosine, the earliest frame among equal
    ones, taken out of the running."""
    pid = tl.program_id(0).to(tl.int64)
    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    dot = acc_zeros(frames_ptr, BLOCK_B, T_PAD)  # float32 (float64 for float64 inputs)
    sq = acc_zeros(frames_ptr, BLOCK_B, T_PAD)
    bt_ok = b_ok[:, None] & t_ok[None, :]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        x = tl.load(text_ptr + rb[:, None] * stride_tb + dd[None, :] * stride_td,
                    mask=b_ok[:, None] & d_ok[None, :], other=0.0).to(dot.dtype)
        f = tl.load(frames_ptr + rb[:, None, None] * stride_fb + offs_t[None, :, None] * stride_ft
                    + dd[None, None, :] * stride_fd, mask=bt_ok[:, :, None] & d_ok[None, None, :],
                    other=0.0).to(dot.dtype)
        dot += tl.sum(f * x[:, None, :], 2)
        sq += tl.sum(f * f, 2)
    cos = dot / tl.maximum(tl.sqrt(sq), 1e-12)
    cos = tl.where(cos == cos, cos, float("-inf"))  # (a NaN frame is never preferred)
    live = bt_ok
    if HAS_MASK:
        real = tl.load(mask_ptr + rb[:, None] * T + offs_t[None, :], mask=bt_ok, other=0).to(tl.int1)
        live = live & real
    for j in range(0, k):
        best = tl.max(tl.where(live, cos, float("-inf")), 1)
        pick = tl.min(tl.where(live & (cos == best[:, None]), offs_t[None, :], T_PAD), 1)
        tl.store(idx_ptr + rb * k + j, pick.to(tl.int64), mask=b_ok)
        live = live & (offs_t[None, :] != pick[:, None])


# ----------------------------------------------------------------------------- launchers

def n_words(T: int) -> int:
    return triton.cdiv(T, 32)


def sim_candidates(dtype, D: int, T: int, small: bool | None = None, precision: str | None = None,
                   arch: int = 90) -> list[dict]:
    """The similarity forward's block configurations, known good first (the default; the others
    are timed only under FITCLIP_TRITON_AUTOTUNE=1): the InfoNCE forward's streamed, pipelined
    tiles (kernels/contrastive.candidates), with tiles of BLOCK_V = BLOCK_N / T_PAD
    whole videos (at least one: T_PAD columns). Compiled without spills for sm_80/sm_90 with
    Triton 3.6 and 3.8 (`python -m fitclip_ext.kernels.aot`)."""
    t_pad = triton.next_power_of_2(T)
    gpu = not small_configs(small)
    fma = dtype == torch.float64 or (dtype == torch.float32 and (precision or input_precision(dtype)) == "ieee")
    out = []
    for i, c in enumerate(contrastive.candidates(dtype, D, small, precision, arch)):
        if i and t_pad < 16 and dtype == torch.float32 and gpu:
            continue  # (the TF32 32-column variant spills on sm_80 at T <= 8)
        # (128 columns of frames with the k rounds of max spill on sm_80, and at T <= 4 on sm_90: 64 there)
        bn = max(c["BLOCK_N"] if (arch >= 90 and t_pad >= 8) or not gpu else min(c["BLOCK_N"], 64), t_pad)
        # (CUDA-core FMAs at T >= 32: 16 caption rows and 4 warps; 32 rows or 8 warps keep a stack slot;
        # tensor cores at T = 64: 64 captions x two 64-frame videos, 128 x 64 spills with Triton 3.6)
        narrow = fma and t_pad >= 32 and gpu
        long = not fma and t_pad >= 64 and gpu
        block_c = 16 if narrow else (64 if long else c["BLOCK_M"])
        bn = 128 if long else bn
        cfg = dict(BLOCK_C=block_c, BLOCK_V=bn // t_pad, T_PAD=t_pad, BLOCK_K=c["BLOCK_K"],
                   N_WORDS=n_words(T), num_warps=4 if narrow else c["num_warps"], num_stages=c["num_stages"])
        if cfg not in out:
            out.append(cfg)
    return out


def _grad_cfg(block_c, block_n, t_pad, block_do, warps, stages, words):
    return dict(BLOCK_C=block_c, BLOCK_V=max(1, block_n // t_pad), T_PAD=t_pad, BLOCK_DO=block_do, N_WORDS=words,
                num_warps=warps, num_stages=stages)


def dtext_candidates(dtype, T: int, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """d text's block configurations, default first: 128 captions against frame tiles of
    BLOCK_V whole videos (32 columns or one video) and BLOCK_DO output features (bf16/fp16: about
    101 matrix FLOPs per loaded byte at T = 16, D chunks of 128; wider column tiles or chunks of
    256, which would reach 113, spill in the odd-size builds)."""
    t_pad, words = triton.next_power_of_2(T), n_words(T)
    if small_configs(small):
        return [_grad_cfg(16, 16, t_pad, 16, 1, 1, words), _grad_cfg(16, 32, t_pad, 32, 1, 1, words)]
    if dtype == torch.float64:  # the float64 path (exactness, not speed; 32 output features spill at T >= 32)
        return [_grad_cfg(32, 32, t_pad, 16, 4, 2, words)]
    if dtype == torch.float32 and (precision or input_precision(dtype)) == "ieee":
        return [_grad_cfg(32, 32, t_pad, 64 if t_pad < 64 else 32, 4, 2, words)]
    if dtype == torch.float32:  # TF32 (64 output features spill 8 bytes at T = 64 with Triton 3.6 on sm_80)
        return [_grad_cfg(64, 32, t_pad, 64 if t_pad < 64 else 32, 8, 2, words)]
    if t_pad >= 64:  # one 64-frame video a tile: 64 captions (128 spill in the odd-size builds)
        return [_grad_cfg(64, 64, t_pad, 128, 8, 2, words)]
    block_do = 128 if t_pad >= 16 else 64  # (128 spills where a tile holds 4+ short videos' words)
    # 16 warps: 8 spill in the odd-size builds (Triton 3.6 at every T, 3.8 at wider tiles)
    # (a 16-column variant is not pipelined at T <= 16: one configuration)
    return [_grad_cfg(128, 32, t_pad, block_do, 16, 2, words)]


def dframes_candidates(dtype, T: int, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """d frames' block configurations, default first: 128 frame rows (BLOCK_V whole videos)
    against caption tiles of BLOCK_C and BLOCK_DO output features (bf16/fp16: about 101 matrix
    FLOPs per loaded byte at T = 16)."""
    t_pad, words = triton.next_power_of_2(T), n_words(T)
    if small_configs(small):
        return [_grad_cfg(16, 16, t_pad, 16, 1, 1, words), _grad_cfg(32, 16, t_pad, 32, 1, 1, words)]
    if dtype == torch.float64:  # the float64 path (exactness, not speed)
        return [_grad_cfg(32, 32, t_pad, 32, 4, 2, words)]
    if dtype == torch.float32 and (precision or input_precision(dtype)) == "ieee":
        return [_grad_cfg(32, 32, t_pad, 64 if t_pad < 128 else 32, 4, 2, words)]
    if dtype == torch.float32:
        return [_grad_cfg(32, 128, t_pad, 64, 8, 2, words)]
    return [_grad_cfg(64, 128, t_pad, 128, 8, 2, words), _grad_cfg(64, 128, t_pad, 128, 8, 3, words)]


def select_candidates(D: int, T: int, small: bool | None = None, dtype: torch.dtype | None = None) -> list[dict]:
    """select_frames' block configurations (memory-bound: one read of the frames), default first:
    [BLOCK_B, T_PAD, BLOCK_D] frame chunks of about 4096 elements in flight per program (no spills,
    `python -m fitclip_ext.kernels.aot`)."""
    t_pad = triton.next_power_of_2(T)
    if small_configs(small):
        return [dict(BLOCK_B=4, BLOCK_D=16, T_PAD=t_pad, num_warps=1, num_stages=1),
                dict(BLOCK_B=2, BLOCK_D=16, T_PAD=t_pad, num_warps=1, num_stages=1)]
    block_d = min(64 if dtype == torch.float64 else 128, triton.next_power_of_2(D))  # (float64: 128 spills)
    block_b = max(1, 4096 // (t_pad * block_d))

    def cfg(b, w, st):
        return dict(BLOCK_B=b, BLOCK_D=block_d, T_PAD=t_pad, num_warps=w, num_stages=st)

    out = [cfg(block_b, 4, 2), cfg(block_b, 4, 3)]
    if t_pad < 64:  # (8 warps kept an 8-byte stack slot at T = 64 with Triton 3.6)
        out.append(cfg(block_b, 8, 2))
    return out


def _mask_arg(mask, fallback):
    return (mask.to(torch.int8).contiguous(), True) if mask is not None else (fallback, False)


def _range_split(n: int, blocks: int, per_step: int, min_len: int, device) -> tuple[int, int]:
    """(length of each program's range of n, ranges): split when `blocks` programs per range would
    leave SMs idle (kernels.common.column_split)."""
    return column_split(n, blocks, per_step, num_sms(device), min_cols=min_len)


# The similarity ops take the raw embeddings and their row norms (text_norm [C], frames_norm
# [V, T], float32), or None for inputs that are already unit vectors; the gradient ops return the
# gradients with respect to the unit vectors, which `unit_grad` turns into the raw inputs' ones.

@triton_op("triton_topk_sim")
def triton_topk_sim(text: torch.Tensor, frames: torch.Tensor, k: int, mask: torch.Tensor | None,
                 text_norm: torch.Tensor | None = None, frames_norm: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    C, D = text.shape
    V, T, _ = frames.shape
    if T > MAX_T:
        raise ValueError(f"frame_features has T = {T} frames per video; the Triton backend's fused top-k takes at "
                         f"most {MAX_T} (a video's frames are one tile): pass fewer frames or backend='torch'")
    dev = text.device
    prec = input_precision(text.dtype)
    cands = sim_candidates(text.dtype, D, T, precision=prec, arch=arch_of(dev))
    kernel, cfg = configured(topk_sim_fwd_kernel, cands, ["C", "V", "T", "D", "k", "HAS_MASK", "NORMALIZE",
                                                           "INPUT_PRECISION"])
    sim = torch.empty((C, V), device=dev, dtype=compute_dtype(text.dtype))
    bits = torch.empty((C, V, n_words(T)), device=dev, dtype=torch.int32)
    m, has_mask = _mask_arg(mask, sim)
    normalize = text_norm is not None
    default = cands[0]  # (candidates share BLOCK_C; ranges are multiples of the widest BLOCK_V)
    step = max(c["BLOCK_V"] for c in cands)
    per, split = _range_split(V, triton.cdiv(C, default["BLOCK_C"]), step, triton.cdiv(512, default["T_PAD"]), dev)
    launch(kernel, lambda c: (triton.cdiv(C, c["BLOCK_C"]), split),
           text, frames, m, sim, bits, text_norm if normalize else sim, frames_norm if normalize else sim,
           C, V, T, D, k, per, text.stride(0), text.stride(1), frames.stride(0), frames.stride(1), frames.stride(2),
           HAS_MASK=has_mask, NORMALIZE=normalize, INPUT_PRECISION=prec, **cfg)
    return sim, bits


def grad_scale(grad: torch.Tensor) -> torch.Tensor:
    """[1 / max|grad|, max|grad|] (grad's dtype, the compute dtype; 1 where grad is all zero): the
    backward kernels round grad / max|grad| to the inputs' dtype, so float16 weights never underflow."""
    g_max = grad.abs().amax() if grad.numel() else torch.ones((), device=grad.device, dtype=grad.dtype)
    g_max = torch.where(g_max > 0, g_max, torch.ones_like(g_max))
    return torch.stack([1.0 / g_max, g_max])


def _dtext(text, frames, bits, grad, k, frames_norm, gscale) -> torch.Tensor:
    """[C, D] in the compute dtype: the unit captions' gradient."""
    C, D = text.shape
    V, T, _ = frames.shape
    dev = text.device
    prec = input_precision(text.dtype)
    cands = dtext_candidates(text.dtype, T, precision=prec)
    kernel, cfg = configured(topk_sim_dtext_kernel, cands, ["C", "V", "T", "D", "k", "NORMALIZE", "INPUT_PRECISION"])
    d0 = cands[0]
    step = max(c["BLOCK_V"] for c in cands)
    blocks = triton.cdiv(C, d0["BLOCK_C"]) * triton.cdiv(D, d0["BLOCK_DO"])
    per, split = _range_split(V, blocks, step, triton.cdiv(512, d0["T_PAD"]), dev)
    out = torch.empty((split, C, D), device=dev, dtype=grad.dtype)
    launch(kernel, lambda c: (triton.cdiv(C, c["BLOCK_C"]), triton.cdiv(D, c["BLOCK_DO"]), split),
           grad, gscale, bits, frames, out, frames_norm if frames_norm is not None else grad, C, V, T, D, k, per,
           frames.stride(0), frames.stride(1), frames.stride(2), NORMALIZE=frames_norm is not None,
           INPUT_PRECISION=prec, **cfg)
    return out[0] if split == 1 else out.sum(0)


def _dframes(text, frames, bits, grad, k, text_norm, gscale) -> torch.Tensor:
    """[V, T, D] in the compute dtype: the unit frames' gradient, each element written once (without a split)."""
    C, D = text.shape
    V, T, _ = frames.shape
    dev = text.device
    prec = input_precision(text.dtype)
    cands = dframes_candidates(text.dtype, T, precision=prec)
    kernel, cfg = configured(topk_sim_dframes_kernel, cands, ["C", "V", "T", "D", "k", "NORMALIZE",
                                                              "INPUT_PRECISION"])
    d0 = cands[0]
    step = max(c["BLOCK_C"] for c in cands)
    blocks = triton.cdiv(V, d0["BLOCK_V"]) * triton.cdiv(D, d0["BLOCK_DO"])
    per, split = _range_split(C, blocks, step, MIN_SPLIT_CAPTIONS, dev)
    out = torch.empty((split, V, T, D), device=dev, dtype=grad.dtype)
    launch(kernel, lambda c: (triton.cdiv(V, c["BLOCK_V"]), triton.cdiv(D, c["BLOCK_DO"]), split),
           grad, gscale, bits, text, out, text_norm if text_norm is not None else grad, C, V, T, D, k, per,
           text.stride(0), text.stride(1), NORMALIZE=text_norm is not None, INPUT_PRECISION=prec, **cfg)
    return out[0] if split == 1 else out.sum(0)


@triton_op("triton_topk_sim_bwd")
def triton_topk_sim_bwd(text: torch.Tensor, frames: torch.Tensor, bits: torch.Tensor, grad: torch.Tensor, k: int,
                     text_norm: torch.Tensor | None = None, frames_norm: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.to(compute_dtype(text.dtype)).contiguous()
    gscale = grad_scale(grad)
    return (_dtext(text, frames, bits, grad, k, frames_norm, gscale),
            _dframes(text, frames, bits, grad, k, text_norm, gscale))


@triton_op("triton_topk_sim_bwd_acc", mutates_args=("dtext_acc",))
def triton_topk_sim_bwd_acc(text: torch.Tensor, frames: torch.Tensor, bits: torch.Tensor, grad: torch.Tensor, k: int,
                         dtext_acc: torch.Tensor, text_norm: torch.Tensor | None = None,
                         frames_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The video loss's per-video-block backward: adds d text into dtext_acc ([C, D] compute dtype, a
    small read-modify-write per block) and returns d frames for the block's videos."""
    grad = grad.to(compute_dtype(text.dtype)).contiguous()
    gscale = grad_scale(grad)
    dtext_acc += _dtext(text, frames, bits, grad, k, frames_norm, gscale)
    return _dframes(text, frames, bits, grad, k, text_norm, gscale)


def unit_config(D: int, dtype: torch.dtype | None = None) -> dict:
    if small_configs(None):
        return dict(BLOCK_R=16, BLOCK_D=16, num_warps=1, num_stages=1)
    block_d = min(64 if dtype == torch.float64 else 128, triton.next_power_of_2(D))  # (float64: 128 spills on sm_80)
    return dict(BLOCK_R=16, BLOCK_D=block_d, num_warps=4, num_stages=2)


@triton_op("triton_unit_grad", mutates_args=("grad",))
def triton_unit_grad(grad: torch.Tensor, x: torch.Tensor, norm: torch.Tensor) -> None:
    """grad (compute dtype, contiguous, x's shape) <- the gradient with respect to the raw x of a loss
    whose gradient with respect to x / max(|x|, eps) is grad; x is [R, D] or [V, T, D]."""
    D = x.shape[-1]
    if x.dim() == 2:
        R, T, so, si, sd = x.shape[0], 1, x.stride(0), 0, x.stride(1)
    else:
        R, T, so, si, sd = x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1), x.stride(2)
    cfg = unit_config(D, x.dtype)
    launch(unit_grad_kernel, (triton.cdiv(R, cfg["BLOCK_R"]),), grad, x, norm, R, D, T, so, si, sd, **cfg)


@triton_op("triton_select_frames")
def triton_select_frames(frames: torch.Tensor, text: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    B, T, D = frames.shape
    idx = torch.empty((B, k), device=frames.device, dtype=torch.int64)
    m, has_mask = _mask_arg(mask, idx)
    kernel, cfg = configured(select_frames_kernel, select_candidates(D, T, dtype=frames.dtype),
                             ["B", "T", "D", "k", "HAS_MASK"])
    launch(kernel, lambda c: (triton.cdiv(B, c["BLOCK_B"]),),
           frames, text, m, idx, B, T, D, k,
           frames.stride(0), frames.stride(1), frames.stride(2), text.stride(0), text.stride(1),
           HAS_MASK=has_mask, **cfg)
    return idx.sort(dim=1).values
