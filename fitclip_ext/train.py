"""FitCLIP fine-tuning of an open_clip model on video-caption data (`fitclip train`).

One step: labeled clips with their captions give the symmetric InfoNCE (`contrastive_loss`) over
mean-pooled frame embeddings (with top-k temporal sampling when more candidate frames than kept
frames are decoded: candidates are scored against the caption without gradient by
`select_frames`, and only the chosen frames are encoded with gradient); unlabeled clips are
distilled from the frozen teacher (the model as loaded): KL(teacher || student) over the
video x text score matrices, rows and columns, times the teacher's scale^2. Loss shares
0.9999 / 0.0001, fixed temperature 0.015, AdamW at 3e-6 by default (the released recipe).

Several processes: `torchrun --nproc_per_node N -m fitclip_ext.cli train ...` (or `torchrun
--nproc_per_node N $(which fitclip) train ...`) runs DistributedDataParallel, NCCL on GPUs and gloo
on CPUs; --batch-size and --unlabeled-batch-size are per process, embeddings are all-gathered with
gradient (fitclip_ext.ClipLoss for the labeled loss), and the gradients equal those of one process
running the whole batch. Rank 0 writes the logs and checkpoints.

Checkpoints are safetensors written atomically; `--resume` continues a killed run and reaches
the same state as an uninterrupted run with the same seed (data order and frame sampling are
functions of seed, epoch and index). Broken videos are skipped, counted and named in the log.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint
from . import model as fmodel
from .contrastive import contrastive_loss
from .data import (ClipDataset, EpochBatches, check_decode_device, collate, epoch_order, frame_preprocess,
                   load_caption_csv, split_camel_case)
from .distill import distillation_loss
from .distributed import ClipLoss, SigLipLoss
from .world import World
from .errors import existing_dir, existing_file, pretrained_path
from .frames import gather_frames, select_frames, topk_frame_similarity, video_contrastive_loss
from .sigmoid import sigmoid_loss


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """The run's settings; each is a `fitclip train` flag (--train-csv for train_csv, ...)."""
    train_csv: str = field(metadata={"help": "labeled clips: a CSV with video path and caption columns"})
    out_dir: str = field(metadata={"help": "folder for checkpoints, log.jsonl and loss.png (created)"})
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
    compile: bool = _opt(False, "torch.compile the encoders (the step's student forward and the teacher's): "
                                "faster steps once the first ones have compiled them (minutes on a CPU)")
    dump_grads: str | None = _opt(None, "write the first step's (all-reduced) gradients here (tests, debugging)")


# ----------------------------------------------------------------------------- losses

def frame_embeddings(model, frames, text_emb, k):
    """Unit frame embeddings [B, k, D]; with more frames than k, the k frames most similar to the
    caption are chosen without gradient and only they are encoded (FitCLIP's temporal sampling)."""
    return F.normalize(fmodel.encode_frames(model, choose_frames(model, frames, text_emb, k)), dim=-1)


def choose_frames(model, frames, text_emb, k):
    """The k frames of each clip [B, F, 3, H, W] to encode with gradient: all of them when F == k,
    otherwise the k most similar to the caption, scored without gradient (`select_frames`)."""
    if frames.shape[1] <= k:
        return frames
    if text_emb is None:
        raise ValueError("temporal sampling needs the captions' embeddings")
    with torch.no_grad():
        candidates = fmodel.encode_frames(model, frames)
        idx, _ = select_frames(candidates, text_emb.detach(), k)
    return gather_frames(frames, idx)


def video_embeddings(model, frames, text_emb, k):
    """Mean-pooled, normalised video embeddings [B, D] of the (selected) frames."""
    return F.normalize(frame_embeddings(model, frames, text_emb, k).mean(1), dim=-1)


class StepEncoder(torch.nn.Module):
    """Everything a step encodes with gradient in one forward (frames of labeled and unlabeled
    clips, captions and prompts), so DistributedDataParallel sees one forward per backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, tokens):
        return self.model.encode_image(images), self.model.encode_text(tokens)


def labeled_loss(frame_emb, text, scale, bias, cfg: TrainConfig, world: World):
    """The labeled loss over the global batch. Mean pooling: fitclip_ext.ClipLoss with local rows
    against all gathered columns (open_clip's local_loss + gather_with_grad), or
    fitclip_ext.SigLipLoss (local videos against all gathered captions, one fused pass); top-k
    pooling: the fused video InfoNCE over the gathered frames and captions, or SigLIP's loss over
    their top-k pooled scores (global B x B: small for video batches). Either way, DDP's mean of
    the ranks' gradients equals the single-process gradient of the whole batch."""
    k = min(cfg.pool_k, frame_emb.shape[1])
    if cfg.loss_pooling == "topk":
        frames_all, text_all = world.gather(frame_emb, True), world.gather(text, True)
        if cfg.loss == "siglip":
            logits = scale * topk_frame_similarity(text_all, frames_all, k).T + bias  # videos x captions
            return sigmoid_matrix_loss(logits)
        return video_contrastive_loss(frames_all, text_all, scale, k=k)  # top-k pooled logits, fused (no B x B x T)
    video = F.normalize(frame_emb.mean(1), dim=-1)
    if cfg.loss == "siglip":
        return SigLipLoss(rank=world.rank, world_size=world.world, dist_impl="gather")(video, text, scale, bias)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=world.rank, world_size=world.world)
    return loss_fn(video, text, scale)


def sigmoid_matrix_loss(logits):
    """SigLIP's loss of a square logits matrix, pair i on the diagonal, summed and divided by the rows."""
    z = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]


@torch.no_grad()
def validation_loss(model, tokenizer, ds, cfg: TrainConfig, device) -> float:
    """The mean-pooled labeled loss (InfoNCE or SigLIP's) over the validation clips in batches
    (uniform frames)."""
    model.eval()
    total, count = 0.0, 0
    for b0 in range(0, len(ds) - 1, cfg.batch_size):
        frames, caps, *_ = collate([ds[i] for i in range(b0, min(len(ds), b0 + cfg.batch_size))])
        if frames is None or len(caps) < 2:
            continue
        text = F.normalize(model.encode_text(tokenizer(caps).to(device)), dim=-1)
        video = video_embeddings(model, frames.to(device), text, cfg.num_frames)
        if cfg.loss == "siglip":
            total += sigmoid_loss(video, text, model.logit_scale.exp(), model.logit_bias).item() * len(caps)
        else:
            total += contrastive_loss(video, text, model.logit_scale.exp()).item() * len(caps)
        count += len(caps)
    model.train()
    return total / max(1, count)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine" and total > cfg.warmup_steps:
        p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, p)))
    return cfg.lr


# ----------------------------------------------------------------------------- one step

@dataclass
class Run:
    """What a step needs besides its batch: the models, the tokenizer, the optimizer, the process."""
    cfg: TrainConfig
    world: World
    model: torch.nn.Module
    encoder: torch.nn.Module     # StepEncoder, wrapped in DDP on several processes
    teacher: torch.nn.Module | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    prompts: list[str] | None    # class prompts: the unlabeled clips' texts
    total_steps: int
    amp_dtype: torch.dtype | None  # autocast dtype (None: fp32)


def unlabeled_batches(uds, cfg: TrainConfig, world: World, epoch: int, first: int, end: int) -> list[list[int]]:
    """This rank's unlabeled clips for labeled batches [first, end) of the epoch: batch b takes
    the next unlabeled_batch_size clips of the epoch's order after the other ranks' (wrapping)."""
    uorder = epoch_order(len(uds), cfg.seed + 1, epoch)
    ub = cfg.unlabeled_batch_size
    return [[uorder[((b * world.world + world.rank) * ub + j) % len(uds)] for j in range(ub)]
            for b in range(first, end)]


def unlabeled_clips(run: Run, batch):
    """A collated unlabeled batch -> (frames [u, T, 3, H, W] or None, texts, broken paths);
    every rank keeps the same number u of clips."""
    if batch is None:
        return None, None, []
    frames, caps, broken, _ = batch
    u = run.world.min(0 if frames is None else len(caps))
    if u == 0:
        return None, None, broken
    return (frames[:u].to(run.world.device, non_blocking=True), run.prompts or caps[:u],  # prompts: soft pseudo-labels
            broken)


def unlabeled_loss(run: Run, img_emb, txt_emb, uframes, utokens, scale):
    """FitCLIP's distillation term: the student's video x text scores of the unlabeled clips pulled
    towards the frozen teacher's, over the whole (gathered) batch."""
    cfg, world, k = run.cfg, run.world, run.cfg.num_frames
    u = uframes.shape[0]
    uvideo_s = F.normalize(F.normalize(img_emb.reshape(u, k, -1), dim=-1).mean(1), dim=-1)
    utext_s = F.normalize(txt_emb, dim=-1)
    with torch.no_grad():
        utext_t = F.normalize(run.teacher.encode_text(utokens), dim=-1)
        # the teacher scores the same frames the student sees (unlabeled clips are decoded at
        # num_frames: no caption-driven selection)
        uvideo_t = video_embeddings(run.teacher, uframes, None, k)
        t_scale = run.teacher.logit_scale.exp() if cfg.learn_temperature else 1 / cfg.temperature
    # the whole batch's score matrix on every rank (FitCLIP all-gathers the embeddings); class
    # prompts are the same on every rank
    uvideo_s, uvideo_t = world.gather(uvideo_s, True), world.gather(uvideo_t, False)
    if not run.prompts:
        utext_s, utext_t = world.gather(utext_s, True), world.gather(utext_t, False)
    # in the student's dtype (bf16 under autocast): the fused loss takes half-precision inputs
    # and computes in fp32 inside, so nothing is upcast here
    dt = uvideo_s.dtype
    return distillation_loss(uvideo_s, utext_s.to(dt), uvideo_t.to(dt), utext_t.to(dt), scale, t_scale)


def train_step(run: Run, frames, captions, unlabeled, step: int, apply: bool) -> dict:
    """Forward and backward of one batch (labeled frames [n, F, 3, H, W] with their captions, and
    the unlabeled clips from `unlabeled_clips`), then, when `apply`, gradient clipping and the
    optimizer step at step's learning rate. Returns the losses (tensors), the gradient norm (when
    applied) and the seconds of forward+backward and of the optimizer."""
    cfg, model, device, k = run.cfg, run.model, run.world.device, run.cfg.num_frames
    t0 = time.perf_counter()
    n = len(captions)
    uframes, utexts, _ = unlabeled
    with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        tokens = run.tokenizer(captions).to(device)
        if frames.shape[1] > k:  # FitCLIP's temporal sampling, scored without gradient
            with torch.no_grad():
                sel_text = F.normalize(model.encode_text(tokens), dim=-1)
            frames = choose_frames(model, frames, sel_text, k)
        images, texts_tok = [frames.flatten(0, 1)], [tokens]
        if uframes is not None:
            utokens = run.tokenizer(utexts).to(device)
            images.append(uframes.flatten(0, 1))
            texts_tok.append(utokens)
        # one forward through the (DDP-wrapped) encoder for everything that gets a gradient
        img_emb, txt_emb = run.encoder(torch.cat(images), torch.cat(texts_tok))
        frame_emb = F.normalize(img_emb[:n * k].reshape(n, k, -1), dim=-1)
        text = F.normalize(txt_emb[:n], dim=-1)
        scale = model.logit_scale.exp()
        loss_l = labeled_loss(frame_emb, text, scale, getattr(model, "logit_bias", None), cfg, run.world)
        loss = cfg.labeled_weight * loss_l
        loss_u = torch.zeros(())
        if uframes is not None:
            # (with SigLIP's scale for the labeled loss, the distillation keeps FitCLIP's softmax temperature)
            d_scale = scale if cfg.loss == "infonce" else 1 / cfg.temperature
            loss_u = unlabeled_loss(run, img_emb[n * k:], txt_emb[n:], uframes, utokens, d_scale)
            loss = loss + cfg.unlabeled_weight * loss_u
    (loss / cfg.grad_accum).backward()
    out = {"loss": loss, "labeled_loss": loss_l, "unlabeled_loss": loss_u}
    t1 = time.perf_counter()
    if apply:
        if cfg.dump_grads and step == 0 and run.world.main:
            grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
            fmodel.atomic_write(Path(cfg.dump_grads), lambda tmp: torch.save(grads, tmp))
        params = [p for p in model.parameters() if p.grad is not None]
        out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm or float("inf")))
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, run.total_steps)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    out["fwd_bwd_s"], out["optimizer_s"] = t1 - t0, time.perf_counter() - t1
    return out


# ----------------------------------------------------------------------------- the loop

def setup(cfg: TrainConfig):
    """(Run, labeled dataset, validation dataset or None, unlabeled dataset or None, resume
    state (step, epoch, batch in epoch, best validation loss), output folder)."""
    world = World(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = world.device
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {cfg.precision!r}")
    if cfg.loss not in ("infonce", "siglip"):
        raise ValueError(f"--loss must be 'infonce' or 'siglip', got {cfg.loss!r}")
    amp_dtype = torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") \
        else None
    labeled = load_caption_csv(cfg.train_csv, cfg.video_root)
    check_decode_device(cfg.decode_device, cfg.workers, labeled[0].video if labeled else None)  # before any model
    model, _, _, tokenizer = fmodel.create(cfg.model, cfg.pretrained, device=device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    teacher = None
    if cfg.unlabeled_csv:
        teacher, *_ = fmodel.create(cfg.model, cfg.pretrained, device=device)
        teacher.load_state_dict(model.state_dict())
        teacher.eval().requires_grad_(False)
        if amp_dtype is not None:  # frozen: stored in the autocast dtype (half the memory)
            teacher.to(amp_dtype)
        if cfg.compile:  # the instance's methods, so state_dict and the checkpoints are unchanged
            teacher.encode_image = torch.compile(teacher.encode_image)
            teacher.encode_text = torch.compile(teacher.encode_text)
    if cfg.loss == "siglip" and fmodel.add_logit_bias(model, -10.0):  # SigLIP's initialisation
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
    if world.main and not (out / "zero_shot.safetensors").exists():  # the original model, for `fitclip wise`
        fmodel.save_checkpoint(model.state_dict(), out / "zero_shot.safetensors")
    model.logit_scale.requires_grad_(cfg.learn_temperature or cfg.loss == "siglip")
    if not cfg.learn_temperature and cfg.loss == "infonce":
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / cfg.temperature))
    preprocess = frame_preprocess(model)
    n_decode = max(cfg.num_frames, cfg.candidate_frames)
    ds = ClipDataset(labeled, preprocess, n_decode, "random", cfg.seed, cfg.decode_device)
    vds = ClipDataset(load_caption_csv(cfg.val_csv, cfg.video_root), preprocess, cfg.num_frames, "uniform",
                      cfg.seed) if cfg.val_csv else None
    prompts = None
    if cfg.class_prompts:
        names = [n.strip() for n in Path(cfg.class_prompts).read_text().splitlines() if n.strip()]
        prompts = [f"a video of {split_camel_case(n)}." for n in names]
    uds = None
    if cfg.unlabeled_csv:
        uds = ClipDataset(load_caption_csv(cfg.unlabeled_csv, cfg.video_root), preprocess, cfg.num_frames,
                          "random", cfg.seed + 1, cfg.decode_device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # batch_size clips per process and step: the global batch is batch_size x world size
    steps_per_epoch = len(ds) // (cfg.batch_size * world.world * cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    resume = (0, 0, 0, float("inf"))
    saved = checkpoint.load(out, device) if cfg.resume else None
    if saved is not None:
        weights, state = saved
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        resume = state["step"], state["epoch"], state["batch_in_epoch"], state["best_val"]
    encoder = StepEncoder(model)
    if world.world > 1:  # broadcasts rank 0's weights, averages gradients in buckets during backward
        encoder = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # (after DDP: compiled graphs break at its gradient buckets, so all-reduce still overlaps)
        encoder = torch.compile(encoder)
    run = Run(cfg, world, model, encoder, teacher, tokenizer, optimizer, prompts, total, amp_dtype)
    return run, ds, vds, uds, resume, out


def rank_batches(n: int, cfg: TrainConfig, world: World, epoch: int) -> list[list[int]]:
    """This rank's slice of every global batch of the epoch (fixed by seed and epoch: resumable)."""
    order = epoch_order(n, cfg.seed, epoch)
    global_bs = cfg.batch_size * world.world
    return [order[i + world.rank * cfg.batch_size:i + (world.rank + 1) * cfg.batch_size]
            for i in range(0, len(order) - global_bs + 1, global_bs)]


class _StopSignal:
    """SIGTERM/SIGINT during training: remembered, acted on at the next step boundary (a
    checkpoint, then exit); the previous handlers come back afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Loaders:
    """The labeled DataLoader and the unlabeled one beside it (None without unlabeled data), built
    once for the run: worker processes (persistent across epochs) decode while the model trains,
    prefetching, into pinned memory on CUDA. `epoch` points both at this rank's batches [first,
    end) of an epoch, fixed by seed, epoch and rank (so a run resumes mid-epoch), and yields
    (labeled batch, unlabeled batch or None) pairs."""

    def __init__(self, ds, uds, cfg: TrainConfig, world: World):
        self.ds, self.uds, self.cfg, self.world = ds, uds, cfg, world
        pin = world.device.type == "cuda" and cfg.decode_device == "cpu"  # (GPU-decoded frames are there already)
        self.samplers = [EpochBatches(), EpochBatches()]

        def loader(dataset, sampler):
            return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                               num_workers=cfg.workers, pin_memory=pin,
                                               persistent_workers=cfg.workers > 0,
                                               prefetch_factor=4 if cfg.workers else None)

        self.labeled = loader(ds, self.samplers[0])
        self.unlabeled = loader(uds, self.samplers[1]) if uds is not None and len(uds) else None

    def epoch(self, batches: list[list[int]], epoch: int, first: int, end: int):
        self.samplers[0].set(epoch, batches[first:end])
        if self.unlabeled is None:
            return ((x, None) for x in self.labeled)
        self.samplers[1].set(epoch, unlabeled_batches(self.uds, self.cfg, self.world, epoch, first, end))
        return zip(self.labeled, self.unlabeled)


def train(cfg: TrainConfig) -> dict:
    from tqdm import tqdm

    run, ds, vds, uds, (step, start_epoch, start_batch, best), out = setup(cfg)
    world, model = run.world, run.model
    ckpt = checkpoint.Checkpointer(out, cfg.save_every_steps, cfg.save_every_minutes, cfg.keep_last, world.main)
    log = open(out / "log.jsonl", "a") if world.main else open(os.devnull, "w")
    history = []
    broken_all: list[str] = []
    stop = _StopSignal()
    epoch, b = start_epoch, start_batch
    data = Loaders(ds, uds, cfg, world)
    t_start = time.perf_counter()

    def stopped(bar, signum: int, step: int, epoch: int | None = None, batch: int | None = None):
        """After SIGTERM/SIGINT: a checkpoint at this step (written already, unless the position
        in the data is given), then exit."""
        bar.close()
        log.close()
        if epoch is not None:
            ckpt.save(model, run.optimizer, step, {"epoch": epoch, "batch_in_epoch": batch, "best_val": best},
                      wait=True)
        ckpt.wait()
        print(f"fitclip train: {signal.Signals(signum).name} received; wrote the checkpoint of step {step} to "
              f"{out} (resume with --resume)", flush=True)
        raise SystemExit(128 + signum)

    with stop:
        for epoch in range(start_epoch, cfg.epochs):
            epoch_batches = rank_batches(len(ds), cfg, world, epoch)
            first = start_batch if epoch == start_epoch else 0
            end = len(epoch_batches) - len(epoch_batches) % cfg.grad_accum
            batches = data.epoch(epoch_batches, epoch, first, end)
            bar = tqdm(total=end - first, desc=f"epoch {epoch}", leave=False, disable=not world.main or None,
                       unit="batch")
            broken: list[str] = []
            model.train()
            b = first
            t_wait = time.perf_counter()
            it = iter(batches)
            while True:
                try:
                    (frames, captions, bad, _), ubatch = next(it)
                except StopIteration:
                    break
                except Exception:
                    if stop.signum:  # Ctrl-C reaches the DataLoader workers too: stop cleanly all the same
                        stopped(bar, stop.signum, step, epoch, b - b % cfg.grad_accum)
                    raise
                if cfg.max_steps and step >= cfg.max_steps:
                    break
                data_wait = time.perf_counter() - t_wait
                t0 = time.perf_counter()
                broken += bad
                # Every rank keeps the same number of clips (a broken video shrinks a local batch):
                # ClipLoss pairs column r * n + i with rank r's row i.
                n = world.min(0 if frames is None else len(captions))
                u = unlabeled_clips(run, ubatch)
                broken += u[2]
                apply = (b + 1) % cfg.grad_accum == 0
                b += 1
                bar.update(1)
                if n == 0:
                    t_wait = time.perf_counter()
                    continue
                r = train_step(run, frames[:n].to(world.device, non_blocking=True), captions[:n], u, step, apply)
                if apply:
                    step += 1
                    progress = {"epoch": epoch, "batch_in_epoch": b, "best_val": best}
                    signalled = world.max(stop.signum)
                    # (the epoch's last step is saved by the epoch-end checkpoint right after)
                    scheduled = ckpt.due(step) and b < end
                    ckpt_s = ckpt.save(model, run.optimizer, step, progress, wait=bool(signalled)) \
                        if scheduled or signalled else 0.0
                    seconds = data_wait + time.perf_counter() - t0
                    # the loss of the global batch: ClipLoss's per-rank losses average to it
                    rec = {"step": step, "epoch": epoch, "loss": world.mean(r["loss"].item()),
                           "labeled_loss": world.mean(r["labeled_loss"].item()),
                           "unlabeled_loss": float(r["unlabeled_loss"].detach()), "lr": run.optimizer.param_groups[0]["lr"],
                           "seconds": seconds, "data_wait_s": data_wait, "fwd_bwd_s": r["fwd_bwd_s"],
                           "optimizer_s": r["optimizer_s"], "checkpoint_s": ckpt_s, "grad_norm": r["grad_norm"],
                           "clips_per_s": n * world.world / max(1e-9, seconds)}
                    if world.device.type == "cuda":
                        rec["peak_mem_mb"] = torch.cuda.max_memory_allocated(world.device) / 2**20
                    history.append(rec)
                    if step % cfg.log_every == 0 or signalled:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", clips_s=f"{rec['clips_per_s']:.1f}")
                    if signalled:
                        stopped(bar, signalled, step)
                t_wait = time.perf_counter()
            bar.close()
            if broken and world.main:
                log.write(json.dumps({"epoch": epoch, "broken_videos": sorted(set(broken))}) + "\n")
                print(f"epoch {epoch}: skipped {len(set(broken))} unreadable videos: {sorted(set(broken))[:10]}")
                broken_all += broken
            if vds is not None and world.main:
                val = validation_loss(model, run.tokenizer, vds, cfg, world.device)
                log.write(json.dumps({"epoch": epoch, "step": step, "val_loss": val}) + "\n")
                if val < best:
                    best = val
                    fmodel.save_checkpoint(model.state_dict(), out / "best.safetensors",
                                           metadata={"step": str(step), "val_loss": str(val)})
            if cfg.max_steps and step >= cfg.max_steps:
                break  # mid-epoch: resume at batch b of this epoch
            epoch, b = epoch + 1, 0  # the epoch is done: resume at the next one
            ckpt.save(model, run.optimizer, step, {"epoch": epoch, "batch_in_epoch": 0, "best_val": best})
        if ckpt.last_step != step:  # the end of training
            ckpt.save(model, run.optimizer, step, {"epoch": epoch, "batch_in_epoch": b, "best_val": best})
        ckpt.wait()
    # where the run's time went (this process's part of it since resuming): the training loop's
    # wall time, and what the checkpoints cost it (snapshots to host memory and waits for writes)
    summary = {"steps": step, "steps_run": len(history), "wall_s": time.perf_counter() - t_start,
               "checkpoint_s": ckpt.blocked_s, "checkpoints": ckpt.written,
               **{key: sum(r[key] for r in history) for key in ("data_wait_s", "fwd_bwd_s", "optimizer_s")}}
    log.write(json.dumps({"summary": summary}) + "\n")
    log.close()
    if world.main:
        plot_history(out / "log.jsonl", out / "loss.png")
    if world.world > 1:
        dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    return {"steps": step, "history": history, "broken_videos": sorted(set(broken_all)), "out_dir": str(out),
            "summary": summary}


def plot_history(log_path: Path, png: Path) -> None:
    rows = [json.loads(line) for line in open(log_path) if '"loss"' in line]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["labeled_loss"] for r in rows], label="labeled loss")
    if any(r["unlabeled_loss"] for r in rows):
        ax.plot([r["step"] for r in rows], [r["unlabeled_loss"] for r in rows], label="distillation (KL x scale^2)")
    val = [json.loads(line) for line in open(log_path) if '"val_loss"' in line]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation InfoNCE")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="fitclip train", description=__doc__.splitlines()[0])
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
    cfg = TrainConfig(**{k: (None if v in ("none", "None") else v) for k, v in vars(args).items()})
    check_paths(cfg)  # before any model is loaded or video decoded
    return train(cfg)


def check_paths(cfg: TrainConfig) -> None:
    """Every path flag names what exists (errors.InputError naming the flag otherwise)."""
    existing_file("--train-csv", cfg.train_csv)
    for flag, value in (("--unlabeled-csv", cfg.unlabeled_csv), ("--val-csv", cfg.val_csv),
                        ("--class-prompts", cfg.class_prompts)):
        if value:
            existing_file(flag, value)
    if cfg.video_root:
        existing_dir("--video-root", cfg.video_root)
    pretrained_path("--pretrained", cfg.pretrained)
