"""`ClipLoss`: a drop-in for open_clip's `ClipLoss`, same constructor and forward, single process
and distributed (torch.distributed: torchrun, DDP, NCCL on GPUs, gloo on CPUs), built on the fused
losses so no B x B (or local x global) logits matrix is ever stored.

Semantics follow open_clip exactly: features of all ranks are all-gathered (with gradient when
`gather_with_grad`, otherwise without, with this rank's own slice put back so its gradient
flows); with `local_loss` each rank computes its local rows against all gathered columns
(`infonce` with positive offset rank * local_batch), otherwise the full global loss.

`SigLipLoss` is open_clip's `SigLipLoss` on the fused `sigmoid_loss`. The trainer's process-group
wrapper is `fitclip_ext.world.World`, on the same `all_gather`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .contrastive import contrastive_loss, infonce
from .sigmoid import sigmoid_loss


def all_gather(features: torch.Tensor, rank: int, world_size: int, with_grad: bool,
               keep_local_grad: bool) -> torch.Tensor:
    """Every rank's features concatenated in rank order. with_grad: gradients flow back to every
    rank (torch.distributed.nn's all_gather); otherwise none do, except, with keep_local_grad,
    through this rank's own slice (open_clip's gather_features without gather_with_grad)."""
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(features), dim=0)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach().contiguous())
    if keep_local_grad:
        gathered[rank] = features  # keep this rank's gradient, as open_clip does
    return torch.cat(gathered, dim=0)


def _check_equal_batches(n: int, device: torch.device, world_size: int) -> None:
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device))
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"ClipLoss needs the same local batch size on every rank (positive i of rank r is "
                         f"global column r * B + i), got local batch sizes {sizes}")


class ClipLoss(torch.nn.Module):
    """open_clip.loss.ClipLoss with the fused, memory-efficient loss.

    Args (as open_clip): local_loss, gather_with_grad, cache_labels (accepted; labels are never
    materialised here), rank, world_size, use_horovod (not supported: use torch.distributed).
    forward(image_features [B, D], text_features [B, D], logit_scale, logit_bias=None,
    output_dict=False) -> loss, or {"contrastive_loss": loss}.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, backend=None, check_batch_sizes=True):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("fitclip_ext.ClipLoss does not support Horovod; launch with torchrun "
                                      "(torch.distributed) instead")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.check_batch_sizes = check_batch_sizes

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size == 1:
            loss = contrastive_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(f"ClipLoss(world_size={self.world_size}) needs torch.distributed to be initialised "
                                   "(torchrun + init_process_group)")
            n = image_features.shape[0]
            if self.check_batch_sizes:
                _check_equal_batches(n, image_features.device, self.world_size)
            keep = not self.local_loss
            all_img = all_gather(image_features, self.rank, self.world_size, self.gather_with_grad, keep)
            all_txt = all_gather(text_features, self.rank, self.world_size, self.gather_with_grad, keep)
            if self.local_loss:
                off = self.rank * n
                loss = (infonce(image_features, all_txt, logit_scale, logit_bias, positive_offset=off, backend=self.backend)
                        + infonce(text_features, all_img, logit_scale, logit_bias, positive_offset=off,
                                  backend=self.backend)) / 2
            else:
                loss = contrastive_loss(all_img, all_txt, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLipLoss(torch.nn.Module):
    """open_clip.loss.SigLipLoss with the fused, memory-efficient sigmoid loss: same constructor,
    forward, values and gradients, for every `dist_impl`, and no logits block stored.

    Each rank's loss is its local images against its own texts (positives on the diagonal) plus
    its local images against every other rank's texts (negatives only), each block divided by the
    local batch, exactly as open_clip sums them. The texts travel as open_clip moves them (its own
    neighbour exchanges for "bidir" and "shift", an all-reduce per rank for "reduce"); "gather"
    all-gathers them and runs one fused pass over the local x global block (positives at offset
    rank * B), which is never stored.

    Args (as open_clip): cache_labels (accepted; labels are never materialised here), rank,
    world_size, dist_impl ("bidir" by default, "shift", "reduce", "gather").
    forward(image_features [B, D], text_features [B, D], logit_scale, logit_bias, output_dict=False)
    -> loss, or {"contrastive_loss": loss}.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 *, backend=None):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def _loss(self, image_features, text_features, logit_scale, logit_bias, negative_only=False):
        return sigmoid_loss(image_features, text_features, logit_scale, logit_bias,
                            positive_offset=None if negative_only else 0, backend=self.backend)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size == 1:
            loss = self._loss(image_features, text_features, logit_scale, logit_bias)
            return {"contrastive_loss": loss} if output_dict else loss
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"SigLipLoss(world_size={self.world_size}) needs torch.distributed to be initialised "
                               "(torchrun + init_process_group)")
        if self.dist_impl == "gather":
            import torch.distributed.nn.functional as dist_fn

            all_text = torch.cat(dist_fn.all_gather(text_features), dim=0)
            loss = sigmoid_loss(image_features, all_text, logit_scale, logit_bias,
                                positive_offset=self.rank * image_features.shape[0], backend=self.backend)
            return {"contrastive_loss": loss} if output_dict else loss
        from open_clip.loss import neighbour_exchange_bidir_with_grad, neighbour_exchange_with_grad

        loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        right = (self.rank + 1) % self.world_size
        left = (self.rank - 1 + self.world_size) % self.world_size
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            num_bidir, remainder = divmod(self.world_size - 1, 2)
            for _ in range(num_bidir):
                received = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
                for f in received:
                    loss = loss + self._loss(image_features, f, logit_scale, logit_bias, negative_only=True)
                to_left, to_right = received
            if remainder:
                f = neighbour_exchange_with_grad(left, right, to_right)
                loss = loss + self._loss(image_features, f, logit_scale, logit_bias, negative_only=True)
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(self.world_size - 1):
                from_left = neighbour_exchange_with_grad(left, right, to_right)
                loss = loss + self._loss(image_features, from_left, logit_scale, logit_bias, negative_only=True)
                to_right = from_left
        else:  # "reduce": every rank takes part in every all-reduce; its own block is the positive one above
            import torch.distributed.nn.functional as dist_fn

            for i in range(self.world_size):
                text_from_i = dist_fn.all_reduce(text_features * (self.rank == i), dist.ReduceOp.SUM)
                if i != self.rank:
                    loss = loss + self._loss(image_features, text_from_i, logit_scale, logit_bias, negative_only=True)
                else:  # no loss (open_clip weights it 0), but the all-reduce's backward, a collective every
                    loss = loss + 0 * text_from_i.sum()  # rank runs, must be reached here too
        return {"contrastive_loss": loss} if output_dict else loss
