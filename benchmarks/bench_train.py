"""`fitclip train` at the size people train, on this machine, against the floor of its step.

The run: ViT-B-32 (random init), 224 px frames from real H.264 clips (320 x 240, 3 s at 30 fps,
written here with torchcodec's encoder), 4 frames a clip, 8 labeled + 8 unlabeled clips a step,
20 steps in one epoch, at the default checkpoint schedule (every 30 minutes, at the epoch end and
at the end: here one write, at the end), with 0 and with 2 DataLoader workers. Each run is a
child process (`python -m fitclip_ext.cli train`), so its peak RSS is its own (os.wait4).

The floor of a step: the student's forward+backward of the same batch (64 frames and 16 texts
through the two towers, backward of a scalar) plus the frozen teacher's forward of the
unlabeled half (32 frames, 8 texts), timed in this process with the same threads.

Targets (from the trainer's issue): with 2 workers, data wait at most 5% of step time,
checkpoint overhead at most 2% of the training loop's wall time, median step at most 1.15x the
floor. The first step is left out of the medians (one-time library loading and allocation).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .harness import ROOT

MODEL, SIZE, FRAMES, BATCH, STEPS = "ViT-B-32", (240, 320), 4, 8, 20
DISTINCT_CLIPS = 32  # files; the CSVs list STEPS * BATCH rows over them (encoding is the slow part here)


def write_clips(root: Path, n: int, seconds: float = 3.0, fps: int = 30) -> list[Path]:
    """n H.264 clips of moving gradients with noise and a moving square (real decoding work)."""
    from torchcodec.encoders import VideoEncoder

    g = torch.Generator().manual_seed(0)
    H, W = SIZE
    T = int(seconds * fps)
    paths = []
    ramp = torch.linspace(0, 255, W).view(1, 1, 1, W)
    for i in range(n):
        path = root / f"clip{i:03d}.mp4"
        colour = torch.randint(0, 256, (3,), generator=g)
        frames = ((ramp * (0.5 + i / n) + torch.arange(T).view(T, 1, 1, 1) * (1 + i % 5)) % 256).expand(T, 3, H, W)
        frames = frames + torch.randint(-12, 13, (T, 3, H, W), generator=g)
        for t in range(T):
            y, x = (t * 3 + i * 7) % (H - 64), (t * 5 + i * 11) % (W - 64)
            frames[t, :, y:y + 64, x:x + 64] = colour.view(3, 1, 1)
        VideoEncoder(frames.clamp(0, 255).to(torch.uint8), frame_rate=fps).to_file(str(path), preset="veryfast")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_clips")
    paths = write_clips(root, DISTINCT_CLIPS)
    rows = ["video,caption"] + [f"{paths[i % len(paths)].name},a moving square number {i % len(paths)}"
                                for i in range(STEPS * BATCH)]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def train_run(root: Path, out: Path, workers: int, shards: str | None = None) -> dict:
    """One `fitclip train` child process: its log records, wall time and peak RSS (`shards`: the
    same clips from webdataset shards, labeled and unlabeled)."""
    data = (["--train-shards", shards, "--unlabeled-shards", shards] if shards else
            ["--train-csv", str(root / "train.csv"), "--unlabeled-csv", str(root / "train.csv"), "--video-root", str(root)])
    argv = [sys.executable, "-m", "fitclip_ext.cli", "train", *data, "--out-dir", str(out),
            "--model", MODEL, "--pretrained", "none", "--num-frames", str(FRAMES), "--batch-size", str(BATCH),
            "--unlabeled-batch-size", str(BATCH), "--epochs", "1", "--workers", str(workers), "--seed", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    return {"steps": [r for r in log if "loss" in r], "summary": next(r["summary"] for r in log if "summary" in r),
            "process_wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def step_floor(root: Path, rounds: int = 4) -> dict:
    """Seconds of the student's forward+backward of one step's batch and of the teacher's forward
    (median of `rounds` after a warm-up), on the same decoded clips the trainer reads."""
    from fitclip_ext import model as fmodel
    from fitclip_ext.data import ClipDataset, collate, frame_preprocess, load_caption_csv

    torch.manual_seed(0)
    student, _, _, tokenizer = fmodel.create(MODEL, None)
    teacher, *_ = fmodel.create(MODEL, None)
    teacher.load_state_dict(student.state_dict())
    teacher.eval().requires_grad_(False)
    ds = ClipDataset(load_caption_csv(str(root / "train.csv"), str(root)), frame_preprocess(student), FRAMES,
                     "random", 0)
    frames, captions, _, _ = collate([ds[i] for i in range(2 * BATCH)])
    tokens = tokenizer(captions)
    student_s, teacher_s = [], []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        img, txt = student.encode_image(frames.flatten(0, 1)), student.encode_text(tokens)
        (img.float().sum() + txt.float().sum()).backward()
        t1 = time.perf_counter()
        with torch.no_grad():
            teacher.encode_image(frames[BATCH:].flatten(0, 1))
            teacher.encode_text(tokens[BATCH:])
        t2 = time.perf_counter()
        student.zero_grad(set_to_none=True)
        if r:
            student_s.append(t1 - t0)
            teacher_s.append(t2 - t1)
    s, t = statistics.median(student_s), statistics.median(teacher_s)
    return {"student_fwd_bwd_s": s, "teacher_fwd_s": t, "floor_s": s + t, "rounds": rounds}


def summarise(run: dict, floor_s: float) -> dict:
    steps = run["steps"][1:]  # the first step loads libraries and allocates
    med = lambda key: statistics.median(r[key] for r in steps)
    summ = run["summary"]
    return {
        "steps": len(run["steps"]), "median_step_s": med("seconds"), "median_data_wait_s": med("data_wait_s"),
        "median_fwd_bwd_s": med("fwd_bwd_s"), "median_optimizer_s": med("optimizer_s"),
        "median_clips_per_s": med("clips_per_s"),
        "data_wait_fraction": sum(r["data_wait_s"] for r in steps) / sum(r["seconds"] for r in steps),
        "step_over_floor": med("seconds") / floor_s,
        "loop_wall_s": summ["wall_s"], "checkpoint_s": summ["checkpoint_s"],
        "checkpoint_fraction": summ["checkpoint_s"] / summ["wall_s"],
        "checkpoints_written": summ["checkpoints"], "process_wall_s": run["process_wall_s"],
        "peak_rss_mb": run["peak_rss_mb"], "grad_norm_first_last": [run["steps"][0]["grad_norm"],
                                                                     run["steps"][-1]["grad_norm"]],
    }


TARGETS = {"data_wait_fraction": 0.05, "checkpoint_fraction": 0.02, "step_over_floor": 1.15}


def test_fitclip_train_vit_b32(benchmark, results, clips, tmp_path):
    runs = {}

    def both():
        for workers in (0, 2):
            runs[workers] = train_run(clips, tmp_path / f"workers{workers}", workers)

    benchmark.group = f"fitclip train {MODEL} {STEPS} steps"
    benchmark.pedantic(both, rounds=1, iterations=1)
    floor = step_floor(clips)
    case = {"op": "fitclip train", "model": MODEL, "pretrained": "none", "frame_px": 224, "clip_size": list(SIZE),
            "frames": FRAMES, "labeled_batch": BATCH, "unlabeled_batch": BATCH, "precision": "fp32",
            "schedule": "default (every 30 min, epoch end, end)", **floor,
            "runs": {f"workers_{w}": summarise(r, floor["floor_s"]) for w, r in runs.items()}, "targets": TARGETS}
    results("cpu").add(case)
    print("\n" + json.dumps(case, indent=1))
    two = case["runs"]["workers_2"]
    for key, limit in TARGETS.items():
        assert two[key] <= limit, (key, two[key], limit)


def test_fitclip_train_from_shards(benchmark, results, clips, tmp_path):
    """The run above (2 workers) from webdataset shards of the same clips (`fitclip shards`, 4
    shards of 40 samples): the data wait per step, target <= 5% of the step as for files."""
    from fitclip_ext.data import load_caption_csv
    from fitclip_ext.shards import write_shards

    rep = write_shards(load_caption_csv(clips / "train.csv", clips), tmp_path / "shards", max_count=40, progress=False)
    assert rep["written"] == STEPS * BATCH and len(rep["shards"]) == 4
    pattern = str(tmp_path / "shards" / "shard-{000000..000003}.tar")
    run = {}
    benchmark.group = f"fitclip train {MODEL} from shards"
    benchmark.pedantic(lambda: run.update(train_run(clips, tmp_path / "run", 2, shards=pattern)), rounds=1,
                       iterations=1)
    floor = step_floor(clips)
    case = {"op": "fitclip train", "model": MODEL, "pretrained": "none", "frame_px": 224, "clip_size": list(SIZE),
            "frames": FRAMES, "labeled_batch": BATCH, "unlabeled_batch": BATCH, "precision": "fp32",
            "schedule": "default (every 30 min, epoch end, end)", "data": "shards (4 x 40 samples)", **floor,
            "runs": {"shards_workers_2": summarise(run, floor["floor_s"])}, "targets": TARGETS}
    results("cpu").add(case)
    print("\n" + json.dumps(case, indent=1))
    assert case["runs"]["shards_workers_2"]["data_wait_fraction"] <= TARGETS["data_wait_fraction"]


# ----------------------------------------------------------------------------- gradient caching

GC_MODEL, GC_FRAMES, GC_CHUNK, GC_BATCHES = "ViT-S-32", 2, 8, (8, 32, 128)


def gc_run(root: Path, out: Path, batch: int, chunk: int) -> dict:
    """`fitclip train` for 2 steps of `batch` labeled clips (no unlabeled stream, 2 workers), with
    --grad-cache-chunk `chunk` (0: off): peak RSS of the child and the second step's forward+backward."""
    argv = [sys.executable, "-m", "fitclip_ext.cli", "train", "--train-csv", str(root / "train.csv"),
            "--video-root", str(root), "--out-dir", str(out), "--model", GC_MODEL, "--pretrained", "none",
            "--num-frames", str(GC_FRAMES), "--batch-size", str(batch), "--max-steps", "2", "--workers", "2",
            "--seed", "0", "--grad-cache-chunk", str(chunk), "--epochs", "2"]  # (128 clips: 1 step an epoch)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(argv, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    steps = [json.loads(line) for line in open(out / "log.jsonl") if '"loss"' in line]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    return {"batch": batch, "grad_cache_chunk": chunk, "peak_rss_mb": usage.ru_maxrss / 1024,
            "fwd_bwd_s": steps[1]["fwd_bwd_s"], "loss": steps[1]["loss"]}


def encoder_floor(root: Path, batch: int, rounds: int = 2) -> dict:
    """Seconds of the encoders' forward without autograd plus forward+backward of `batch` clips
    at once (what gradient caching does, less its chunking): the floor of a cached step."""
    from fitclip_ext import model as fmodel
    from fitclip_ext.data import ClipDataset, collate, frame_preprocess, load_caption_csv

    torch.manual_seed(0)
    model, _, _, tokenizer = fmodel.create(GC_MODEL, None)
    ds = ClipDataset(load_caption_csv(str(root / "train.csv"), str(root)), frame_preprocess(model), GC_FRAMES,
                     "random", 0)
    frames, captions, _, _ = collate([ds[i] for i in range(batch)])
    images, tokens = frames.flatten(0, 1), tokenizer(captions)
    times = []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.encode_image(images), model.encode_text(tokens)
        img, txt = model.encode_image(images), model.encode_text(tokens)
        (img.sum() + txt.sum()).backward()
        model.zero_grad(set_to_none=True)
        if r:
            times.append(time.perf_counter() - t0)
    return {"batch": batch, "two_forwards_one_backward_s": statistics.median(times), "rounds": rounds}


def test_grad_cache_memory_flat_in_batch_size(benchmark, results, clips, tmp_path):
    """Peak memory of `fitclip train` against the batch (8, 32, 128 clips of 2 frames, ViT-S-32 at
    224 px) with and without --grad-cache-chunk 8. Targets (#30): with gradient caching the
    memory is flat in the batch size (here: the growth from 8 to 128 clips at most a quarter of
    the growth without it, the decoded frames themselves growing with the batch), and a cached
    step within 1.4x of the encoders' two forward passes plus one backward of the same batch."""
    runs = []

    def all_runs():
        for batch in GC_BATCHES:
            for chunk in (0, GC_CHUNK):
                runs.append(gc_run(clips, tmp_path / f"b{batch}-c{chunk}", batch, chunk))

    benchmark.group = f"grad cache {GC_MODEL}"
    benchmark.pedantic(all_runs, rounds=1, iterations=1)
    floor = encoder_floor(clips, 32)
    cached32 = next(r for r in runs if r["batch"] == 32 and r["grad_cache_chunk"])
    rss = {(r["batch"], r["grad_cache_chunk"]): r["peak_rss_mb"] for r in runs}
    growth = {c: rss[(GC_BATCHES[-1], c)] - rss[(GC_BATCHES[0], c)] for c in (0, GC_CHUNK)}
    case = {"op": "fitclip train --grad-cache-chunk", "model": GC_MODEL, "frames": GC_FRAMES, "chunk": GC_CHUNK,
            "runs": runs, "floor_b32": floor, "cached_b32_over_floor": cached32["fwd_bwd_s"] /
            floor["two_forwards_one_backward_s"], "rss_growth_8_to_128_mb": {str(c): g for c, g in growth.items()},
            "targets": {"cached_over_floor": 1.4, "cached_growth_over_plain_growth": 0.25}}
    results("cpu").add(case)
    print("\n" + json.dumps(case, indent=1))
    assert case["cached_b32_over_floor"] <= 1.4, case["cached_b32_over_floor"]
    assert growth[GC_CHUNK] <= 0.25 * growth[0], growth
