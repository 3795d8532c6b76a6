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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data as fdata
from . import model as fmodel
from .contrastive import contrastive_loss
from .distill import distillation_loss
from .distributed import ClipLoss
from .frames import gather_frames, select_frames, video_contrastive_loss


@dataclass
class TrainConfig:
    train_csv: str
    out_dir: str
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    video_root: str | None = None
    unlabeled_csv: str | None = None
    class_prompts: str | None = None  # file of class names: unlabeled texts become "a video of {name}."
    val_csv: str | None = None       # mean-pooled InfoNCE on these clips after every epoch; best kept
    num_frames: int = 4          # frames pooled per clip (k)
    candidate_frames: int = 0    # decoded candidates for top-k temporal sampling (0: = num_frames)
    loss_pooling: str = "mean"   # "mean": InfoNCE of pooled embeddings; "topk": video_contrastive_loss
    pool_k: int = 1              # frames per pair for loss_pooling="topk"
    batch_size: int = 8
    unlabeled_batch_size: int = 8
    epochs: int = 1
    max_steps: int = 0           # stop after this many optimizer steps (0: run all epochs)
    lr: float = 3e-6
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"   # or "cosine"
    temperature: float = 0.015
    learn_temperature: bool = False
    labeled_weight: float = 0.9999
    unlabeled_weight: float = 0.0001
    grad_accum: int = 1
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    log_every: int = 1
    dump_grads: str | None = None  # write the first step's (all-reduced) gradients here (tests, debugging)


# ----------------------------------------------------------------------------- data

def frame_preprocess(model):
    """open_clip's eval preprocessing (resize shortest side, center crop, normalise) applied to
    uint8 frame batches [N, 3, H, W] as tensors, so whole clips are processed at once."""
    from torchvision.transforms.v2 import functional as TF

    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    mean, std = list(cfg["mean"]), list(cfg["std"])
    interp = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR}[cfg.get("interpolation", "bicubic")]

    def apply(frames: torch.Tensor) -> torch.Tensor:
        x = TF.resize(frames, min(size), interpolation=interp, antialias=True)
        x = TF.center_crop(x, list(size))
        return TF.normalize(x.float() / 255.0, mean, std)

    return apply


class ClipDataset(torch.utils.data.Dataset):
    """Samples -> (frames [F, 3, H, W] float, caption, path); broken videos -> (None, None, path)."""

    def __init__(self, samples, preprocess, num_frames, sampling, seed):
        self.samples, self.preprocess, self.num_frames, self.sampling, self.seed = samples, preprocess, num_frames, sampling, seed
        self.epoch = 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        # frame sampling depends only on (seed, epoch, index): resumable and worker-independent
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        try:
            frames = fdata.read_frames(s.video, self.num_frames, sampling=self.sampling, generator=g)
        except fdata.VideoDecodeError:
            return None, None, s.video
        return self.preprocess(frames), (s.captions[0] if s.captions else ""), s.video


def collate(batch):
    ok = [b for b in batch if b[0] is not None]
    broken = [b[2] for b in batch if b[0] is None]
    if not ok:
        return None, [], broken
    return torch.stack([b[0] for b in ok]), [b[1] for b in ok], broken


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()


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


class Dist:
    """This process's place in a torchrun job (world 1 when not launched by torchrun)."""

    def __init__(self, cfg: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(cfg.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def gather(self, x: torch.Tensor, with_grad: bool) -> torch.Tensor:
        """All ranks' x concatenated in rank order; with_grad: gradients flow back to every rank."""
        if self.world == 1:
            return x
        if with_grad:
            import torch.distributed.nn.functional as dist_fn

            return torch.cat(dist_fn.all_gather(x), dim=0)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def min(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def labeled_loss(frame_emb, text, scale, cfg: TrainConfig, world: Dist):
    """Labeled InfoNCE over the global batch. Mean pooling: fitclip_ext.ClipLoss with local rows
    against all gathered columns (open_clip's local_loss + gather_with_grad); top-k pooling: the
    fused video loss over the gathered frames and captions. Either way, DDP's mean of the ranks'
    gradients equals the single-process gradient of the whole batch."""
    if cfg.loss_pooling == "topk":  # top-k pooled logits, fused (no B x B x T)
        frames_all, text_all = world.gather(frame_emb, True), world.gather(text, True)
        return video_contrastive_loss(frames_all, text_all, scale, k=min(cfg.pool_k, frame_emb.shape[1]))
    video = F.normalize(frame_emb.mean(1), dim=-1)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=world.rank, world_size=world.world)
    return loss_fn(video, text, scale)


@torch.no_grad()
def validation_loss(model, tokenizer, ds, cfg: TrainConfig, device) -> float:
    """Mean-pooled InfoNCE over the validation clips in batches (uniform frames)."""
    model.eval()
    total, count = 0.0, 0
    for b0 in range(0, len(ds) - 1, cfg.batch_size):
        frames, caps, _ = collate([ds[i] for i in range(b0, min(len(ds), b0 + cfg.batch_size))])
        if frames is None or len(caps) < 2:
            continue
        text = F.normalize(model.encode_text(tokenizer(caps).to(device)), dim=-1)
        video = video_embeddings(model, frames.to(device), text, cfg.num_frames)
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


# ----------------------------------------------------------------------------- checkpoints

def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_training_state(out: Path, model, optimizer, step, epoch, batch_in_epoch, best, tag="last"):
    fmodel.save_checkpoint(model.state_dict(), out / f"{tag}.safetensors", metadata={"step": str(step)})
    _atomic_torch_save({"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                        "batch_in_epoch": batch_in_epoch, "best_val": best}, out / f"{tag}_state.pt")


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> dict:
    from tqdm import tqdm

    world = Dist(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = world.device
    model, _, _, tokenizer = fmodel.create(cfg.model, cfg.pretrained, device=device)
    teacher = None
    if cfg.unlabeled_csv:
        teacher, *_ = fmodel.create(cfg.model, cfg.pretrained, device=device)
        teacher.load_state_dict(model.state_dict())
        teacher.eval().requires_grad_(False)
    if world.main and not (out / "zero_shot.safetensors").exists():  # the original model, for `fitclip wise`
        fmodel.save_checkpoint(model.state_dict(), out / "zero_shot.safetensors")
    model.logit_scale.requires_grad_(cfg.learn_temperature)
    if not cfg.learn_temperature:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / cfg.temperature))
    preprocess = frame_preprocess(model)
    n_decode = max(cfg.num_frames, cfg.candidate_frames)
    labeled = fdata.load_caption_csv(cfg.train_csv, cfg.video_root)
    ds = ClipDataset(labeled, preprocess, n_decode, "random", cfg.seed)
    vds = ClipDataset(fdata.load_caption_csv(cfg.val_csv, cfg.video_root), preprocess, cfg.num_frames, "uniform",
                      cfg.seed) if cfg.val_csv else None
    prompts = None
    if cfg.class_prompts:
        names = [n.strip() for n in Path(cfg.class_prompts).read_text().splitlines() if n.strip()]
        prompts = [f"a video of {fdata.split_camel_case(n)}." for n in names]
    uds = None
    if cfg.unlabeled_csv:
        uds = ClipDataset(fdata.load_caption_csv(cfg.unlabeled_csv, cfg.video_root), preprocess, cfg.num_frames,
                          "random", cfg.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # batch_size clips per process and step: the global batch is batch_size x world size
    global_bs = cfg.batch_size * world.world
    steps_per_epoch = len(ds) // (global_bs * cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    step, start_epoch, start_batch, best = 0, 0, 0, float("inf")
    if cfg.resume and (out / "last_state.pt").exists():
        model.load_state_dict(fmodel.load_state_dict(out / "last.safetensors"))
        state = torch.load(out / "last_state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step, start_epoch, start_batch, best = state["step"], state["epoch"], state["batch_in_epoch"], state["best_val"]
    encoder = StepEncoder(model)
    if world.world > 1:  # broadcasts rank 0's weights, averages gradients in buckets during backward
        encoder = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log = open(out / "log.jsonl", "a") if world.main else open(os.devnull, "w")
    history = []
    broken_all: list[str] = []
    for epoch in range(start_epoch, cfg.epochs):
        ds.epoch = epoch
        order = epoch_order(len(ds), cfg.seed, epoch)
        # the global batch's slice of this rank
        batches = [order[i + world.rank * cfg.batch_size:i + (world.rank + 1) * cfg.batch_size]
                   for i in range(0, len(order) - global_bs + 1, global_bs)]
        uorder = epoch_order(len(uds), cfg.seed + 1, epoch) if uds else []
        broken: list[str] = []
        first = start_batch if epoch == start_epoch else 0
        end = len(batches) - len(batches) % cfg.grad_accum
        # DataLoader workers decode while the model trains; the batches are fixed above (resumable)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches[first:end], collate_fn=collate,
                                             num_workers=cfg.workers)
        bar = tqdm(zip(range(first, end), loader), total=end - first, desc=f"epoch {epoch}", leave=False,
                   disable=not world.main)
        model.train()
        for b, (frames, captions, bad) in bar:
            if cfg.max_steps and step >= cfg.max_steps:
                break
            t0 = time.time()
            broken += bad
            # Every rank keeps the same number of clips (a broken video shrinks a local batch):
            # ClipLoss pairs column r * n + i with rank r's row i.
            n = world.min(0 if frames is None else len(captions))
            if n == 0:
                continue
            frames, captions = frames[:n].to(device), captions[:n]
            k = cfg.num_frames
            with autocast:
                tokens = tokenizer(captions).to(device)
                if frames.shape[1] > k:  # FitCLIP's temporal sampling, scored without gradient
                    with torch.no_grad():
                        sel_text = F.normalize(model.encode_text(tokens), dim=-1)
                    frames = choose_frames(model, frames, sel_text, k)
                images, texts_tok = [frames.flatten(0, 1)], [tokens]
                uframes = None
                if uds is not None and len(uds):
                    ub = cfg.unlabeled_batch_size
                    u_idx = [uorder[((b * world.world + world.rank) * ub + j) % len(uds)] for j in range(ub)]
                    uds.epoch = epoch
                    uframes, ucaps, ubad = collate([uds[i] for i in u_idx])
                    broken += ubad
                    un = world.min(0 if uframes is None else len(ucaps))
                    if un == 0:
                        uframes = None
                    else:
                        uframes, ucaps = uframes[:un].to(device), ucaps[:un]
                        utexts = prompts or ucaps  # class prompts give soft pseudo-labels over classes
                        utokens = tokenizer(utexts).to(device)
                        images.append(uframes.flatten(0, 1))
                        texts_tok.append(utokens)
                img_emb, txt_emb = encoder(torch.cat(images), torch.cat(texts_tok))
                frame_emb = F.normalize(img_emb[:n * k].reshape(n, k, -1), dim=-1)
                text = F.normalize(txt_emb[:n], dim=-1)
                scale = model.logit_scale.exp()
                loss_l = labeled_loss(frame_emb, text, scale, cfg, world)
                loss = cfg.labeled_weight * loss_l
                loss_u = torch.zeros(())
                if uframes is not None:
                    uvideo_s = F.normalize(F.normalize(img_emb[n * k:].reshape(un, k, -1), dim=-1).mean(1), dim=-1)
                    utext_s = F.normalize(txt_emb[n:], dim=-1)
                    with torch.no_grad():
                        utext_t = F.normalize(teacher.encode_text(utokens), dim=-1)
                        # the teacher scores the same frames the student sees (unlabeled
                        # clips are decoded at num_frames: no caption-driven selection)
                        uvideo_t = video_embeddings(teacher, uframes, None, k)
                        t_scale = teacher.logit_scale.exp() if cfg.learn_temperature else 1 / cfg.temperature
                    # the whole batch's score matrix on every rank (FitCLIP all-gathers the
                    # embeddings); class prompts are the same on every rank
                    uvideo_s, uvideo_t = world.gather(uvideo_s, True), world.gather(uvideo_t, False)
                    if not prompts:
                        utext_s, utext_t = world.gather(utext_s, True), world.gather(utext_t, False)
                    loss_u = distillation_loss(uvideo_s.float(), utext_s.float(), uvideo_t.float(), utext_t.float(),
                                               scale, t_scale)
                    loss = loss + cfg.unlabeled_weight * loss_u
            (loss / cfg.grad_accum).backward()
            if (b + 1) % cfg.grad_accum == 0:
                if cfg.dump_grads and step == 0 and world.main:
                    _atomic_torch_save({name: p.grad.detach().clone() for name, p in model.named_parameters()
                                        if p.grad is not None}, Path(cfg.dump_grads))
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg, total)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                # the loss of the global batch: ClipLoss's per-rank losses average to it
                rec = {"step": step, "epoch": epoch, "loss": world.mean(loss.item()),
                       "labeled_loss": world.mean(loss_l.item()), "unlabeled_loss": float(loss_u.detach()),
                       "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0,
                       "clips_per_s": n * world.world / max(1e-9, time.time() - t0)}
                history.append(rec)
                if step % cfg.log_every == 0:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if world.main:
                    save_training_state(out, model, optimizer, step, epoch, b + 1, best)
        if broken and world.main:
            log.write(json.dumps({"epoch": epoch, "broken_videos": sorted(set(broken))}) + "\n")
            print(f"epoch {epoch}: skipped {len(set(broken))} unreadable videos: {sorted(set(broken))[:10]}")
            broken_all += broken
        if vds is not None and world.main:
            val = validation_loss(model, tokenizer, vds, cfg, device)
            log.write(json.dumps({"epoch": epoch, "step": step, "val_loss": val}) + "\n")
            if val < best:
                best = val
                fmodel.save_checkpoint(model.state_dict(), out / "best.safetensors",
                                       metadata={"step": str(step), "val_loss": str(val)})
        if cfg.max_steps and step >= cfg.max_steps:
            break
        start_batch = 0
        if world.main:
            save_training_state(out, model, optimizer, step, epoch + 1, 0, best)
    log.close()
    if world.main:
        plot_history(out / "log.jsonl", out / "loss.png")
    if world.world > 1:
        dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    return {"steps": step, "history": history, "broken_videos": sorted(set(broken_all)), "out_dir": str(out)}


def plot_history(log_path: Path, png: Path) -> None:
    rows = [json.loads(line) for line in open(log_path) if '"loss"' in line]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["labeled_loss"] for r in rows], label="labeled InfoNCE")
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
        if f.type in ("bool", bool):
            parser.add_argument(name, action="store_true")
        elif f.default is dataclasses.MISSING:
            parser.add_argument(name, required=True)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(name, type=typ, default=f.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: (None if v in ("none", "None") else v) for k, v in vars(args).items()})
    return train(cfg)
