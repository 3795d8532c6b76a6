"""Training checkpoints on a schedule, written in the background, atomically, resumable.

A checkpoint is two files, `step-<N>.safetensors` (the model) and `step-<N>_state.pt` (the
optimizer, the position in the data, the best validation loss, and the model file's name), each
written to a temporary file, fsynced and renamed (`model.atomic_write`). `last.safetensors` and
`last_state.pt` are then re-pointed at them (hard links, renamed over the old ones) and the
oldest step files beyond `keep_last` are deleted. `--resume` reads `last_state.pt` and the model
file it names, so a crash at any moment leaves a complete, consistent checkpoint.

`save()` costs the training loop only the copy of the state to host memory; a background
thread does the writes (one at a time: a save waits for the previous write, so at most one
snapshot is held). `due()` says when the schedule (every N steps and/or every M minutes) asks
for one; the trainer also saves at each epoch end, at the end, and on SIGTERM/SIGINT.
"""
from __future__ import annotations

import copy
import os
import re
import threading
import time
from pathlib import Path

import torch

from . import model as fmodel

_STEP_FILE = re.compile(r"step-(\d+)\.safetensors$")


def _to_host(obj):
    """A copy of obj's tensors in host memory (nested dicts, lists and tuples kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


def _link_over(src: Path, dst: Path) -> None:
    """dst becomes src's content, atomically (a hard link renamed over dst; a copy where the file
    system has no hard links)."""
    tmp = dst.with_name(dst.name + f".{os.getpid()}.link")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        if tmp.exists():
            tmp.unlink()
        data = src.read_bytes()
        fmodel.atomic_write(dst, lambda t: Path(t).write_bytes(data))


class Checkpointer:
    def __init__(self, out: Path, every_steps: int = 0, every_minutes: float = 0.0, keep_last: int = 1,
                 enabled: bool = True):
        if every_steps < 0 or every_minutes < 0:
            raise ValueError(f"save_every_steps and save_every_minutes must be >= 0, got {every_steps} and "
                             f"{every_minutes}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.out, self.every_steps, self.every_minutes, self.keep_last = Path(out), every_steps, every_minutes, keep_last
        self.enabled = enabled
        self.last_time = time.monotonic()
        self.last_step: int | None = None  # the step of the latest save() (its write may be in flight)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.blocked_s = 0.0  # seconds the caller spent in save() and wait(): what checkpoints cost training
        self.written = 0      # checkpoints saved

    def due(self, step: int) -> bool:
        """Whether the schedule asks for a checkpoint after optimizer step `step`."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self.last_time >= 60 * self.every_minutes

    def save(self, model, optimizer, step: int, progress: dict, wait: bool = False) -> float:
        """Snapshots the state to host memory and writes it in the background (or now, with
        wait); returns the seconds the caller spent (the snapshot, and any wait)."""
        if not self.enabled:
            self.last_step = step
            return 0.0
        t0, blocked = time.perf_counter(), self.blocked_s
        self.wait()
        weights = _to_host(model.state_dict())
        state = {"optimizer": _to_host(optimizer.state_dict()), "step": step, **progress,
                 "model_file": f"step-{step:08d}.safetensors"}
        self.last_time = time.monotonic()
        self.last_step = step
        self._thread = threading.Thread(target=self._write, args=(weights, state, step), daemon=False,
                                        name="fitclip-checkpoint")
        self._thread.start()
        if wait:
            self.wait()
        self.written += 1
        seconds = time.perf_counter() - t0
        self.blocked_s = blocked + seconds  # (the waits inside included once)
        return seconds

    def wait(self) -> None:
        """Blocks until the write in flight (if any) is on disk; re-raises its error."""
        if self._thread is not None:
            t0 = time.perf_counter()
            self._thread.join()
            self._thread = None
            self.blocked_s += time.perf_counter() - t0
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint to {self.out} failed: {err}") from err

    def _write(self, weights, state, step: int) -> None:
        try:
            model_file = self.out / state["model_file"]
            state_file = self.out / f"step-{step:08d}_state.pt"
            fmodel.save_checkpoint(weights, model_file, metadata={"step": str(step)})
            fmodel.atomic_write(state_file, lambda tmp: torch.save(state, tmp))
            _link_over(state_file, self.out / "last_state.pt")
            _link_over(model_file, self.out / "last.safetensors")
            self._prune()
        except BaseException as err:  # reported by the next wait()
            self._error = err

    def _prune(self) -> None:
        steps = sorted(int(m.group(1)) for p in self.out.iterdir() if (m := _STEP_FILE.match(p.name)))
        for s in steps[:-self.keep_last]:
            for name in (f"step-{s:08d}.safetensors", f"step-{s:08d}_state.pt"):
                (self.out / name).unlink(missing_ok=True)


def load(out: Path, device) -> tuple[dict, dict] | None:
    """(model state dict, training state) of the last checkpoint in `out`, or None if there is none."""
    out = Path(out)
    if not (out / "last_state.pt").exists():
        return None
    state = torch.load(out / "last_state.pt", map_location=device, weights_only=False)
    model_file = out / state.get("model_file", "last.safetensors")
    if not model_file.exists():
        model_file = out / "last.safetensors"
    return fmodel.load_state_dict(model_file), state
