"""The fused-loss peers a user would run instead of ours, each from its own pure-Python wheel
(carried to the GPU machine in .whl/: `make wheels`), with one adapter each to our call:

    contrastive (CLIP InfoNCE, mean over both directions):
        open_clip      open_clip.loss.ClipLoss, loaded from its loss.py alone (the package's
                       __init__ needs torchvision and more, which the GPU machine lacks)
        inf_cl         inf-cl 1.2.1, cal_inf_loss both ways (the scale goes in detached: it
                       all-reduces the scale's gradient, which needs a process group)
        memeff         memeff 0.3.1, MemoryEfficientCLIPLoss(temperature = 1 / scale,
                       normalized_inputs=True, stable=False): a fixed temperature, no scale gradient
    sigmoid (SigLIP, sum over pairs / B):
        open_clip      open_clip.loss.SigLipLoss (loss.py alone)
        siglip_kernel  siglip-kernel 0.1.2, fused_siglip_loss(img, txt, log scale, bias): its
                       "auto" choice and its "chunked_bf16" backend (cuBLAS GEMM + a Triton pass)

`load_all()` imports each one and says why one cannot run (not installed, no driver, ...);
`agreement` checks a peer's loss and feature gradients against float64 on a small case, and the
benchmark sections time the peers beside ours in the same process (benchmarks/gpucheck/*.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import traceback
from pathlib import Path

import torch

from fitclip_ext.reference import contrastive_loss_reference, sigmoid_loss_reference
from fitclip_ext.testing import rel_err

from . import harness as h

CONTRASTIVE = ("open_clip", "inf_cl", "memeff")
SIGMOID = ("open_clip", "siglip_kernel", "siglip_kernel_chunked_bf16")
WHEELS = {"open_clip": "open_clip_torch==3.3.0", "inf_cl": "inf-cl==1.2.1", "memeff": "memeff==0.3.1",
          "siglip_kernel": "siglip-kernel==0.1.2"}

_LOADED: dict = {}  # name -> module, or the exception that stopped its import


def _open_clip_loss():
    """open_clip's loss.py as a module of its own: from the installed package when it imports,
    else the file itself from any sys.path entry (a wheel unpacked to /tmp/site included)."""
    try:
        return importlib.import_module("open_clip.loss")
    except Exception as err:
        first = err
    for base in [Path(p) for p in sys.path if p] + [Path("/tmp/site")]:
        path = base / "open_clip" / "loss.py"
        if path.exists():
            spec = importlib.util.spec_from_file_location("open_clip_loss_file", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    raise ImportError(f"open_clip is not installed and no open_clip/loss.py is on sys.path ({first!r})")


def _load(name: str):
    if name not in _LOADED:
        try:
            _LOADED[name] = _open_clip_loss() if name == "open_clip" else importlib.import_module(name)
        except BaseException as err:  # (a missing CUDA driver can raise anything at import)
            if isinstance(err, (KeyboardInterrupt, h.OutOfTime)):
                raise
            _LOADED[name] = err
    return _LOADED[name]


def status(name: str) -> dict:
    """{"wheel", "version"} when it imports, else {"wheel", "import_error"}."""
    mod = _load(name)
    out = {"wheel": WHEELS[name]}
    if isinstance(mod, BaseException):
        out["import_error"] = f"{type(mod).__name__}: {mod}"[:300]
    else:
        out["version"] = getattr(mod, "__version__", None)
    return out


# ----------------------------------------------------------------------------- adapters
# Each returns fn(img, txt, scale[, bias]) -> loss, or raises ImportError with the reason.

def contrastive_fn(name: str, scale_value: float):
    mod = _load(name)
    if isinstance(mod, BaseException):
        raise ImportError(f"{type(mod).__name__}: {mod}")
    if name == "open_clip":
        clip_loss = mod.ClipLoss()
        return lambda i, t, s: clip_loss(i, t, s)
    if name == "inf_cl":
        def inf_cl_loss(i, t, s):
            sd = s.detach()  # (its scale gradient is all-reduced: it needs a process group)
            labels = torch.arange(i.shape[0], device=i.device)
            return (mod.cal_inf_loss(i, t, labels=labels, scale=sd) + mod.cal_inf_loss(t, i, labels=labels, scale=sd)) / 2
        return inf_cl_loss
    if name == "memeff":  # (its temperature is fixed at construction: a Python float, no sync per call)
        loss = mod.MemoryEfficientCLIPLoss(temperature=1.0 / scale_value, normalized_inputs=True, stable=False)
        return lambda i, t, s: loss(i, t) + 0.0 * s  # (s in the graph: every implementation is differentiated alike)
    raise ValueError(name)


def sigmoid_fn(name: str):
    mod = _load("siglip_kernel" if name.startswith("siglip_kernel") else name)
    if isinstance(mod, BaseException):
        raise ImportError(f"{type(mod).__name__}: {mod}")
    if name == "open_clip":
        siglip = mod.SigLipLoss()
        return lambda i, t, s, b: siglip(i, t, s, b)
    backend = "chunked_bf16" if name.endswith("chunked_bf16") else "auto"
    return lambda i, t, s, b: mod.fused_siglip_loss(i, t, torch.log(s), b, backend=backend)


# ----------------------------------------------------------------------------- agreement

def agreement(kind: str, name: str, B: int, D: int, dtype) -> dict:
    """A peer's loss and feature gradients against float64 on one case, beside ours on the same
    inputs: {"rel_err": {...}, "ours_rel_err": {...}, "agrees": err <= max(2 x ours, 1e-2)}."""
    import fitclip_ext

    img, txt = h.unit(B, D, 101, dtype), h.unit(B, D, 102, dtype)
    scale = torch.tensor(30.0 if kind == "contrastive" else 10.0, device=h.DEV)
    bias = torch.tensor(-10.0, device=h.DEV)
    if kind == "contrastive":
        peer = contrastive_fn(name, float(scale))
        ours = lambda i, t, s: fitclip_ext.contrastive_loss(i, t, s, backend="triton")  # noqa: E731
        ref = lambda i, t, s: contrastive_loss_reference(i, t, s)  # noqa: E731
        extra = ()
    else:
        peer = sigmoid_fn(name)
        ours = lambda i, t, s, b: fitclip_ext.sigmoid_loss(i, t, s, b, backend="triton")  # noqa: E731
        ref = lambda i, t, s, b: sigmoid_loss_reference(i, t, s, b)  # noqa: E731
        extra = (bias,)

    def run(fn, up=False):
        i, t = (x.detach().clone().double() if up else x.detach().clone() for x in (img, txt))
        i.requires_grad_()
        t.requires_grad_()
        args = [scale.double() if up else scale] + [b.double() if up else b for b in extra]
        loss = fn(i, t, *args)
        return [loss, *torch.autograd.grad(loss, (i, t))]

    truth = run(ref, up=True)
    names = ("loss", "d_image", "d_text")
    got = {n: rel_err(x, y) for n, x, y in zip(names, run(peer), truth)}
    mine = {n: rel_err(x, y) for n, x, y in zip(names, run(ours), truth)}
    ok = all(math.isfinite(got[n]) and got[n] <= max(2 * mine[n], 1e-2) for n in names)
    return {"B": B, "D": D, "dtype": h.dtype_name(dtype), "rel_err": got, "ours_rel_err": mine, "agrees": ok}


def check_all(cases: list[tuple[str, str]], B: int, D: int, dtype) -> dict:
    """doc["peers"]: for each (kind, peer) its wheel and version, then "run" with its agreement
    with float64 or "not run" with the reason (import failure, refusal of the device, error)."""
    out = h.DOC.setdefault("peers", {})
    for kind, name in cases:
        key = f"{kind}/{name}"
        rec = out[key] = status("siglip_kernel" if name.startswith("siglip_kernel") else name)
        if "import_error" in rec:
            rec.update(status="not run", reason=rec["import_error"])
        else:
            try:
                rec.update(status="run", **agreement(kind, name, B, D, dtype))
            except h.OutOfTime:
                rec.update(status="not run", reason="out of time")
                raise
            except Exception as err:
                where = traceback.extract_tb(err.__traceback__)[-1]
                rec.update(status="not run",
                           reason=f"{type(err).__name__}: {err} (at {Path(where.filename).name}:{where.lineno})"[:300])
        h.log(f"peer {key}: {rec['status']}", rec.get("reason", rec.get("rel_err", "")))
        h.save()
    return out


def usable(kind: str, name: str) -> bool:
    """Whether check_all ran the peer (so the benchmarks time it; otherwise they record why not)."""
    return h.DOC.get("peers", {}).get(f"{kind}/{name}", {}).get("status") == "run"


def not_run_reason(kind: str, name: str) -> str:
    rec = h.DOC.get("peers", {}).get(f"{kind}/{name}")
    return f"not run: {rec.get('reason')}" if rec else "not checked (its agreement section did not run)"
