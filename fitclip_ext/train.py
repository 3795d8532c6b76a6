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

import contextlib
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
from .data import ClipDataset, Loaders, check_decode_device, frame_preprocess, load_caption_csv, rank_batches, \
    split_camel_case
from .shards import ShardLoaders, ShardStream, check_slots, shard_urls
from .losses import choose_frames, labeled_loss, unlabeled_loss, validation_loss
from .train_config import TrainConfig, amp_dtype, parse_args, validate
from .world import World


class StepEncoder(torch.nn.Module):
    """Everything a step encodes with gradient in one forward (frames of labeled and unlabeled
    clips, captions and prompts), so DistributedDataParallel sees one forward per backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, tokens):
        return self.model.encode_image(images), self.model.encode_text(tokens)


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_encode(run: "Run", images: torch.Tensor, tokens: torch.Tensor, frames_per_clip: int):
    """Gradient caching (GradCache, Gao et al. 2021) over the step's encoder input: (image
    embeddings, text embeddings, backward). With --grad-cache-chunk N and more than N clips, the
    clips are encoded N at a time without autograd (the texts split into as many chunks, the
    last always holding at least one), so the returned embeddings are leaves that the whole-batch
    losses differentiate; `backward(loss)` then back-propagates the loss to them, encodes each
    chunk again with autograd (the random state of its first encoding restored: dropout and
    anything random repeat exactly) and back-propagates the cached embedding gradients through
    it. The encoders only ever hold one chunk's activations; the gradients are those of the
    whole batch at once. Under DistributedDataParallel the chunks but the last run in no_sync:
    the weights' gradients are all-reduced once per step."""
    chunk = run.cfg.grad_cache_chunk
    clips = images.shape[0] // frames_per_clip
    if not chunk or chunk >= clips:
        img, txt = run.encoder(images, tokens)
        return img, txt, lambda loss: loss.backward()
    parts = -(-clips // chunk)
    img_rows = [min(chunk, clips - i * chunk) * frames_per_clip for i in range(parts)]
    base, extra = divmod(tokens.shape[0], parts)  # the remainder to the last chunks: the last has a text
    txt_rows = [base + (i >= parts - extra) for i in range(parts)]
    img_chunks, txt_chunks = images.split(img_rows), tokens.split(txt_rows)
    device = run.world.device
    states, img_out, txt_out = [], [], []
    with torch.no_grad():
        for im, tk in zip(img_chunks, txt_chunks):
            states.append(_rng_state(device))
            ie, te = _encode_parts(run, im, tk)
            img_out.append(ie)
            txt_out.append(te)
    after = _rng_state(device)
    img_emb = torch.cat(img_out).requires_grad_(True)
    txt_emb = torch.cat([t for t in txt_out if t is not None]).requires_grad_(True)
    amp = run.amp_dtype

    def backward(loss: torch.Tensor) -> None:
        loss.backward()  # to the cached embeddings (and parameters used outside the encoders: the logit scale)
        img_grad = torch.zeros_like(img_emb) if img_emb.grad is None else img_emb.grad
        txt_grad = torch.zeros_like(txt_emb) if txt_emb.grad is None else txt_emb.grad
        gi, gt = img_grad.split(img_rows), txt_grad.split([r for r in txt_rows if r])
        ti = 0
        for i, (im, tk) in enumerate(zip(img_chunks, txt_chunks)):
            last = i == parts - 1
            sync = contextlib.nullcontext() if last or not hasattr(run.encoder, "no_sync") else run.encoder.no_sync()
            _set_rng_state(states[i], device)
            with sync:
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    ie, te = _encode_parts(run, im, tk)
                outs, grads = [ie], [gi[i]]
                if te is not None:
                    outs.append(te)
                    grads.append(gt[ti])
                    ti += 1
                torch.autograd.backward(outs, grads)
        _set_rng_state(after, device)

    return img_emb, txt_emb, backward


def _encode_parts(run: "Run", images: torch.Tensor, tokens: torch.Tensor):
    """The step encoder on a chunk; a chunk without texts encodes its images only."""
    if tokens.shape[0]:
        return run.encoder(images, tokens)
    return run.model.encode_image(images), None


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
        # (or, with --grad-cache-chunk, chunk by chunk: cached_encode)
        img_emb, txt_emb, backward = cached_encode(run, torch.cat(images), torch.cat(texts_tok), k)
        frame_emb = F.normalize(img_emb[:n * k].reshape(n, k, -1), dim=-1)
        text = F.normalize(txt_emb[:n], dim=-1)
        scale = model.logit_scale.exp()
        loss_l = labeled_loss(frame_emb, text, scale, getattr(model, "logit_bias", None), cfg, run.world)
        loss = cfg.labeled_weight * loss_l
        loss_u = torch.zeros(())
        if uframes is not None:
            # (with SigLIP's scale for the labeled loss, the distillation keeps FitCLIP's softmax temperature)
            d_scale = scale if cfg.loss == "infonce" else 1 / cfg.temperature
            loss_u = unlabeled_loss(img_emb[n * k:], txt_emb[n:], uframes, utokens, d_scale, run.teacher, cfg,
                                    run.world, shared_prompts=bool(run.prompts))
            loss = loss + cfg.unlabeled_weight * loss_u
    backward(loss / cfg.grad_accum)
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
    validate(cfg)
    amp = amp_dtype(cfg, device)
    if cfg.train_shards:  # (each reader a shard of its own, checked before any model)
        urls = {f: shard_urls(f, v) for f, v in (("--train-shards", cfg.train_shards),
                                                  ("--unlabeled-shards", cfg.unlabeled_shards)) if v}
        for flag, u in urls.items():
            check_slots(flag, u, world.world, cfg.workers)
        labeled = []
    else:
        labeled = load_caption_csv(cfg.train_csv, cfg.video_root)
    check_decode_device(cfg.decode_device, cfg.workers, labeled[0].video if labeled else None)  # before any model
    model, _, _, tokenizer = fmodel.create(cfg.model, cfg.pretrained, device=device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    teacher = None
    if cfg.unlabeled_csv or cfg.unlabeled_shards:
        teacher, *_ = fmodel.create(cfg.model, cfg.pretrained, device=device)
        teacher.load_state_dict(model.state_dict())
        teacher.eval().requires_grad_(False)
        if amp is not None:  # frozen: stored in the autocast dtype (half the memory)
            teacher.to(amp)
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
    if cfg.train_shards:
        ds = ShardStream(urls["--train-shards"], preprocess, n_decode, "random", cfg.seed, cfg.batch_size,
                         world.rank, world.world)
    else:
        ds = ClipDataset(labeled, preprocess, n_decode, "random", cfg.seed, cfg.decode_device)
    vds = ClipDataset(load_caption_csv(cfg.val_csv, cfg.video_root), preprocess, cfg.num_frames, "uniform",
                      cfg.seed) if cfg.val_csv else None
    if cfg.val_shards:  # (read by rank 0 alone, in its own process)
        vds = ShardStream(shard_urls("--val-shards", cfg.val_shards), preprocess, cfg.num_frames, "uniform", cfg.seed,
                          cfg.batch_size, shuffle_buffer=0)
    prompts = None
    if cfg.class_prompts:
        names = [n.strip() for n in Path(cfg.class_prompts).read_text().splitlines() if n.strip()]
        prompts = [f"a video of {split_camel_case(n)}." for n in names]
    uds = None
    if cfg.unlabeled_shards:
        uds = ShardStream(urls["--unlabeled-shards"], preprocess, cfg.num_frames, "random", cfg.seed + 1,
                          cfg.unlabeled_batch_size, world.rank, world.world)
    if cfg.unlabeled_csv:
        uds = ClipDataset(load_caption_csv(cfg.unlabeled_csv, cfg.video_root), preprocess, cfg.num_frames,
                          "random", cfg.seed + 1, cfg.decode_device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # batch_size clips per process and step: the global batch is batch_size x world size
    # (a stream's length is not known before it is read: with shards, total is --max-steps or 0)
    steps_per_epoch = 0 if cfg.train_shards else len(ds) // (cfg.batch_size * world.world * cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    resume = (0, 0, 0, float("inf"), None)
    saved = checkpoint.load(out, device) if cfg.resume else None
    if saved is not None:
        weights, state = saved
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        resume = state["step"], state["epoch"], state["batch_in_epoch"], state["best_val"], state.get("stream")
    encoder = StepEncoder(model)
    if world.world > 1:  # broadcasts rank 0's weights, averages gradients in buckets during backward
        encoder = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # (after DDP: compiled graphs break at its gradient buckets, so all-reduce still overlaps)
        encoder = torch.compile(encoder)
    run = Run(cfg, world, model, encoder, teacher, tokenizer, optimizer, prompts, total, amp)
    return run, ds, vds, uds, resume, out


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


@dataclass
class Progress:
    """Where the run is (what a checkpoint records besides the weights and the optimizer) and
    what it has produced so far."""
    step: int
    epoch: int
    batch: int  # in the epoch
    best_val: float
    history: list = field(default_factory=list)
    broken: list = field(default_factory=list)
    stream: dict | None = None  # with shards: each reader's batches taken so far in the epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch, "best_val": self.best_val, "stream": self.stream}


def step_record(run: Run, r: dict, p: Progress, n: int, data_wait: float, seconds: float, ckpt_s: float) -> dict:
    """The log record of an applied step (the global batch's losses: ClipLoss's per-rank losses
    average to it)."""
    world = run.world
    rec = {"step": p.step, "epoch": p.epoch, "loss": world.mean(r["loss"].item()),
           "labeled_loss": world.mean(r["labeled_loss"].item()), "unlabeled_loss": float(r["unlabeled_loss"].detach()),
           "lr": run.optimizer.param_groups[0]["lr"], "seconds": seconds, "data_wait_s": data_wait,
           "fwd_bwd_s": r["fwd_bwd_s"], "optimizer_s": r["optimizer_s"], "checkpoint_s": ckpt_s,
           "grad_norm": r["grad_norm"], "clips_per_s": n * world.world / max(1e-9, seconds)}
    if world.device.type == "cuda":
        rec["peak_mem_mb"] = torch.cuda.max_memory_allocated(world.device) / 2**20
    return rec


def end_of_epoch(run: Run, vds, p: Progress, broken: list, log, out: Path) -> None:
    """The epoch's unreadable videos into the log; the validation loss, keeping best.safetensors."""
    if broken and run.world.main:
        log.write(json.dumps({"epoch": p.epoch, "broken_videos": sorted(set(broken))}) + "\n")
        print(f"epoch {p.epoch}: skipped {len(set(broken))} unreadable videos: {sorted(set(broken))[:10]}")
        p.broken += broken
    if vds is not None and run.world.main:
        val = validation_loss(run.model, run.tokenizer, vds, run.cfg, run.world.device)
        log.write(json.dumps({"epoch": p.epoch, "step": p.step, "val_loss": val}) + "\n")
        if val < p.best_val:
            p.best_val = val
            fmodel.save_checkpoint(run.model.state_dict(), out / "best.safetensors",
                                   metadata={"step": str(p.step), "val_loss": str(val)})


def stop_now(run: Run, ckpt, log, bar, signum: int, p: Progress, save: bool) -> None:
    """After SIGTERM/SIGINT: a checkpoint at this step (written already unless save), then exit."""
    bar.close()
    log.close()
    if save:
        ckpt.save(run.model, run.optimizer, p.step, p.state(), wait=True)
    ckpt.wait()
    print(f"fitclip train: {signal.Signals(signum).name} received; wrote the checkpoint of step {p.step} to "
          f"{ckpt.out} (resume with --resume)", flush=True)
    raise SystemExit(128 + signum)


def epoch_batches(data, run: Run, p: Progress, stop: _StopSignal, on_stop):
    """(this rank's batches of the epoch from p's position, as batches_of yields them; the
    number of batches in the epoch, None for shards: a stream's length is known at its end)."""
    if isinstance(data, ShardLoaders):
        return batches_of(data.epoch(p.epoch, p.stream), stop, on_stop), None
    batches = rank_batches(len(data.ds), run.cfg, run.world, p.epoch)
    end = len(batches) - len(batches) % run.cfg.grad_accum
    return batches_of(data.epoch(batches, p.epoch, p.batch, end), stop, on_stop), end


def batches_of(source, stop: _StopSignal, on_stop):
    """The (labeled, unlabeled) batches of `source` as (frames, captions, broken paths, unlabeled
    batch); Ctrl-C reaches the DataLoader workers too: with a signal pending, a worker's error
    stops cleanly all the same (on_stop)."""
    it = iter(source)
    while True:
        try:
            (frames, captions, bad, _), ubatch = next(it)
        except StopIteration:
            return
        except Exception:
            if stop.signum:
                on_stop(stop.signum)
            raise
        yield frames, captions, bad, ubatch


def train(cfg: TrainConfig) -> dict:
    from tqdm import tqdm

    run, ds, vds, uds, (step, epoch0, batch0, best, stream0), out = setup(cfg)
    world, model = run.world, run.model
    ckpt = checkpoint.Checkpointer(out, cfg.save_every_steps, cfg.save_every_minutes, cfg.keep_last, world.main)
    log = open(out / "log.jsonl", "a") if world.main else open(os.devnull, "w")
    p = Progress(step, epoch0, batch0, best, stream=stream0)
    pin = world.device.type == "cuda" and cfg.decode_device == "cpu"
    data = ShardLoaders(ds, uds, cfg.workers, world, pin) if cfg.train_shards else Loaders(ds, uds, cfg, world)
    stop, t_start = _StopSignal(), time.perf_counter()
    with stop:
        for p.epoch in range(epoch0, cfg.epochs):
            p.batch = batch0 if p.epoch == epoch0 else 0

            def on_stop(signum):  # (while the workers load: checkpoint at the last applied step's position)
                p.batch -= p.batch % cfg.grad_accum
                stop_now(run, ckpt, log, bar, signum, p, save=True)

            batches, end = epoch_batches(data, run, p, stop, on_stop)
            bar = tqdm(total=None if end is None else end - p.batch, desc=f"epoch {p.epoch}", leave=False,
                       disable=not world.main or None, unit="batch")
            broken, t_wait = [], time.perf_counter()
            model.train()
            for frames, captions, bad, ubatch in batches:
                if cfg.max_steps and p.step >= cfg.max_steps:
                    break
                data_wait, t0 = time.perf_counter() - t_wait, time.perf_counter()
                # Every rank keeps the same number of clips (a broken video shrinks a local batch):
                # ClipLoss pairs column r * n + i with rank r's row i.
                n = world.min(0 if frames is None else len(captions))
                u = unlabeled_clips(run, ubatch)
                broken += bad + u[2]
                apply = (p.batch + 1) % cfg.grad_accum == 0
                p.batch += 1
                if p.batch % cfg.grad_accum == 0 and isinstance(data, ShardLoaders):
                    p.stream = data.position()  # (what a checkpoint from here on resumes from)
                bar.update(1)
                if n > 0:
                    r = train_step(run, frames[:n].to(world.device, non_blocking=True), captions[:n], u, p.step, apply)
                if n > 0 and apply:
                    p.step += 1
                    signalled = world.max(stop.signum)
                    # (the epoch's last step is saved by the epoch-end checkpoint right after)
                    save = (ckpt.due(p.step) and (end is None or p.batch < end)) or signalled
                    ckpt_s = ckpt.save(model, run.optimizer, p.step, p.state(), wait=bool(signalled)) if save else 0.0
                    rec = step_record(run, r, p, n, data_wait, data_wait + time.perf_counter() - t0, ckpt_s)
                    rec["skipped_clips"] = len(bad) + len(u[2])  # (broken videos of this step's batches)
                    p.history.append(rec)
                    if p.step % cfg.log_every == 0 or signalled:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", clips_s=f"{rec['clips_per_s']:.1f}")
                    if signalled:
                        stop_now(run, ckpt, log, bar, signalled, p, save=False)
                t_wait = time.perf_counter()
            bar.close()
            end_of_epoch(run, vds, p, broken, log, out)
            if cfg.max_steps and p.step >= cfg.max_steps:
                break  # mid-epoch: resume at batch p.batch of this epoch
            p.epoch, p.batch, p.stream = p.epoch + 1, 0, None  # the epoch is done: resume at the next one
            ckpt.save(model, run.optimizer, p.step, p.state())
        if ckpt.last_step != p.step:  # the end of training
            ckpt.save(model, run.optimizer, p.step, p.state())
        ckpt.wait()
    return finish(run, ckpt, log, p, out, time.perf_counter() - t_start)


def finish(run: Run, ckpt, log, p: Progress, out: Path, wall_s: float) -> dict:
    """The summary record (this process's part of the run since resuming: the loop's wall time and
    what the checkpoints cost it), the loss plot, and the run's result."""
    summary = {"steps": p.step, "steps_run": len(p.history), "wall_s": wall_s, "checkpoint_s": ckpt.blocked_s,
               "checkpoints": ckpt.written,
               **{key: sum(r[key] for r in p.history) for key in ("data_wait_s", "fwd_bwd_s", "optimizer_s")},
               "broken_videos": sorted(set(p.broken))}
    log.write(json.dumps({"summary": summary}) + "\n")
    log.close()
    if run.world.main:
        plot_history(out / "log.jsonl", out / "loss.png")
    if run.world.world > 1:
        dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    return {"steps": p.step, "history": p.history, "broken_videos": sorted(set(p.broken)), "out_dir": str(out),
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
    cfg = parse_args(argv, description=__doc__.splitlines()[0])
    validate(cfg)  # before any model is loaded or video decoded
    return train(cfg)
