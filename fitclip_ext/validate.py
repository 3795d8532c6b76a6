"""Input checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def features(name: str, x, ndim: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch, got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty feature dimension, got shape {tuple(x.shape)}")
    return x


def same_device_dtype(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must have the same dtype, got {a.dtype} and {b.dtype}")


def _scalar_tensor(name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (0-d or 1-element tensor), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {value.dtype}")
    if value.device != device and value.device.type != "cpu":
        raise ValueError(f"{name} must be on {device} (or the CPU), got {value.device}")
    value = value.reshape(())
    if value.device != device and not value.requires_grad:
        # a CPU scalar for features elsewhere: read on the host (free for a CPU tensor) and made
        # on the device, so no pageable host-to-device copy (a sync, and a broken CUDA-graph
        # capture) happens per call. One that requires a gradient is copied (its gradient must
        # come back to the CPU anyway): keep such a parameter on the features' device.
        return device_scalar(float(value), device, value.dtype)
    return value


def device_scalar(value: float, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Python number as a 0-d tensor made on `device` by a fill kernel: the value travels as a
    kernel argument, so there is no host-to-device copy and no host sync, and a CUDA graph can
    capture it. float64 by default: the float64 ops keep every bit, the others round it once."""
    return torch.full((), value, dtype=dtype, device=device)


def scale(name: str, value, device: torch.device) -> torch.Tensor:
    """A finite Python number or 0-d/1-element float tensor -> 0-d tensor (autograd preserved);
    numbers become tensors on `device` without a host-to-device copy."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number or a 0-d tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        # Checked where that is free: a CUDA scale would need a host sync each step (a NaN one gives
        # a NaN loss there), and so would a traced graph.
        if (not torch.compiler.is_compiling() and value.device.type == "cpu" and value.numel() == 1
                and not bool(torch.isfinite(value.detach()).all())):
            raise ValueError(f"{name} must be finite, got {value.detach().reshape(()).item()}")
        return _scalar_tensor(name, value, device)
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return device_scalar(float(value), device)


def bias(name: str, value, device: torch.device) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return device_scalar(float(value), device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be None, a real number or a 0-d tensor, got {type(value).__name__}")
    return _scalar_tensor(name, value, device)


def loss_options(logit_scale, logit_bias, label_smoothing_, reduction_, device):
    """The checks shared by every loss: (scale, bias or None, label smoothing, reduction)."""
    return (scale("logit_scale", logit_scale, device), bias("logit_bias", logit_bias, device),
            label_smoothing(label_smoothing_), reduction(reduction_))


def label_smoothing(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1), got {type(value).__name__}")
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
    return float(value)


def positive_offset(value, n: int, m: int, rows: str, cols: str, allow_none: bool = False):
    """The index of row 0's positive column, in [0, m - n] so that every row's positive exists
    (None, with allow_none: no positives, a block of negatives only)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"positive_offset must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if not 0 <= value <= m - n:
        raise ValueError(f"positive_offset must be in [0, m - n] = [0, {m - n}] so that every {rows}'s positive {cols} "
                         f"exists (n={n}, m={m}){', or None for negatives only' if allow_none else ''}, got {value}")
    return value


def reduction(value) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- frame ops

def frame_features(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [videos, frames, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{name} must be non-empty in every dimension, got shape {tuple(x.shape)}")
    return x


def top_k(k, num_frames: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_frames:
        raise ValueError(f"k must be in [1, T] = [1, {num_frames}], got {k}")
    return k


def frame_mask(mask, videos: int, num_frames: int, k: int, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = real frame), got {mask.dtype}")
    if tuple(mask.shape) != (videos, num_frames):
        raise ValueError(f"mask must have shape [videos, T] = [{videos}, {num_frames}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on {device}, got {mask.device}")
    real = mask.sum(1)
    if mask.device.type == "cpu":  # host values are free: name the first video
        short = (real < k).nonzero()
        if short.numel():
            v = short[0, 0].item()
            raise ValueError(f"mask leaves video {v} with {real[v].item()} real frames, fewer than k={k}")
    else:  # no host sync: a device-side assertion (fails the next synchronising call, never silently)
        torch._assert_async((real >= k).all(), f"mask leaves a video with fewer than k={k} real frames")
    return mask.contiguous()


def frame_inputs(text, frames, k, mask, same_count: bool):
    """The checks shared by the frame ops; returns (k, mask)."""
    frame_pair("text_features", text, "frame_features", frames, same_count)
    k = top_k(k, frames.shape[1])
    return k, frame_mask(mask, frames.shape[0], frames.shape[1], k, frames.device)


def frame_pair(text_name, text, frames_name, frames, same_count: bool):
    features(text_name, text)
    frame_features(frames_name, frames)
    same_device_dtype((frames_name, text_name), frames, text)
    if text.shape[1] != frames.shape[2]:
        raise ValueError(f"{text_name} and {frames_name} must have the same feature size D, got "
                         f"{text.shape[1]} and {frames.shape[2]}")
    if same_count and text.shape[0] != frames.shape[0]:
        raise ValueError(f"{frames_name} and {text_name} must have the same batch size B (caption b describes "
                         f"video b), got {frames.shape[0]} and {text.shape[0]}")
