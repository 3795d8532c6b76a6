"""What every Triton kernel module shares: the registration of launchers as torch custom ops,
the block-configuration dispatcher, the tile product, input precision and small configurations.

On CUDA every launcher is a `torch.library.triton_op` whose kernels are launched through
`wrap_triton`: torch.compile sees the kernels themselves (no graph break, Inductor schedules them)
and the fake implementation is the launcher traced on fake tensors (allocations only).

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors: the CI machine has no GPU),
wrap_triton cannot trace interpreted kernels, so the launchers become plain opaque
`torch.library.custom_op`s instead, with the same schema; their fake implementation runs the
launcher with kernel launches skipped. opcheck and torch.compile(fullgraph=True) then exercise
the same schemas, fake implementations and autograd plumbing on the CPU.

Block configurations: each launcher has a list of candidates, known good first. By default the
first is launched (no timing, no device query). With FITCLIP_TRITON_AUTOTUNE=1 the launcher goes
through a `triton.autotune` over all candidates instead: each distinct shape key is timed once
per process and the fastest kept (outputs that kernels accumulate into are restored between
timings). Graphs traced by torch.compile always use the default.
"""
from __future__ import annotations

import functools
import os
import threading

import torch
import triton
import triton.language as tl

from . import interpreting

_state = threading.local()
TUNERS: dict = {}  # (kernel, site, candidates, key, restore) -> triton.autotune, per process


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) through wrap_triton (skipped while computing fake outputs
    under the interpreter, where the kernel cannot see fake tensors)."""
    if getattr(_state, "skip", False):
        return
    if interpreting():  # an opaque op: nothing to trace, and torch < 2.12's wrap_triton rejects interpreted kernels
        kernel[grid](*args, **kwargs)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def triton_op(name: str, mutates_args=()):
    """Decorator: the launcher `fn` as the custom op fitclip_ext::<name> (fn must be named `name`)."""
    qualname = "fitclip_ext::" + name

    def dec(fn):
        if fn.__name__ != name:  # (one name per launcher: grep finds the op from the function and back)
            raise NameError(f"launcher {fn.__name__} registered as {name}: name them alike")
        if not interpreting():
            return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)

        @functools.wraps(fn)
        def fake(*args, **kwargs):
            _state.skip = True
            try:
                return fn(*args, **kwargs)
            finally:
                _state.skip = False

        op.register_fake(fake)
        return op

    return dec


def autotuning() -> bool:
    return os.environ.get("FITCLIP_TRITON_AUTOTUNE", "0") not in ("", "0")


def _do_bench(kernel_call, quantiles):
    """The autotuner's timer: CUDA events on a GPU; the wall clock under the interpreter."""
    if interpreting():
        import time

        t0 = time.perf_counter()
        kernel_call()
        ms = (time.perf_counter() - t0) * 1e3
        return [ms] * len(quantiles)
    import triton.testing

    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


def configured(kernel, candidates: list[dict], key: list[str], restore_value: tuple[str, ...] = (), site: str = ""):
    """(kernel to launch, its block configuration as launch keywords) for a candidate list whose
    first entry is the default: the plain kernel and the default, or under
    FITCLIP_TRITON_AUTOTUNE=1 a triton.autotune over every candidate (keyed on `key` and the
    tensor dtypes) and no keywords, one per launch site (its configs_timings then belong to that
    site's latest shape). Grids must then be functions of the configuration."""
    if len(candidates) == 1 or not autotuning() or _tracing():
        return kernel, dict(candidates[0])
    ident = (kernel, site, tuple(tuple(sorted(c.items())) for c in candidates), tuple(key), tuple(restore_value))
    tuner = TUNERS.get(ident)
    if tuner is None:
        configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in candidates]
        tuner = triton.autotune(configs, key=list(key), restore_value=list(restore_value), do_bench=_do_bench)(kernel)
        TUNERS[ident] = tuner
    return tuner, {}


# ----------------------------------------------------------------------------- tiles and configurations

@triton.jit
def acc_zeros(operand_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A zero [BLOCK_M, BLOCK_N] accumulator for tile products of operand_ptr's dtype: float64 for
    float64 operands (tl.dot then runs in float64), float32 for every other dtype."""
    if operand_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    return acc


@triton.jit
def tile_product(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_an, stride_ad, stride_bn, stride_bd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A[rows] @ B[cols]^T, float32 accumulate (float64 for float64 operands), streamed and
    pipelined (`stream_tile`); rows and columns out of range load a row of their range
    (`safe_index`): the caller masks their products."""
    return stream_tile(a_ptr, b_ptr, safe_index(rows, row_ok) * stride_an, safe_index(cols, col_ok) * stride_bn, D,
                       stride_ad, stride_bd, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)


@triton.jit
def safe_index(idx, ok):
    """idx where ok, else the first index where ok (the block's first: in range whenever any is):
    out-of-range rows of a streamed tile load a row of the same range instead of being masked
    (no per-element mask, and the offsets keep the divisibility the pipeliner's asynchronous
    copies need when multiplied by a stride afterwards). Their products are masked in the
    epilogues; a non-finite input then reaches only entries that a real one of the same range
    makes non-finite too."""
    return tl.where(ok, idx, tl.min(idx, 0))


@triton.jit
def stream_tile(a_ptr, b_ptr, a_off, b_off, D, stride_ad, stride_bd, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A[a rows] @ B[b rows]^T for the rows at element offsets a_off [BLOCK_M], b_off [BLOCK_N]
    (int64; out-of-range rows pointed at a valid row by the caller, their products masked in its
    epilogue), both operands streamed over D in BLOCK_K steps: the loop the pipeliner turns into
    num_stages asynchronous copies (cp.async) in flight ahead of the tensor-core product. Only the
    feature tail is masked (no row or column masks), which keeps the address tensors small (no
    spills at 128 x 128 tiles with 8 warps); the addresses are recomputed from d0 each step
    (pointers carried through the loop instead left no warpgroup MMA group in flight on sm_90).
    float32 accumulation (float64 for float64 operands)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = acc_zeros(a_ptr, BLOCK_M, BLOCK_N)
    for d0 in range(0, D, BLOCK_K):
        dk = d0 + offs_k
        a = tl.load(a_ptr + a_off[:, None] + dk[None, :] * stride_ad, mask=dk[None, :] < D, other=0.0)
        b = tl.load(b_ptr + b_off[None, :] + dk[:, None] * stride_bd, mask=dk[:, None] < D, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def work_item(item, splits, row0, row_end, BLOCK_M: tl.constexpr):
    """A persistent gradient kernel's work item `item` as (row block, column range, its rows,
    which rows are in range): items run row block by row block, `splits` ranges each."""
    pid_b = (item // splits).to(tl.int64)
    rows = row0 + pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_b, (item % splits).to(tl.int64), rows, rows < row_end


@triton.jit
def store_grad_tile(g, s, rows, cols, row_ok, col_ok, row0, col0, g_ptr, stride_g):
    """The gradient kernels' tile epilogue: zeroes G outside the range, stores the whole tile at
    (rows - row0, cols - col0) of G (row stride stride_g; the launcher pads G to whole tiles, so
    the store needs no mask) in G's dtype, and returns the tile's row sums of G S (the scale's
    gradient partials)."""
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    tl.store(g_ptr + (rows - row0)[:, None] * stride_g + (cols - col0)[None, :], g.to(g_ptr.dtype.element_ty))
    return tl.sum(g * s, 1)


def tf32_enabled() -> bool:
    """Whether torch multiplies float32 CUDA matrices in TF32: the newer fp32_precision setting
    (torch >= 2.9) where the user set it (on cuda.matmul, else the global one), else the legacy
    allow_tf32 flag (which raises on torch >= 2.9 when read after fp32_precision was set)."""
    for holder in (torch.backends.cuda.matmul, torch.backends):
        prec = getattr(holder, "fp32_precision", None)
        if prec not in (None, "none"):
            return prec == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def set_tf32(enabled: bool) -> None:
    """Sets torch's float32 CUDA matmul precision through the API this torch has."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's float32 matmul setting; half types run on tensor cores anyway;
    float64 is always IEEE."""
    if dtype == torch.float32 and not interpreting() and tf32_enabled():
        return "tf32"
    return "ieee"


def small_configs(small: bool | None) -> bool:
    """The minimum tl.dot tiles: when `small` says so, else with FITCLIP_TRITON_CONFIG=small, or
    under the interpreter unless FITCLIP_TRITON_CONFIG=gpu (the block configurations an H100
    launches, also under the interpreter: for the tests that count FLOPs and bytes and for bf16
    numerics at the GPU's tile sizes)."""
    if small is not None:
        return small
    mode = os.environ.get("FITCLIP_TRITON_CONFIG", "")
    if mode == "gpu":
        return False
    return interpreting() or mode == "small"


def block_config(bm, bn, bk, warps, stages, **extra) -> dict:
    """A tile configuration as launch keywords (BLOCK_M/N/K, extras, num_warps, num_stages)."""
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra, num_warps=warps, num_stages=stages)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute and accumulate in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_scalars(values, like: torch.Tensor) -> torch.Tensor:
    """Python numbers as a [len(values)] device tensor of `like`'s compute dtype, made by fill
    kernels (no host copy, no sync): what a kernel reads where a float argument (always float32 in
    Triton's signature) would round a float64 value."""
    ct = compute_dtype(like.dtype)
    return torch.stack([torch.full((), float(v), dtype=ct, device=like.device) for v in values])


def scale_tensor(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A logit scale as the [1] device tensor of `like`'s compute dtype that the kernels read (a
    device-side cast: the public ops made it on the device, no host copy). The kernels take their
    compute dtype from this pointer."""
    return scale.detach().to(device=like.device, dtype=compute_dtype(like.dtype)).reshape(1)


# Every torch matrix product of the kernels' launchers goes through mm32 and addmm32_.

def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in the compute dtype (float32 with float32 accumulation; float64 for float64): cuBLAS
    with a float32 output for half inputs on CUDA; under the interpreter the same operands upcast
    on the CPU."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


ADDMM_SLICE_BYTES = 16 << 20  # the traced accumulation's temporary


def addmm32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in the compute dtype, float32 accumulation for half inputs: cuBLAS with
    beta = 1 when run eagerly on CUDA. Traced (torch.compile, opcheck, fake tensors), torch 2.11's
    fake addmm with out_dtype binds out_dtype to beta and fails, so the product goes through
    mm(out_dtype=float32), which traces on every torch, in row slices of acc (a temporary of at
    most 16 MB)."""
    if a.dtype in (torch.float32, torch.float64):
        acc.addmm_(a, b)
    elif a.is_cuda and not _tracing():
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.is_cuda:
        step = max(1, ADDMM_SLICE_BYTES // (4 * max(1, acc.shape[1])))
        for r0 in range(0, acc.shape[0], step):
            acc[r0:r0 + step] += torch.mm(a[r0:r0 + step], b, out_dtype=torch.float32)
    else:
        acc.addmm_(a.float(), b.float())


# ----------------------------------------------------------------------------- launch geometry
# (shared by the InfoNCE and distillation launchers)

def arch_of(device: torch.device) -> int:
    """Compute capability as 10 * major + minor (90 under the interpreter)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the device's (a host-side property, no sync); under the
    interpreter FITCLIP_TRITON_SMS (default 132, an H100's, with FITCLIP_TRITON_CONFIG=gpu; else 1)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    default = "132" if os.environ.get("FITCLIP_TRITON_CONFIG") == "gpu" else "1"
    return int(os.environ.get("FITCLIP_TRITON_SMS", default))


MIN_SPLIT_COLS = 512
MIN_GRAD_COLS = 128  # the gradient kernels' (no partials to merge but a row's ds sum): finer work items


def column_split(m: int, row_blocks: int, block_n: int, sms: int, min_cols: int = MIN_SPLIT_COLS,
                 ctas_per_sm: int = 1) -> tuple[int, int]:
    """(columns per program, programs per row block): the split of the m columns whose grid of
    row_blocks x split programs finishes first on sms x ctas_per_sm slots, by the wave model
    (waves x columns per program; a second wave under half full costs as much as a full one),
    keeping at least min_cols columns per program (fewer partials to merge): among the splits whose
    last wave is at least 90% full (one wave that fills 90% of the slots counts), the fastest
    within 3% with the fewest programs. Columns per program are a multiple of block_n. Rounding the split up to
    cover the SMs once, as before, gave 192 programs on 132 SMs at B = 8192 and 32768 (two waves,
    the second under half full); this gives 128 (one wave, 97% full)."""
    slots = max(1, sms * ctas_per_sm)
    rb = max(row_blocks, 1)
    plans = {}
    for s in range(1, max(1, m // max(min_cols, 1)) + 1):
        per = -(-(-(-m // s)) // block_n) * block_n
        split = -(-m // per)
        n_waves, last = waves(rb * split, slots)
        full = last >= 0.9 or (n_waves == 1 and rb * split >= 0.9 * slots)
        plans.setdefault(split, (n_waves * per, per, full))
    # the plans whose last wave is at least 90% full (if any), the fastest by the wave model
    # within 3%, and of those the fewest programs (more columns each: more reuse, fewer partials)
    pool = {k: v for k, v in plans.items() if v[2]} or plans
    fastest = min(v[0] for v in pool.values())
    split = min(k for k, v in pool.items() if v[0] <= 1.03 * fastest)
    return pool[split][1], split


def persistent_grid(items: int, device: torch.device, ctas_per_sm: int = 1) -> int:
    """Programs of a persistent launch over `items` work items: one per slot (SMs x CTAs per SM),
    or fewer where there are fewer items. Program q takes items q, q + programs, ...; the work
    is then spread to within one item per program however the item count falls on the SMs."""
    return max(1, min(items, num_sms(device) * ctas_per_sm))


def waves(programs: int, sms: int, ctas_per_sm: int = 1) -> tuple[int, float]:
    """(waves, fill of the last wave) of a grid of `programs` on sms x ctas_per_sm slots."""
    slots = max(1, sms * ctas_per_sm)
    full, rest = divmod(programs, slots)
    return full + (rest > 0), (rest / slots if rest else 1.0)


def backward_plan(n: int, m: int, D: int, itemsize: int, block_m: int, block_n: int, sms: int
                  ) -> tuple[int, int, int, int, int]:
    """The chunked backward's launch plan (see chunked_backward): (columns per slab, rows per
    chunk, row blocks per chunk, columns per work item, work items per row block). The slab is
    as wide as its float32 dB accumulator allows within DB_SLAB_BYTES (meant to stay in L2), the
    chunk as tall as G [rows, slab] allows within G_BYTES (FITCLIP_GPU_BLOCK_ELEMS overrides G's
    elements); both multiples of the blocks. The gradient kernel is persistent (one program per
    SM), so its work items only need to spread evenly: the split of the slab's columns is
    column_split's (wave model: items over the SMs' slots)."""
    env = chunk_elems()
    widest = max(block_n, DB_SLAB_BYTES // (4 * max(D, 1)) // block_n * block_n)
    slabs = -(-m // widest)  # as few slabs as the budget allows, of even widths
    slab = min(m, -(-(-(-m // slabs)) // block_n) * block_n)
    elems = env or G_BYTES // itemsize
    rows_c = min(n, max(block_m, elems // slab // block_m * block_m))
    blocks = -(-rows_c // block_m)
    per, split = column_split(slab, blocks, block_n, sms, min_cols=MIN_GRAD_COLS)
    return slab, rows_c, blocks, per, split


def chunk_elems() -> int:
    """Elements of one chunk's [rows, m] buffer: FITCLIP_GPU_BLOCK_ELEMS (0 or unset: the default
    of the caller)."""
    return int(os.environ.get("FITCLIP_GPU_BLOCK_ELEMS", "0") or 0)


MEMORY_BUDGET = 64 << 20  # bytes above inputs and gradients the chunked backward stays within (B <= 32768, D = 512)
DB_SLAB_BYTES = 16 << 20  # the float32 dB accumulator of one column slab: read and rewritten in L2 (50 MB on an H100)
G_BYTES = 12 << 20  # one G chunk: written by the kernel, read back by cuBLAS from L2


def padded_g(rows_c: int, slab: int, block_m: int, block_n: int) -> tuple[int, int]:
    """The G chunk's shape padded to whole tiles (rows to block_m, columns to block_n): the
    gradient kernels store every tile whole, without a mask, and cuBLAS reads the unpadded view."""
    return -(-rows_c // block_m) * block_m, -(-slab // block_n) * block_n


def backward_extra_bytes(n: int, m: int, D: int, itemsize: int, block_m: int, block_n: int, sms: int) -> int:
    """Bytes the chunked backward allocates above its inputs and gradients: the float32 dA
    accumulator's excess over the gradient (none for float32 inputs), the dB slab accumulator,
    the padded G chunk, a slab's ds partials and their running sum."""
    slab, rows_c, _, _, split = backward_plan(n, m, D, itemsize, block_m, block_n, sms)
    acc = n * D * (4 - itemsize) if itemsize < 4 else 0
    pad_rows, pad_cols = padded_g(rows_c, slab, block_m, block_n)
    g = pad_rows * pad_cols * itemsize
    return acc + (slab * D * 4 if itemsize < 4 else 0) + g + split * n * 4 + n * 4


def chunk_rows(n: int, m: int, block_m: int, elems: int) -> int:
    """Rows per chunk: a multiple of block_m with rows * m <= elems (at least block_m), at most n."""
    return min(n, max(block_m, (elems // max(m, 1)) // block_m * block_m))


# float16 has 5 exponent bits: the logit gradient's O(1) entries (after division by the largest
# upstream weight) are scaled by 2^14 before rounding, so entries down to about 4e-12 stay
# representable (6e-8 / 2^14) instead of flushing to zero below 6e-8 (softmax entries at
# B = 32768 are mostly 1e-9 to 1e-5). |G| <= 2 before the scale: 32768 < float16's 65504.
G_SCALE = {torch.float16: 2.0 ** 14}


def chunked_backward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, weights, block_m: int, block_n: int,
                     tile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward the InfoNCE and distillation launchers share, for logits s * A B^T with upstream
    weights `weights` (vectors in the compute dtype), at the FLOP floor (each logit gradient
    computed once): for each slab of columns [c0, c1), for each chunk of rows [r0, r1),
    `tile(g, ds_part, inv_w, r0, r1, c0, c1, per, split)` launches the kernel that writes the
    block's logit gradient G times inv_w = g_scale / the largest weight (O(1) entries, and 2^14
    times that for float16: nothing underflows) and per-row partials ds_part[split, n] of
    sum_j (inv_w G)_ij S_ij; cuBLAS then adds G_c B_slab to the chunk's rows of dA and
    G_c^T A_c to the slab's dB. Both accumulate in the compute dtype (float32; float64 for
    float64 inputs) and are rounded once into the gradient.

    Where the accumulators live (the traffic `python -m fitclip_ext.kernels.model` counts):
    the slab's dB accumulator [slab, D] (16 MB: 8192 columns at D = 512) is read and rewritten
    once per chunk but stays in L2, and is written to dB once, when its slab is done; dA's float32
    accumulator is read and rewritten from HBM once per slab (m / slab times: 4 at B = 32768,
    8 bytes n D each, 0.5 GB in all), each chunk's rows while they are hot. The G chunk (12 MB)
    goes from the kernel to cuBLAS through L2. A single pass over row chunks instead would
    re-read a 64 MB dB accumulator from HBM for each of its 86 chunks (11 GB); writing each
    gradient once by recomputing S for a pass over columns would cost 2 n m D more FLOPs.
    Returns (dA, dB in the inputs' dtype, d scale [] in the compute dtype)."""
    n, D = a.shape
    m = b.shape[0]
    dev = a.device
    ct = compute_dtype(a.dtype)
    w_max = torch.stack([w.abs().amax() for w in weights]).amax()
    w_max = torch.where(w_max > 0, w_max, torch.ones_like(w_max)).reshape(1).to(ct)
    g_scale = G_SCALE.get(a.dtype, 1.0)
    slab, rows_c, _, per, split = backward_plan(n, m, D, a.element_size(), block_m, block_n, num_sms(dev))
    da = torch.zeros((n, D), device=dev, dtype=ct)  # (the gradient itself for float32/float64 inputs)
    db = torch.empty((m, D), device=dev, dtype=b.dtype)
    db_slab = torch.empty((slab, D), device=dev, dtype=ct) if b.dtype != ct else None
    ds_part = torch.empty((split, n), device=dev, dtype=ct)
    ds = torch.zeros((n,), device=dev, dtype=ct)
    G = torch.empty(padded_g(rows_c, slab, block_m, block_n), device=dev, dtype=a.dtype)
    inv_w = g_scale / w_max
    factor = scale * (w_max / g_scale)
    for c0 in range(0, m, slab):
        c1 = min(m, c0 + slab)
        acc = db[c0:c1] if db_slab is None else db_slab[:c1 - c0]
        acc.zero_()
        for r0 in range(0, n, rows_c):
            r1 = min(n, r0 + rows_c)
            tile(G, ds_part, inv_w, r0, r1, c0, c1, per, split)
            g = G[:r1 - r0, :c1 - c0]
            addmm32_(da[r0:r1], g, b[c0:c1])
            addmm32_(acc, g.t(), a[r0:r1])
        acc.mul_(factor)
        if db_slab is not None:
            db[c0:c1] = acc
        ds += ds_part.sum(0)  # (slab by slab, in a fixed order)
    del G
    da = da.mul_(factor)
    return (da.to(a.dtype) if a.dtype != ct else da), db, ds.sum() * (w_max / g_scale).reshape(())
