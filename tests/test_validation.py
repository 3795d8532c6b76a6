"""Bad input gets a clear error naming the argument and what was expected."""
import pytest
import torch

import fitclip_ext

x = torch.randn(4, 8)
y = torch.randn(4, 8)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.randn(4), y, 1.0), {}, ValueError, r"image_features must be 2-D"),
        ((x, torch.randn(4, 8, 1), 1.0), {}, ValueError, r"text_features must be 2-D"),
        ((x, torch.randn(5, 8), 1.0), {}, ValueError, r"same shape \[B, D\]"),
        ((x, torch.randn(4, 7), 1.0), {}, ValueError, r"same shape \[B, D\]"),
        ((torch.zeros(4, 8, dtype=torch.int64), y, 1.0), {}, TypeError, r"image_features must be float32"),
        ((x, y.double(), 1.0), {}, TypeError, r"same dtype"),
        ((torch.randn(0, 8), torch.randn(0, 8), 1.0), {}, ValueError, r"non-empty batch"),
        ((x, y, float("inf")), {}, ValueError, r"logit_scale must be finite"),
        ((x, y, torch.tensor(float("nan"))), {}, ValueError, r"logit_scale must be finite"),
        ((x, y, torch.ones(2)), {}, ValueError, r"logit_scale must be a scalar"),
        ((x, y, "10"), {}, TypeError, r"logit_scale must be a real number"),
        ((x, y, torch.tensor(3)), {}, TypeError, r"logit_scale must be a floating point"),
        ((x, y, 1.0, torch.ones(3)), {}, ValueError, r"logit_bias must be a scalar"),
        ((x, y, 1.0), {"label_smoothing": 1.0}, ValueError, r"label_smoothing must be in \[0, 1\)"),
        ((x, y, 1.0), {"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\)"),
        ((x, y, 1.0), {"reduction": "avg"}, ValueError, r"reduction must be one of"),
        ((x, "y", 1.0), {}, TypeError, r"text_features must be a torch.Tensor"),
    ],
)
def test_contrastive_loss_bad_input(backend, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fitclip_ext.contrastive_loss(*args, backend=backend, **kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fitclip_ext.contrastive_loss(x, y, 1.0, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' takes CUDA tensors"):
        fitclip_ext.contrastive_loss(x, y, 1.0, backend="triton")


@pytest.mark.parametrize(
    "n,m,offset,exc,match",
    [
        (4, 8, 5, ValueError, r"positive_offset must be in \[0, m - n\] = \[0, 4\]"),
        (4, 8, -1, ValueError, r"positive_offset must be in"),
        (8, 4, 0, ValueError, r"positive_offset must be in"),
        (4, 8, 1.5, TypeError, r"positive_offset must be an int"),
    ],
)
def test_infonce_bad_offset(n, m, offset, exc, match):
    with pytest.raises(exc, match=match):
        fitclip_ext.infonce(torch.randn(n, 8), torch.randn(m, 8), 1.0, positive_offset=offset)


def test_infonce_feature_mismatch():
    with pytest.raises(ValueError, match=r"query and keys must have the same feature size D, got 8 and 6"):
        fitclip_ext.infonce(torch.randn(3, 8), torch.randn(5, 6), 1.0)


def test_mixed_devices_rejected():
    # the meta device stands in for a second device on a machine without a GPU
    with pytest.raises(ValueError, match=r"image_features and text_features must be on the same device"):
        fitclip_ext.contrastive_loss(x, y.to("meta"), 1.0)


def test_cpp_unavailable_message(monkeypatch):
    from fitclip_ext import backends

    monkeypatch.setitem(backends._state, "cpp_loaded", False)
    monkeypatch.setitem(backends._state, "cpp_error", ImportError("not built"))
    with pytest.raises(RuntimeError, match=r"C\+\+ extension fitclip_ext._C.*backend='torch'"):
        fitclip_ext.contrastive_loss(x, y, 1.0, backend="cpp")
    # the reference backend still works without the extension
    assert torch.isfinite(fitclip_ext.contrastive_loss(x, y, 1.0, backend="torch"))
