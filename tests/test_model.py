"""open_clip model creation (tiny config offline, local checkpoint files), frame encoding,
atomic checkpoints and WiSE-FT."""
import os

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

from fitclip_ext import model as fm  # noqa: E402


def test_tiny_model_encodes_frames_and_text():
    model, _, eval_tf, tok = fm.create("fitclip-tiny")
    frames = torch.randn(2, 3, 3, 32, 32)
    emb = fm.encode_frames(model, frames)
    assert emb.shape == (2, 3, 64)
    assert model.encode_text(tok(["a red ball spins"])).shape == (1, 64)
    with pytest.raises(ValueError, match=r"frames must be \[B, T, 3, H, W\]"):
        fm.encode_frames(model, torch.randn(2, 3, 32, 32))


def test_checkpoint_round_trip_through_create(tmp_path):
    torch.manual_seed(0)
    model, *_ = fm.create("fitclip-tiny")
    path = tmp_path / "ckpt" / "model.safetensors"
    fm.save_checkpoint(model.state_dict(), path, metadata={"step": "7"})
    assert path.exists() and not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]
    loaded, *_ = fm.create("fitclip-tiny", pretrained=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # an open_clip-style torch checkpoint ({"state_dict": ...} with DDP's "module." prefix)
    pt = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, pt)
    loaded2, *_ = fm.create("fitclip-tiny", pretrained=str(pt))
    assert torch.equal(loaded2.visual.conv1.weight, model.visual.conv1.weight)


def test_loading_a_local_checkpoint_does_not_claim_random_weights(tmp_path, caplog):
    """open_clip warns "initialized randomly" when it loads no tag itself; with a local checkpoint
    loaded right after, that warning is false and is dropped (kept for pretrained=None)."""
    model, *_ = fm.create("fitclip-tiny")
    path = tmp_path / "model.safetensors"
    fm.save_checkpoint(model.state_dict(), path)
    caplog.clear()
    with caplog.at_level("WARNING"):
        fm.create("fitclip-tiny", pretrained=str(path))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level("WARNING"):
        fm.create("fitclip-tiny")
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_atomic_save_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    fm.save_checkpoint({"w": torch.ones(3)}, path)
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        fm.save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(fm.load_state_dict(path)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_wise_ft():
    a = {"w": torch.zeros(2), "ids": torch.arange(3)}
    b = {"w": torch.tensor([1.0, -2.0]), "ids": torch.arange(3)}
    out = fm.wise_ft(a, b, 0.4)
    torch.testing.assert_close(out["w"], torch.tensor([0.4, -0.8]))
    assert torch.equal(out["ids"], torch.arange(3))
    with pytest.raises(ValueError, match="alpha must be in"):
        fm.wise_ft(a, b, 1.5)
    with pytest.raises(ValueError, match="different tensors"):
        fm.wise_ft(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="non-floating tensor ids differs"):
        fm.wise_ft(a, {"w": b["w"], "ids": torch.arange(1, 4)}, 0.5)
