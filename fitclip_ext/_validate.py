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
    return value.reshape(())


def scale(name: str, value, device: torch.device) -> torch.Tensor:
    """A finite Python number or 0-d/1-element float tensor -> 0-d tensor (autograd preserved)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number or a 0-d tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        value = _scalar_tensor(name, value, device)
        # A host sync on CUDA: cheap against a loss over thousands of pairs, skipped when compiling.
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(value.detach())):
            raise ValueError(f"{name} must be finite, got {value.detach().item()}")
        return value
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), dtype=torch.float64)


def bias(name: str, value, device: torch.device) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
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


def reduction(value) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value
