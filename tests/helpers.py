"""What the test modules share: the backends and dtypes every op is checked on, the device a
backend runs on here, and seeded inputs. (Test modules import from here, never from each other.)"""
from __future__ import annotations

import json

import pytest
import torch

FUSED = ["cpp", "triton"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def backend_cases(shapes, dtypes):
    """(backend, dtype, shape) triples. The C++ backend takes every case. The Triton backend runs
    on CUDA when present; otherwise through the interpreter, which is slow (small shapes only;
    float64, which the kernels compute in float64, on the smaller ones); its bf16 tl.dot is made
    exact by tests/conftest.py (operands widened to float32), so bf16 runs here too."""
    cases = []
    for dtype in dtypes:
        for shape in shapes:
            cases.append(pytest.param("cpp", dtype, shape, id=f"cpp-{dtype}-{shape}"))
            on_gpu = torch.cuda.is_available()
            if on_gpu or max(shape) <= (70 if dtype == torch.float64 else 130):
                cases.append(pytest.param("triton", dtype, shape, id=f"triton-{dtype}-{shape}"))
    return cases


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def features(b, d, dtype, seed, normalize=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    return x.to(dtype)


def distill_inputs(n, m, d, dt, dtype, seed=0, noise=0.5):
    """A student that roughly agrees with its teacher (as after the labeled warm start)."""
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    tv = norm(torch.randn(n, dt, generator=g, dtype=torch.float64), dim=-1)
    tt = norm(torch.randn(m, dt, generator=g, dtype=torch.float64), dim=-1)
    proj = torch.randn(dt, d, generator=g, dtype=torch.float64) / dt**0.5
    sv = norm(tv @ proj + noise * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5, dim=-1)
    st = norm(tt @ proj + noise * torch.randn(m, d, generator=g, dtype=torch.float64) / d**0.5, dim=-1)
    return [x.to(dtype) for x in (sv, st, tv, tt)]


def torchrun_cli(nproc, command, argv, cwd):
    """`torchrun --standalone --nproc_per_node N -m fitclip_ext.cli COMMAND ...` on the CPU (gloo,
    one thread a process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fitclip_ext.cli", command, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def torchrun_train(nproc, argv, tmp_path):
    """`fitclip train` under torchrun (torchrun_cli)."""
    torchrun_cli(nproc, "train", argv, tmp_path)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def square_clips(root, n: int, frames: int, csv_name: str, caption=lambda i, colour: f"a {colour} square"):
    """n small H.264 clips of a coloured square on noise (the colours in turn) and a CSV of them
    (video, caption) with one broken file at the end: the trainer's tests' data."""
    from torchcodec.encoders import VideoEncoder

    rows = ["video,caption"]
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        name, rgb = list(COLOURS.items())[i % 4]
        video = torch.randint(0, 40, (frames, 3, 32, 32), generator=g, dtype=torch.uint8)
        video[:, :, 8:24, 8:24] = torch.tensor(rgb, dtype=torch.uint8)[None, :, None, None]
        VideoEncoder(video, frame_rate=frames).to_file(str(root / f"clip{i}.mp4"))
        rows.append(f"clip{i}.mp4,{caption(i, name)}")
    (root / "broken.mp4").write_bytes(b"not a video at all")
    rows.append("broken.mp4,a broken clip")
    (root / csv_name).write_text("\n".join(rows) + "\n")
    return root


def train_process(argv, tmp_path):
    """`python -m fitclip_ext.cli train ...` as a child process (stdout and stderr piped together)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "fitclip_ext.cli", "train", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(log_path, step, proc, timeout=300):
    """Waits until the run has logged step `step` (failing if it ends first)."""
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if log_path.exists() and any(json.loads(x).get("step", 0) >= step for x in open(log_path) if '"loss"' in x):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")
