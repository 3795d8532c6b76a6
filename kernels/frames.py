"""Triton kernels of the frame ops: caption-frame cosine similarity fused with top-k selection.

`topk_sim_fwd_kernel` (grid: caption blocks x video blocks): for each frame t, one tile product
text[c-block] @ frames[v-block, t]^T gives [BLOCK_C, BLOCK_V] similarities; a running top-k per
(caption, video) pair lives in registers as [BLOCK_C, BLOCK_V, K_PAD] (insert by evicting the
smallest kept value, the latest frame among equal ones, so ties keep the earlier frame). Writes
the pooled mean [C, V] and the chosen frames as bit sets [C, V, ceil(T / 32)] (int32, bit t % 32
of word t // 32: the format the C++ backend uses too) for the backward.

Backward (no recomputation, the chosen frames are saved as bits):
`topk_sim_dtext_kernel` (grid: caption blocks x D chunks) accumulates, for each video block and
frame t, W_t @ frames[v-block, t, D chunk] with W_t[c, v] = grad[c, v] / k * [t chosen for (c, v)];
`topk_sim_dframes_kernel` (grid: video blocks x frames x D chunks) accumulates W_t^T @ text.
Both round W / max|grad| to the inputs' dtype (O(1) entries: no float16 underflow however small
the upstream gradient) and put max|grad| back in float32. The forward launches past 65535 video
blocks (the grid's y limit, about a million videos) in slices of the y axis.

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

from .common import configured, input_precision, launch, small_configs, triton_op

EPS = tl.constexpr(1e-12)  # F.normalize's clamp of the norm
GRID_Y_MAX = 65535  # CUDA's limit on a grid's y and z dimensions


@triton.jit
def _topk_insert(best, best_idx, x, t, slot_ok):
    """Inserts x [BC, BV] (frame t) into the running top-k (best, best_idx [BC, BV, KP])."""
    cur_min = tl.min(tl.where(slot_ok, best, float("inf")), 2)
    is_min = (best == cur_min[:, :, None]) & slot_ok
    evict = tl.max(tl.where(is_min, best_idx, -2147483647), 2)  # the latest frame among ties
    take = x > cur_min  # strict: an equal later frame does not displace an earlier one
    replace = take[:, :, None] & (best_idx == evict[:, :, None]) & slot_ok
    best = tl.where(replace, x[:, :, None], best)
    best_idx = tl.where(replace, t, best_idx)
    return best, best_idx


@triton.jit
def topk_sim_fwd_kernel(
    text_ptr, frames_ptr, mask_ptr, sim_ptr, bits_ptr, text_norm_ptr, frames_norm_ptr,
    C, V, T, D, k, v_block0,
    stride_tc, stride_td, stride_fv, stride_ft, stride_fd,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr,
    N_WORDS: tl.constexpr, HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64) + v_block0  # (the grid's y axis stops at 65535: launched in slices)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    c_ok = rc < C
    v_ok = rv < V
    offs_k = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, K_PAD)
    slot_ok = (slots < k)[None, None, :]
    # Free slots start at -inf with distinct negative indices so they fill in slot order.
    best = tl.full((BLOCK_C, BLOCK_V, K_PAD), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_C, BLOCK_V, K_PAD), tl.int32) - 1 - slots[None, None, :]
    nan_seen = tl.zeros((BLOCK_C, BLOCK_V), tl.int32)
    if NORMALIZE:  # cosine of the raw rows: divide by max(norm, eps) as F.normalize does
        inv_c = 1.0 / tl.maximum(tl.load(text_norm_ptr + rc, mask=c_ok, other=1.0), EPS)
    for t in range(0, T):
        s = tl.zeros((BLOCK_C, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_K):
            dk = d0 + offs_k
            a = tl.load(text_ptr + rc[:, None] * stride_tc + dk[None, :] * stride_td,
                        mask=c_ok[:, None] & (dk[None, :] < D), other=0.0)
            b = tl.load(frames_ptr + rv[None, :] * stride_fv + t * stride_ft + dk[:, None] * stride_fd,
                        mask=v_ok[None, :] & (dk[:, None] < D), other=0.0)
            s = tl.dot(a, b, s, input_precision=INPUT_PRECISION)
        if NORMALIZE:
            inv_v = 1.0 / tl.maximum(tl.load(frames_norm_ptr + rv * T + t, mask=v_ok, other=1.0), EPS)
            s = s * inv_c[:, None] * inv_v[None, :]
        if HAS_MASK:
            real = tl.load(mask_ptr + rv * T + t, mask=v_ok, other=0).to(tl.int1)
            s = tl.where(real[None, :], s, float("-inf"))
        nan_seen = nan_seen | (s != s).to(tl.int32)
        best, best_idx = _topk_insert(best, best_idx, s, t, slot_ok)
    total = tl.sum(tl.where(slot_ok, best, 0.0), 2) / k
    total = tl.where(nan_seen != 0, float("nan"), total)
    out_ok = c_ok[:, None] & v_ok[None, :]
    tl.store(sim_ptr + rc[:, None] * V + rv[None, :], total, mask=out_ok)
    # The chosen frames as bit sets, one int32 word per 32 frames: [C, V, N_WORDS].
    for w in tl.static_range(N_WORDS):
        in_word = slot_ok & (best_idx >= 32 * w) & (best_idx < 32 * w + 32)
        word = tl.sum(tl.where(in_word, 1 << (best_idx - 32 * w), 0), 2)  # distinct bits: sum == or
        tl.store(bits_ptr + (rc[:, None] * V + rv[None, :]) * N_WORDS + w, word, mask=out_ok)


@triton.jit
def topk_sim_dtext_kernel(
    grad_ptr, gscale_ptr, bits_ptr, frames_ptr, out_ptr, frames_norm_ptr,
    C, V, T, D, k,
    stride_fv, stride_ft, stride_fd,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DO: tl.constexpr, N_WORDS: tl.constexpr,
    NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    acc = tl.zeros((BLOCK_C, BLOCK_DO), tl.float32)
    inv_g = tl.load(gscale_ptr) / k  # weights / max|grad|: O(1), no float16 underflow
    for v0 in range(0, V, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64: row * stride may pass 2^31
        v_ok = rv < V
        ok = c_ok[:, None] & v_ok[None, :]
        g = tl.load(grad_ptr + rc[:, None] * V + rv[None, :], mask=ok, other=0.0) * inv_g
        pair = (rc[:, None] * V + rv[None, :]) * N_WORDS
        for t in range(0, T):
            word = tl.load(bits_ptr + pair + t // 32, mask=ok, other=0)
            w = tl.where(((word >> (t % 32)) & 1) != 0, g, 0.0)
            if NORMALIZE:  # W @ unit frames = (W / frame norms) @ raw frames
                w = w / tl.maximum(tl.load(frames_norm_ptr + rv * T + t, mask=v_ok, other=1.0), EPS)[None, :]
            f = tl.load(frames_ptr + rv[:, None] * stride_fv + t * stride_ft + do[None, :] * stride_fd,
                        mask=v_ok[:, None] & do_ok[None, :], other=0.0)
            acc = tl.dot(w.to(f.dtype), f, acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + rc[:, None] * D + do[None, :], acc * tl.load(gscale_ptr + 1), mask=c_ok[:, None] & do_ok[None, :])


@triton.jit
def topk_sim_dframes_kernel(
    grad_ptr, gscale_ptr, bits_ptr, text_ptr, out_ptr, text_norm_ptr,
    C, V, T, D, k,
    stride_tc, stride_td,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DO: tl.constexpr, N_WORDS: tl.constexpr,
    ACCUMULATE: tl.constexpr, NORMALIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    pid_d = tl.program_id(2).to(tl.int64)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = rv < V
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    acc = tl.zeros((BLOCK_V, BLOCK_DO), tl.float32)
    inv_g = tl.load(gscale_ptr) / k  # weights / max|grad|, as in topk_sim_dtext_kernel
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C).to(tl.int64)  # int64: C * V may pass 2^31
        c_ok = rc < C
        ok = v_ok[:, None] & c_ok[None, :]  # [BV, BC]: transposed tiles
        g = tl.load(grad_ptr + rc[None, :] * V + rv[:, None], mask=ok, other=0.0) * inv_g
        word = tl.load(bits_ptr + (rc[None, :] * V + rv[:, None]) * N_WORDS + t // 32, mask=ok, other=0)
        w = tl.where(((word >> (t % 32)) & 1) != 0, g, 0.0)
        if NORMALIZE:  # W^T @ unit captions = (W / caption norms)^T @ raw captions
            w = w / tl.maximum(tl.load(text_norm_ptr + rc, mask=c_ok, other=1.0), EPS)[None, :]
        x = tl.load(text_ptr + rc[:, None] * stride_tc + do[None, :] * stride_td,
                    mask=c_ok[:, None] & do_ok[None, :], other=0.0)
        acc = tl.dot(w.to(x.dtype), x, acc, input_precision=INPUT_PRECISION)
    acc = acc * tl.load(gscale_ptr + 1)
    out_off = (rv[:, None] * T + t) * D + do[None, :]
    out_ok = v_ok[:, None] & do_ok[None, :]
    if ACCUMULATE:  # one program owns each output element: a plain read-add-write
        acc += tl.load(out_ptr + out_off, mask=out_ok, other=0.0)
    tl.store(out_ptr + out_off, acc, mask=out_ok)


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
    dot = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs
        m2 = r_ok[:, None] & (dd[None, :] < D)
        g = tl.load(g_ptr + rr[:, None] * D + dd[None, :], mask=m2, other=0.0)
        x = tl.load(x_ptr + x_row[:, None] + dd[None, :] * stride_xd, mask=m2, other=0.0).to(tl.float32)
        dot += tl.sum(g * x, 1)
    coef = tl.where(nrm > EPS, dot * inv * inv, 0.0)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs
        m2 = r_ok[:, None] & (dd[None, :] < D)
        g = tl.load(g_ptr + rr[:, None] * D + dd[None, :], mask=m2, other=0.0)
        x = tl.load(x_ptr + x_row[:, None] + dd[None, :] * stride_xd, mask=m2, other=0.0).to(tl.float32)
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
    dot = tl.zeros((BLOCK_B, T_PAD), tl.float32)
    sq = tl.zeros((BLOCK_B, T_PAD), tl.float32)
    bt_ok = b_ok[:, None] & t_ok[None, :]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        x = tl.load(text_ptr + rb[:, None] * stride_tb + dd[None, :] * stride_td,
                    mask=b_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        f = tl.load(frames_ptr + rb[:, None, None] * stride_fb + offs_t[None, :, None] * stride_ft
                    + dd[None, None, :] * stride_fd, mask=bt_ok[:, :, None] & d_ok[None, None, :],
                    other=0.0).to(tl.float32)
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


def sim_candidates(dtype, k: int, T: int = 32, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """The similarity forward's block configurations, known good first (the default; the others
    are timed only under FITCLIP_TRITON_AUTOTUNE=1). The running top-k holds
    2 * BLOCK_C * BLOCK_V * K_PAD values per program in registers: tiles shrink as k grows so it
    stays near 64 registers a thread. Every candidate compiles without spills with Triton 3.6
    and 3.8 (see aot)."""
    k_pad = triton.next_power_of_2(k)
    block_k = 64 if dtype != torch.float32 else 32
    words = n_words(T)
    if small_configs(small):
        return [dict(BLOCK_C=16, BLOCK_V=16, BLOCK_K=16, K_PAD=k_pad, N_WORDS=words, num_warps=1, num_stages=1),
                dict(BLOCK_C=16, BLOCK_V=32, BLOCK_K=16, K_PAD=k_pad, N_WORDS=words, num_warps=1, num_stages=1)]
    fp32 = dtype == torch.float32
    fma = fp32 and (precision or input_precision(dtype)) == "ieee"  # CUDA-core dot: registers are tighter
    if fma:
        bc, bv, warps = (16, 16, 4) if k_pad <= 16 else (16, 16, 8)
    elif k_pad <= 2 and not fp32:
        bc, bv, warps = 64, 32, 8
    elif k_pad <= 4:
        bc, bv, warps = 32, 32, 8
    elif k_pad <= 8:
        bc, bv, warps = 32, 16, 8
    else:
        bc, bv, warps = 16, 16, 8

    def cfg(c, v, w, st, bk=block_k):
        return dict(BLOCK_C=c, BLOCK_V=v, BLOCK_K=bk, K_PAD=k_pad, N_WORDS=words, num_warps=w, num_stages=st)

    out = [cfg(bc, bv, warps, 2)]
    if fma:
        return out
    # the variants that spill somewhere (sm_80 or sm_90, Triton 3.6 or 3.8) are left out
    if k_pad != 4:
        out.append(cfg(bc, bv, warps, 3))
    if k_pad != 8 and not fp32:
        out.append(cfg(bc, bv, warps, 2, 2 * block_k))
    if bv >= 32 and not (fp32 and k_pad <= 2):
        out.append(cfg(bc, bv // 2, 4, 3))
    if bc >= 32 and k_pad >= 4:
        out.append(cfg(bc // 2, bv, 4, 3))
    return out


def grad_candidates(dtype, T: int = 32, small: bool | None = None, precision: str | None = None) -> list[dict]:
    """The similarity backward's block configurations (d text and d frames kernels), default first."""
    words = n_words(T)

    def cfg(c, v, do, w, st):
        return dict(BLOCK_C=c, BLOCK_V=v, BLOCK_DO=do, N_WORDS=words, num_warps=w, num_stages=st)

    if small_configs(small):
        return [cfg(16, 16, 16, 1, 1), cfg(16, 32, 32, 1, 1)]
    if dtype == torch.float32 and (precision or input_precision(dtype)) == "ieee":
        return [cfg(32, 16, 64, 4, 2)]
    out = [cfg(64, 32, 128, 8, 2), cfg(64, 32, 128, 8, 3), cfg(64, 32, 64, 8, 3)]
    if dtype != torch.float32:  # (the TF32 build of this one spills)
        out.append(cfg(64, 32, 64, 4, 3))
    return out


def select_candidates(D: int, T: int, small: bool | None = None) -> list[dict]:
    """select_frames' block configurations (memory-bound: one read of the frames), default first:
    [BLOCK_B, T_PAD, BLOCK_D] frame chunks of about 4096 elements in flight per program (no spills,
    `python -m fitclip_ext.kernels.aot`)."""
    t_pad = triton.next_power_of_2(T)
    if small_configs(small):
        return [dict(BLOCK_B=4, BLOCK_D=16, T_PAD=t_pad, num_warps=1, num_stages=1),
                dict(BLOCK_B=2, BLOCK_D=16, T_PAD=t_pad, num_warps=1, num_stages=1)]
    block_d = min(128, triton.next_power_of_2(D))
    block_b = max(1, 4096 // (t_pad * block_d))

    def cfg(b, w, st):
        return dict(BLOCK_B=b, BLOCK_D=block_d, T_PAD=t_pad, num_warps=w, num_stages=st)

    return [cfg(block_b, 4, 2), cfg(block_b, 4, 3), cfg(block_b, 8, 2)]


def _mask_arg(mask, fallback):
    return (mask.to(torch.int8).contiguous(), True) if mask is not None else (fallback, False)


# The similarity ops take the raw embeddings and their row norms (text_norm [C], frames_norm
# [V, T], float32), or None for inputs that are already unit vectors; the gradient ops return the
# gradients with respect to the unit vectors, which `unit_grad` turns into the raw inputs' ones.

@triton_op("triton_topk_sim")
def _topk_sim_op(text: torch.Tensor, frames: torch.Tensor, k: int, mask: torch.Tensor | None,
                 text_norm: torch.Tensor | None = None, frames_norm: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    C, D = text.shape
    V, T, _ = frames.shape
    prec = input_precision(text.dtype)
    cands = sim_candidates(text.dtype, k, T, precision=prec)
    kernel, cfg = configured(topk_sim_fwd_kernel, cands, ["C", "V", "T", "D", "k", "HAS_MASK", "NORMALIZE",
                                                           "INPUT_PRECISION"])
    sim = torch.empty((C, V), device=text.device, dtype=torch.float32)
    bits = torch.empty((C, V, n_words(T)), device=text.device, dtype=torch.int32)
    m, has_mask = _mask_arg(mask, sim)
    normalize = text_norm is not None
    args = (text, frames, m, sim, bits, text_norm if normalize else sim, frames_norm if normalize else sim, C, V, T, D, k)
    strides = (text.stride(0), text.stride(1), frames.stride(0), frames.stride(1), frames.stride(2))
    flags = dict(HAS_MASK=has_mask, NORMALIZE=normalize, INPUT_PRECISION=prec)
    default = cands[0]
    v_blocks = triton.cdiv(V, default["BLOCK_V"])
    if v_blocks <= GRID_Y_MAX:
        launch(kernel, lambda c: (triton.cdiv(C, c["BLOCK_C"]), triton.cdiv(V, c["BLOCK_V"])), *args, 0, *strides,
               **flags, **cfg)
    else:  # past about a million videos: the y axis in slices, with the default configuration
        for b0 in range(0, v_blocks, GRID_Y_MAX):
            launch(topk_sim_fwd_kernel, (triton.cdiv(C, default["BLOCK_C"]), min(GRID_Y_MAX, v_blocks - b0)),
                   *args, b0, *strides, **flags, **default)
    return sim, bits


def grad_scale(grad: torch.Tensor) -> torch.Tensor:
    """[1 / max|grad|, max|grad|] (float32; 1 where grad is all zero): the backward kernels round
    grad / max|grad| to the inputs' dtype, so float16 weights never underflow."""
    g_max = grad.abs().amax() if grad.numel() else torch.ones((), device=grad.device)
    g_max = torch.where(g_max > 0, g_max, torch.ones_like(g_max)).float()
    return torch.stack([1.0 / g_max, g_max])


def _launch_dtext(text, frames, bits, grad, k, dtext, frames_norm, gscale):
    C, D = text.shape
    V, T, _ = frames.shape
    prec = input_precision(text.dtype)
    kernel, cfg = configured(topk_sim_dtext_kernel, grad_candidates(text.dtype, T, precision=prec),
                             ["C", "V", "T", "D", "k", "NORMALIZE", "INPUT_PRECISION"])
    launch(kernel, lambda c: (triton.cdiv(C, c["BLOCK_C"]), triton.cdiv(D, c["BLOCK_DO"])),
           grad, gscale, bits, frames, dtext, frames_norm if frames_norm is not None else grad, C, V, T, D, k,
           frames.stride(0), frames.stride(1), frames.stride(2), NORMALIZE=frames_norm is not None,
           INPUT_PRECISION=prec, **cfg)


def _launch_dframes(text, frames, bits, grad, k, dframes, accumulate, text_norm, gscale):
    C, D = text.shape
    V, T, _ = frames.shape
    prec = input_precision(text.dtype)
    # accumulating into dframes (the video loss's caption blocks): restored between timings
    kernel, cfg = configured(topk_sim_dframes_kernel, grad_candidates(text.dtype, T, precision=prec),
                             ["C", "V", "T", "D", "k", "ACCUMULATE", "NORMALIZE", "INPUT_PRECISION"],
                             restore_value=("out_ptr",) if accumulate else (), site="acc" if accumulate else "")
    launch(kernel, lambda c: (triton.cdiv(V, c["BLOCK_V"]), T, triton.cdiv(D, c["BLOCK_DO"])),
           grad, gscale, bits, text, dframes, text_norm if text_norm is not None else grad, C, V, T, D, k,
           text.stride(0), text.stride(1), ACCUMULATE=accumulate, NORMALIZE=text_norm is not None,
           INPUT_PRECISION=prec, **cfg)


@triton_op("triton_topk_sim_bwd")
def _topk_sim_bwd_op(text: torch.Tensor, frames: torch.Tensor, bits: torch.Tensor, grad: torch.Tensor, k: int,
                     text_norm: torch.Tensor | None = None, frames_norm: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.float().contiguous()
    dtext = torch.empty(text.shape, device=text.device, dtype=torch.float32)
    dframes = torch.empty(frames.shape, device=text.device, dtype=torch.float32)
    gscale = grad_scale(grad)
    _launch_dtext(text, frames, bits, grad, k, dtext, frames_norm, gscale)
    _launch_dframes(text, frames, bits, grad, k, dframes, False, text_norm, gscale)
    return dtext, dframes


@triton_op("triton_topk_sim_bwd_acc", mutates_args=("dframes_acc",))
def _topk_sim_bwd_acc_op(text: torch.Tensor, frames: torch.Tensor, bits: torch.Tensor, grad: torch.Tensor, k: int,
                         dframes_acc: torch.Tensor, text_norm: torch.Tensor | None = None,
                         frames_norm: torch.Tensor | None = None) -> torch.Tensor:
    grad = grad.float().contiguous()
    dtext = torch.empty(text.shape, device=text.device, dtype=torch.float32)
    gscale = grad_scale(grad)
    _launch_dtext(text, frames, bits, grad, k, dtext, frames_norm, gscale)
    _launch_dframes(text, frames, bits, grad, k, dframes_acc, True, text_norm, gscale)
    return dtext


def unit_config(D: int) -> dict:
    if small_configs(None):
        return dict(BLOCK_R=16, BLOCK_D=16, num_warps=1, num_stages=1)
    return dict(BLOCK_R=16, BLOCK_D=min(128, triton.next_power_of_2(D)), num_warps=4, num_stages=2)


@triton_op("triton_unit_grad", mutates_args=("grad",))
def _unit_grad_op(grad: torch.Tensor, x: torch.Tensor, norm: torch.Tensor) -> None:
    """grad (float32, contiguous, x's shape) <- the gradient with respect to the raw x of a loss
    whose gradient with respect to x / max(|x|, eps) is grad; x is [R, D] or [V, T, D]."""
    D = x.shape[-1]
    if x.dim() == 2:
        R, T, so, si, sd = x.shape[0], 1, x.stride(0), 0, x.stride(1)
    else:
        R, T, so, si, sd = x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1), x.stride(2)
    cfg = unit_config(D)
    launch(unit_grad_kernel, (triton.cdiv(R, cfg["BLOCK_R"]),), grad, x, norm, R, D, T, so, si, sd, **cfg)


@triton_op("triton_select_frames")
def _select_op(frames: torch.Tensor, text: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    B, T, D = frames.shape
    idx = torch.empty((B, k), device=frames.device, dtype=torch.int64)
    m, has_mask = _mask_arg(mask, idx)
    kernel, cfg = configured(select_frames_kernel, select_candidates(D, T), ["B", "T", "D", "k", "HAS_MASK"])
    launch(kernel, lambda c: (triton.cdiv(B, c["BLOCK_B"]),),
           frames, text, m, idx, B, T, D, k,
           frames.stride(0), frames.stride(1), frames.stride(2), text.stride(0), text.stride(1),
           HAS_MASK=has_mask, **cfg)
    return idx.sort(dim=1).values
