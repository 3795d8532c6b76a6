"""`fitclip train`'s settings: the TrainConfig dataclass (each field a flag, with its help), the
command line parsed into it, and every check of its values in one place (`validate`), made
before a model is loaded or a video decoded."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch

from .errors import InputError, existing_dir, existing_file, pretrained_path


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """The run's settings; each is a `fitclip train` flag (--train-csv for train_csv, ...)."""
    out_dir: str = field(metadata={"help": "folder for checkpoints, log.jsonl and loss.png (created)"})
    train_csv: str | None = _opt(None, "labeled clips: a CSV with video path and caption columns (or --train-shards)")
    train_shards: str | None = _opt(None, "labeled clips as webdataset shards in video2dataset's layout (<key>.mp4, "
                                          "<key>.txt): a brace pattern, e.g. 'data/shard-{000000..000099}.tar' "
                                          "(`fitclip shards` writes them from a CSV)")
    unlabeled_shards: str | None = _opt(None, "unlabeled clips as shards (with --train-shards; their captions are "
                                              "not used as labels)")
    val_shards: str | None = _opt(None, "validation clips as shards (with --train-shards): the mean-pooled loss after "
                                        "every epoch; the best is kept")
    model: str = _opt("ViT-B-16", "open_clip architecture name")
    pretrained: str | None = _opt("openai", "open_clip pretrained tag or checkpoint file; 'none' for random init")
    video_root: str | None = _opt(None, "folder the CSVs' video paths are relative to")
    unlabeled_csv: str | None = _opt(None, "unlabeled clips for the distillation term (FitCLIP's student-teacher)")
    class_prompts: str | None = _opt(None, "file of class names, one per line: the unlabeled clips' texts become "
                                           "'a video of {name}.' (soft pseudo-labels over classes)")
    val_csv: str | None = _opt(None, "mean-pooled InfoNCE on these clips after every epoch; the best is kept")
    num_frames: int = _opt(4, "frames pooled per clip (k)")
    candidate_frames: int = _opt(0, "decoded candidate frames for top-k temporal sampling (0: = num_frames)")
    loss: str = _opt("infonce", "labeled loss: 'infonce' (CLIP's, FitCLIP's recipe) or 'siglip' (the pairwise sigmoid "
                                "loss, learnable scale and bias, SigLIP's initialisation scale 10 and bias -10 unless "
                                "the checkpoint brings a bias)")
    loss_pooling: str = _opt("mean", "'mean': the loss of mean-pooled embeddings; 'topk': of top-k pooled frame "
                                     "scores (video_contrastive_loss for InfoNCE)")
    pool_k: int = _opt(1, "frames per pair for --loss-pooling topk")
    batch_size: int = _opt(8, "labeled clips per process and step")
    unlabeled_batch_size: int = _opt(8, "unlabeled clips per process and step")
    epochs: int = _opt(1, "passes over the labeled clips")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: run all epochs)")
    lr: float = _opt(3e-6, "AdamW learning rate (the released recipe's)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    schedule: str = _opt("constant", "learning-rate schedule after warm-up: 'constant' or 'cosine'")
    temperature: float = _opt(0.015, "fixed softmax temperature (logit scale 1 / temperature; with --loss siglip "
                                     "only the distillation's)")
    learn_temperature: bool = _opt(False, "learn the logit scale instead of fixing it (always learned with "
                                          "--loss siglip)")
    labeled_weight: float = _opt(0.9999, "weight of the labeled InfoNCE")
    unlabeled_weight: float = _opt(0.0001, "weight of the distillation term")
    grad_accum: int = _opt(1, "batches per optimizer step")
    workers: int = _opt(0, "DataLoader worker processes decoding each data stream (labeled, unlabeled)")
    decode_device: str = _opt("cpu", "'cpu', or 'cuda': torchcodec's GPU decoder (NVDEC), in the main process")
    seed: int = _opt(0, "seed of the data order, frame sampling and initialisation")
    device: str = _opt("cpu", "'cpu' or 'cuda' (under torchrun: each rank its local GPU)")
    resume: bool = _opt(False, "continue from out_dir's last checkpoint")
    log_every: int = _opt(1, "write a log.jsonl record every this many steps")
    save_every_steps: int = _opt(0, "checkpoint every this many optimizer steps (0: by time only)")
    save_every_minutes: float = _opt(30.0, "checkpoint when this many minutes passed since the last one (0: off); "
                                           "also at each epoch end, at the end, and on SIGTERM/SIGINT")
    keep_last: int = _opt(1, "step checkpoints kept on disk (last.safetensors always names the newest)")
    precision: str = _opt("auto", "'bf16' (autocast; the frozen teacher stored in bf16), 'fp32', or 'auto': "
                                  "bf16 on CUDA, fp32 on the CPU")
    grad_clip_norm: float = _opt(0.0, "clip the gradients' global norm to this (0: no clipping; the norm is "
                                      "logged either way)")
    grad_checkpointing: bool = _opt(False, "recompute the encoders' activations in the backward (open_clip's "
                                           "set_grad_checkpointing): less memory, one more forward")
    grad_cache_chunk: int = _opt(0, "gradient caching: encode the step's clips this many at a time (no autograd), "
                                    "compute the losses over the whole batch, then re-encode each chunk with autograd "
                                    "and back-propagate the cached embedding gradients: the whole batch's gradients "
                                    "with one chunk's activations in memory, for one more forward (0: off)")
    compile: bool = _opt(False, "torch.compile the encoders (the step's student forward and the teacher's): "
                                "faster steps once the first ones have compiled them (minutes on a CPU)")
    dump_grads: str | None = _opt(None, "write the first step's (all-reduced) gradients here (tests, debugging)")


def parse_args(argv=None, description: str = "") -> TrainConfig:
    """The command line (flags named after the fields) as a TrainConfig."""
    parser = argparse.ArgumentParser(prog="fitclip train", description=description)
    for f in dataclasses.fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        help = f.metadata["help"]
        if f.type in ("bool", bool):
            parser.add_argument(name, action="store_true", help=help)
        elif f.default is dataclasses.MISSING:
            parser.add_argument(name, required=True, help=help)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(name, type=typ, default=f.default, help=help + " (default: %(default)s)")
    args = parser.parse_args(argv)
    return TrainConfig(**{k: (None if v in ("none", "None") else v) for k, v in vars(args).items()})


def validate(cfg: TrainConfig) -> None:
    """Every value the run depends on, checked before anything is loaded: the choices
    (errors.InputError naming the flag) and every path flag (it exists)."""
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise InputError(f"--precision must be 'auto', 'bf16' or 'fp32', got {cfg.precision!r}")
    if cfg.loss not in ("infonce", "siglip"):
        raise InputError(f"--loss must be 'infonce' or 'siglip', got {cfg.loss!r}")
    if cfg.grad_cache_chunk < 0:
        raise InputError(f"--grad-cache-chunk must be >= 0 (clips per chunk; 0: off), got {cfg.grad_cache_chunk}")
    if bool(cfg.train_csv) == bool(cfg.train_shards):
        raise InputError("give the labeled clips as --train-csv or as --train-shards (one of them)")
    for flag, value in (("--unlabeled-shards", cfg.unlabeled_shards), ("--val-shards", cfg.val_shards)):
        if value and not cfg.train_shards:
            raise InputError(f"{flag} goes with --train-shards (with --train-csv use the CSV flags)")
    if cfg.train_shards and (cfg.unlabeled_csv or cfg.val_csv):
        raise InputError("with --train-shards give the unlabeled and validation clips as --unlabeled-shards and "
                         "--val-shards; --unlabeled-csv and --val-csv go with --train-csv")
    if cfg.train_shards and cfg.schedule == "cosine" and not cfg.max_steps:
        raise InputError("--schedule cosine with --train-shards needs --max-steps (a stream's length is not known "
                         "before it is read)")
    check_paths(cfg)


def check_paths(cfg: TrainConfig) -> None:
    """Every path flag names what exists (errors.InputError naming the flag otherwise)."""
    from .shards import shard_urls

    if cfg.train_csv:
        existing_file("--train-csv", cfg.train_csv)
    for flag, value in (("--train-shards", cfg.train_shards), ("--unlabeled-shards", cfg.unlabeled_shards),
                        ("--val-shards", cfg.val_shards)):
        if value:
            shard_urls(flag, value)
    for flag, value in (("--unlabeled-csv", cfg.unlabeled_csv), ("--val-csv", cfg.val_csv),
                        ("--class-prompts", cfg.class_prompts)):
        if value:
            existing_file(flag, value)
    if cfg.video_root:
        existing_dir("--video-root", cfg.video_root)
    pretrained_path("--pretrained", cfg.pretrained)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --precision on this device (None: float32, no autocast)."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
