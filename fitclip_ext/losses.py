"""FitCLIP's losses, each testable alone on embeddings: the labeled loss over the global batch
(InfoNCE or SigLIP, mean or top-k pooled), the distillation of unlabeled clips from the frozen
teacher, the validation loss, and the frame choices they rest on (top-k temporal sampling)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import model as fmodel
from .contrastive import contrastive_loss
from .data import collate
from .distill import distillation_loss
from .distributed import ClipLoss, SigLipLoss
from .frames import gather_frames, select_frames, topk_frame_similarity, video_contrastive_loss
from .sigmoid import sigmoid_loss
from .train_config import TrainConfig
from .world import World


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
    (uniform frames): a ClipDataset, or a shards.ShardStream (read in this process)."""
    from .shards import ShardStream, StreamLoader

    if isinstance(ds, ShardStream):
        batches = StreamLoader(ds, 0).epoch(0)
    else:
        batches = (collate([ds[i] for i in range(b0, min(len(ds), b0 + cfg.batch_size))])
                   for b0 in range(0, len(ds) - 1, cfg.batch_size))
    model.eval()
    total, count = 0.0, 0
    for frames, caps, *_ in batches:
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


def unlabeled_loss(img_emb, txt_emb, uframes, utokens, scale, teacher, cfg: TrainConfig, world: World,
                   shared_prompts: bool):
    """FitCLIP's distillation term: the student's video x text scores of the unlabeled clips
    (img_emb [u k, D] of their frames, txt_emb [t, D] of their texts) pulled towards the frozen
    teacher's on the same frames and texts, over the whole (gathered) batch; shared_prompts: the
    texts are class prompts, the same on every rank (not gathered)."""
    k = cfg.num_frames
    u = uframes.shape[0]
    uvideo_s = F.normalize(F.normalize(img_emb.reshape(u, k, -1), dim=-1).mean(1), dim=-1)
    utext_s = F.normalize(txt_emb, dim=-1)
    with torch.no_grad():
        utext_t = F.normalize(teacher.encode_text(utokens), dim=-1)
        # the teacher scores the same frames the student sees (unlabeled clips are decoded at
        # num_frames: no caption-driven selection)
        uvideo_t = video_embeddings(teacher, uframes, None, k)
        t_scale = teacher.logit_scale.exp() if cfg.learn_temperature else 1 / cfg.temperature
    # the whole batch's score matrix on every rank (FitCLIP all-gathers the embeddings); class
    # prompts are the same on every rank
    uvideo_s, uvideo_t = world.gather(uvideo_s, True), world.gather(uvideo_t, False)
    if not shared_prompts:
        utext_s, utext_t = world.gather(utext_s, True), world.gather(utext_t, False)
    # in the student's dtype (bf16 under autocast): the fused loss takes half-precision inputs
    # and computes in fp32 inside, so nothing is upcast here
    dt = uvideo_s.dtype
    return distillation_loss(uvideo_s, utext_s.to(dt), uvideo_t.to(dt), utext_t.to(dt), scale, t_scale)
