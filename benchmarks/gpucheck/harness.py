"""What every section of the GPU check shares: the run's settings, one time budget, the results
document (rewritten after every case and section), and the timers.

The budget is the whole script's (benchmarks/gpu_check.sh passes what is left of it): every
section and every benchmark case asks `fits(estimate)` before it starts anything, and a section
or case that does not fit is recorded as skipped with the seconds it needed and the seconds left.
A hard deadline (SIGALRM at the budget's end) stops whatever is running then: that case is
recorded as out of time, the sections after it as skipped, and the document is still finished.
"""
from __future__ import annotations

import contextlib
import json
import signal
import statistics
import time
import traceback
from pathlib import Path

import torch

TINY = False  # set by init(): CPU tensors through the Triton interpreter, tiny sizes
DEV = "cuda"
T0 = time.time()
DEADLINE = T0 + 540.0
DOC: dict = {}
PATH: Path | None = None


class OutOfTime(BaseException):
    """Raised by the deadline alarm (a BaseException: the per-case handlers, which record any
    Exception and go on, let it through to the section, which records it and stops)."""


def init(tiny: bool, budget_s: float, path: Path, doc: dict) -> None:
    global TINY, DEV, DEADLINE, DOC, PATH
    TINY, DEV = tiny, ("cpu" if tiny else "cuda")
    DEADLINE = T0 + budget_s
    DOC, PATH = doc, path
    doc.setdefault("sections", [])
    doc["budget_s"] = budget_s

    def alarm(signum, frame):
        raise OutOfTime(f"the check's budget of {budget_s:.0f} s ran out")

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, DEADLINE - time.time()))


def left() -> float:
    return DEADLINE - time.time()


def fits(estimate_s: float) -> bool:
    return left() >= estimate_s


def skip_reason(estimate_s: float) -> str:
    return f"time budget: {max(left(), 0):.0f} s left, needs about {estimate_s:.0f} s"


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def save() -> None:
    if PATH is not None:
        tmp = PATH.with_suffix(".tmp")
        tmp.write_text(json.dumps(DOC, indent=2, default=str) + "\n")
        tmp.replace(PATH)  # a run killed mid-write keeps the previous complete document


def section(name: str, estimate_s: float, fn) -> None:
    """Runs fn() as one section: skipped (with the reason) when the budget left is below its
    estimate; its status, seconds and estimate go into doc["sections"]; an error or the deadline
    is recorded, never raised (the deadline's sections after it are skipped by the budget)."""
    rec = {"section": name, "estimate_s": estimate_s}
    DOC["sections"].append(rec)
    if not fits(estimate_s):
        rec.update(status="skipped", reason=skip_reason(estimate_s))
        log(f"section {name}: skipped ({rec['reason']})")
        save()
        return
    t0 = time.time()
    log(f"section {name} (estimate {estimate_s:.0f} s, {left():.0f} s left)")
    try:
        fn()
        rec["status"] = "done"
    except OutOfTime as err:
        rec.update(status="out of time", reason=str(err))
    except Exception as err:  # a section's bug must not lose the sections after it
        traceback.print_exc()
        rec.update(status="error", reason=repr(err)[:300])
    finally:
        rec["seconds"] = round(time.time() - t0, 1)
        empty_cache()
        save()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def correctness(rows: list, what: str) -> list:
    """Appends correctness rows to the document (saved at once) and logs the failures."""
    DOC.setdefault("correctness", []).extend(rows)
    bad = [c for c in rows if not c.get("ok")]
    log(f"{what} correctness: {len(rows) - len(bad)}/{len(rows)} ok", *(f"\n  FAIL {c}" for c in bad))
    save()
    return rows


def guarded(label: dict, fn) -> list:
    """fn()'s correctness rows, or one failed row with the error (the next check still runs)."""
    try:
        return fn()
    except OutOfTime:
        raise
    except Exception as err:
        traceback.print_exc()
        return [{**label, "ok": False, "error": repr(err)[:300]}]


def run_case(case: dict, estimate_s: float, fn) -> dict:
    """One benchmark case: fn(case) fills it; skipped with the reason when it does not fit the
    budget; out of memory and any other error recorded in the case, never dropped; the document
    is rewritten after it."""
    DOC.setdefault("cases", []).append(case)
    if not fits(estimate_s):
        case["skipped"] = skip_reason(estimate_s)
    else:
        try:
            fn(case)
        except torch.OutOfMemoryError:
            case["error"] = "out of memory"
        except OutOfTime:
            case["error"] = "out of time (the check's budget ran out during this case)"
            raise
        except Exception as err:
            case["error"] = repr(err)[:300]
            traceback.print_exc()
        finally:
            empty_cache()
            log(json.dumps(case, default=str))
            save()
        return case
    log(json.dumps(case, default=str))
    save()
    return case


# ----------------------------------------------------------------------------- timing

def bench_ms(fn, big: bool = False, reps: int = 3, warm: bool = True) -> float:
    """Median milliseconds of fn: the wall clock on the CPU; on CUDA triton's do_bench (CUDA
    events), or for calls of seconds (big) a warm-up and `reps` timed calls."""
    if DEV == "cpu":
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    import triton

    if big:
        if warm:
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def peak_mb(fn) -> float | None:
    """Peak CUDA memory (MB) one call of fn allocates above what was allocated before (None on the CPU)."""
    if DEV == "cpu":
        return None
    from benchmarks.harness import cuda_peak_mb

    return cuda_peak_mb(fn)


def ceilings() -> dict:
    """The card's measured bf16 matmul rate and copy bandwidth (read + write)."""
    if DEV == "cpu":
        return {}
    import triton

    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    x = torch.empty(2**30 // 2, device=DEV, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms_copy = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=100, return_mode="median")
    return {"bf16_matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * x.numel() * 2 / ms_copy / 1e6}


def baseline(fn, run_of, big: bool, our_ms: float | None) -> dict:
    """A baseline's time, speedup over ours and peak memory, or why it could not run."""
    if fn is None:
        return {"error": "not available on this machine"}
    try:
        run = run_of(fn)
        ms = bench_ms(run, big=big)
        out = {"median_ms": ms, "peak_mb": peak_mb(run)}
        if our_ms:
            out["speedup"] = ms / our_ms
        return out
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except OutOfTime:
        raise
    except Exception as err:
        return {"error": repr(err)[:300]}
    finally:
        empty_cache()


# ----------------------------------------------------------------------------- inputs

def model_ms(op: str, B: int, D: int) -> float:
    """The per-launch model's estimate (fitclip_ext.kernels.model: bf16, forward and backward) of
    op at (B, D) on this GPU's SM count (132 without a GPU), written beside each measurement so
    the first GPU run tests the model."""
    from fitclip_ext.kernels import model

    fn = {"contrastive_loss": model.contrastive, "sigmoid_loss": model.sigmoid,
          "distillation_loss": model.distillation}[op]
    return sum(x.time() for x in fn(B, D, _model_sms())) * 1e3


def model_table() -> dict:
    """The model's whole table (B = 32768, D = 512; frame ops C = V = 8192, T = 16) for this GPU's
    SM count."""
    from fitclip_ext.kernels import model

    return model.table(sms=_model_sms())


def _model_sms() -> int:
    """The SMs the model plans for: this GPU's, or an H100's without one."""
    from fitclip_ext.kernels import model

    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else model.SMS


def dtype_name(dtype, tf32: bool = False) -> str:
    return str(dtype).replace("torch.", "") + ("/tf32" if dtype == torch.float32 and tf32 else "")


def unit(b, d, seed, dtype=torch.float32):
    """[b, d] random unit rows (drawn in float32 on the device, then cast)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, d, generator=g, device=DEV), dim=-1).to(dtype)


@contextlib.contextmanager
def tf32(enabled: bool):
    """torch's float32 matmul precision for the block, through the API this torch has (torch >= 2.9:
    fp32_precision; reading the legacy allow_tf32 after it was set raises there)."""
    from fitclip_ext.kernels.common import set_tf32, tf32_enabled

    before = tf32_enabled()
    set_tf32(enabled)
    try:
        yield
    finally:
        set_tf32(before)
