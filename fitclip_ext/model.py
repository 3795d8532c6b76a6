"""open_clip models for video: creation (open_clip tags, local checkpoint files, tiny configs for
offline tests and the demo), frame encoding, atomic safetensors checkpoints and WiSE-FT."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from .errors import InputError

# Tiny configurations (random init, offline): the tests' and the demo's stand-ins for ViT-B/16.
TINY_CONFIGS = {
    "fitclip-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}
_registered = False


def register_tiny_configs() -> None:
    """Makes TINY_CONFIGS known to open_clip (through its own add_model_config)."""
    global _registered
    if _registered:
        return
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in TINY_CONFIGS.items():
            (Path(tmp) / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp)
    _registered = True


def create(model_name: str, pretrained: str | None = None, device="cpu"):
    """(model, train transform, eval transform, tokenizer) of an open_clip model. `pretrained` is
    an open_clip tag (e.g. "openai", downloaded by open_clip), a local checkpoint file (a
    safetensors or torch state dict, as written by `save_checkpoint` or open_clip), or None."""
    import open_clip

    register_tiny_configs()
    local = pretrained is not None and os.path.isfile(pretrained)
    # open_clip warns "No pretrained weights loaded ... initialized randomly" whenever it loads
    # no tag itself, which is untrue when the local checkpoint is loaded right after
    quiet = _DropRandomInitWarning() if local else None
    if quiet:
        logging.getLogger().addFilter(quiet)
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            model_name, pretrained=None if local else pretrained, device=device)
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    if local:
        weights = load_state_dict(pretrained)
        if "logit_bias" in weights:  # trained with a bias (SigLIP's loss) on an architecture without one
            add_logit_bias(model, 0.0)
        model.load_state_dict(weights, strict=True)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(model_name)


def add_logit_bias(model, init: float) -> bool:
    """Gives an open_clip model a learnable `logit_bias` (as open_clip's init_logit_bias does) if it
    has none; True if one was added."""
    if getattr(model, "logit_bias", None) is not None:
        return False
    param = next(model.parameters())
    model.logit_bias = torch.nn.Parameter(torch.tensor(init, dtype=param.dtype, device=param.device))
    return True


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def encode_frames(model, frames: torch.Tensor) -> torch.Tensor:
    """frames [B, T, 3, H, W] (preprocessed) -> frame embeddings [B, T, D] from the image tower."""
    if frames.dim() != 5:
        raise ValueError(f"frames must be [B, T, 3, H, W], got shape {tuple(frames.shape)}")
    B, T = frames.shape[:2]
    return model.encode_image(frames.flatten(0, 1)).reshape(B, T, -1)


def atomic_write(path, write) -> None:
    """Calls write(tmp) for a temporary file in `path`'s folder, fsyncs it, then renames it over
    `path`: a crash never leaves a partial file, and a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(state: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file atomically (`atomic_write`)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch checkpoint (a state dict, or a dict holding
    one under "state_dict" as open_clip's training checkpoints do)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return {k.removeprefix("module."): v for k, v in obj.items()}


def wise_ft(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Weight-space ensemble (WiSE-FT): (1 - alpha) * zero_shot + alpha * fine_tuned, per tensor.
    Non-floating tensors (buffers such as position ids) must agree and are taken as they are."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    if zero_shot.keys() != fine_tuned.keys():
        missing = sorted(set(zero_shot) ^ set(fine_tuned))[:5]
        raise InputError(f"zero-shot and fine-tuned checkpoints hold different tensors, e.g. {missing}")
    out = {}
    for k, a in zero_shot.items():
        b = fine_tuned[k]
        if a.shape != b.shape:
            raise InputError(f"tensor {k} has shape {tuple(a.shape)} in the zero-shot and {tuple(b.shape)} in the fine-tuned checkpoint")
        if a.is_floating_point():
            out[k] = ((1 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
        else:
            if not torch.equal(a, b):
                raise ValueError(f"non-floating tensor {k} differs between the checkpoints")
            out[k] = a.clone()
    return out
