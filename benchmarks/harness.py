"""Shared measuring tools: interleaved CPU timing, peak memory in a child process, results files.

CPU peak memory: a child process builds the inputs, warms the function up (torch.compile),
resets the kernel's peak-RSS counter (/proc/self/clear_refs), runs forward+backward once and
reports peak RSS minus RSS before the call. glibc is told to mmap every allocation >= 64 KiB so
freed blocks leave the RSS and the peak reflects live memory.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str = "cpu") -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} x{os.cpu_count()}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(base_fns: dict):
    """(times {name: [seconds]}, run): run() times every baseline once; given as pytest-benchmark's
    setup hook it runs before each timed round of the candidate, so candidate and baselines
    interleave in one process. torch_compile, if present, is compiled here, outside the rounds."""
    if "torch_compile" in base_fns:
        base_fns["torch_compile"]()
    times = {name: [] for name in base_fns}

    def run():
        for name, fn in base_fns.items():
            times[name].append(time_once(fn))

    return times, run


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child_peak_mb(module: str, *args: str, timeout: float = 1800) -> dict:
    """Runs `python -m <module> <args>` in a fresh process; it prints one JSON line."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1],
                "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_in_this_process(fn, warmup: bool) -> dict:
    """Called inside the child: peak extra RSS (MB) of one call of fn."""
    if warmup:
        fn()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _rss_kb("VmRSS")
    t = time_once(fn)
    peak = _rss_kb("VmHWM")
    return {"peak_extra_mb": (peak - before) / 1024, "seconds": t}


class ResultsFile:
    """Collects cases of one session and merges them into results/<device>-<date>.json."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.cases: list[dict] = []

    def add(self, case: dict) -> None:
        """Records a case and rewrites the file at once, so a later crash loses nothing."""
        self.cases.append(case)
        self.write()

    def write(self) -> Path | None:
        if not self.cases:
            return None
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        name = device_name(self.device)
        slug = "cpu" if self.device == "cpu" else "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
        path = RESULTS_DIR / f"{slug}-{datetime.date.today().isoformat()}.json"
        doc = {"device": name, "cases": []}
        if path.exists():
            doc = json.loads(path.read_text())
        doc.update({
            "device": name,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "commit": git_commit(),
            "threads": torch.get_num_threads(),
        })
        try:
            import triton

            doc["triton"] = triton.__version__
        except ImportError:
            pass
        key = lambda c: (c.get("op"), c.get("B"), c.get("N"), c.get("C"), c.get("V"), c.get("T"), c.get("D"), c.get("k"), c.get("dtype"))
        merged = {key(c): c for c in doc.get("cases", [])}
        for c in self.cases:
            merged[key(c)] = c
        doc["cases"] = sorted(merged.values(), key=lambda c: tuple(str(x) for x in key(c)))
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path


def cuda_peak_mb(fn) -> float:
    """Peak CUDA memory (MB) that one call of fn allocates beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
