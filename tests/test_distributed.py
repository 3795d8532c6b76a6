"""fitclip_ext.ClipLoss against open_clip's ClipLoss: single process and 2 gloo processes, every
mode (local_loss x gather_with_grad), values and gradients."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fitclip_ext
from fitclip_ext.distributed import ClipLoss

open_clip_loss = pytest.importorskip("open_clip.loss")
MODES = [(False, False), (False, True), (True, False), (True, True)]


def _inputs(rank, n=6, d=8):
    g = torch.Generator().manual_seed(100 + rank)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def _loss_and_grads(loss_module, img, txt, scale_value=20.0, **kw):
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(scale_value, requires_grad=True)
    out = loss_module(i, t, s, **kw)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    return [loss.detach()] + [g.detach() for g in torch.autograd.grad(loss, (i, t, s))]


def test_single_process_matches_open_clip():
    img, txt = _inputs(0)
    for local, with_grad in MODES:
        ours = _loss_and_grads(ClipLoss(local, with_grad), img, txt)
        theirs = _loss_and_grads(open_clip_loss.ClipLoss(local, with_grad), img, txt)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    out = ClipLoss()(img, txt, 10.0, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert fitclip_ext.ClipLoss is ClipLoss


def test_horovod_and_bad_rank_rejected():
    with pytest.raises(NotImplementedError, match="Horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank must be in"):
        ClipLoss(rank=2, world_size=2)


def _worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        img, txt = _inputs(rank)
        out = {}
        for local, with_grad in MODES:
            kw = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=world_size)
            ours = _loss_and_grads(ClipLoss(**kw), img, txt)
            theirs = _loss_and_grads(open_clip_loss.ClipLoss(**kw), img, txt)
            out[(local, with_grad)] = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
        # different local batch sizes: a clear error on every rank
        n = 6 if rank == 0 else 5
        try:
            ClipLoss(rank=rank, world_size=world_size)(img[:n], txt[:n], 10.0)
            out["unequal"] = "no error"
        except ValueError as err:
            out["unequal"] = str(err)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_open_clip(tmp_path):
    world_size = 2
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world_size, str(tmp_path / "init"), results), nprocs=world_size, join=True)
    for rank in range(world_size):
        out = results[rank]
        for mode in MODES:
            assert out[mode] < 1e-5, (rank, mode, out[mode])
        assert "same local batch size" in out["unequal"] and "[6, 5]" in out["unequal"]


# ----------------------------------------------------------------------------- SigLipLoss

def _siglip_grads(loss_module, img, txt, **kw):
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    out = loss_module(i, t, s, b, **kw)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    return [loss.detach()] + [g.detach() for g in torch.autograd.grad(loss, (i, t, s, b))]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_siglip_single_process_matches_open_clip():
    from fitclip_ext.distributed import SigLipLoss

    img, txt = _inputs(0)
    txt[:3] = torch.nn.functional.normalize(img[:3] + 0.3 * txt[:3], dim=-1)  # some confident positives
    ours = _siglip_grads(SigLipLoss(), img, txt)
    theirs = _siglip_grads(open_clip_loss.SigLipLoss(), img, txt)
    for a, b in zip(ours, theirs):
        assert _rel(a, b) < 1e-5
    assert set(SigLipLoss()(img, txt, 10.0, -10.0, output_dict=True)) == {"contrastive_loss"}
    assert fitclip_ext.SigLipLoss is SigLipLoss
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank must be in"):
        SigLipLoss(rank=3, world_size=3)
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        SigLipLoss(rank=0, world_size=2)(img, txt, 10.0, -10.0)


def _siglip_worker(rank, world_size, init_file, results):
    from fitclip_ext.distributed import DIST_IMPLS, SigLipLoss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        img, txt = _inputs(rank, n=5, d=12)
        txt[:2] = torch.nn.functional.normalize(img[:2] + 0.3 * txt[:2], dim=-1)
        out = {}
        for impl in DIST_IMPLS:
            kw = dict(rank=rank, world_size=world_size, dist_impl=impl)
            ours = _siglip_grads(SigLipLoss(**kw), img, txt)
            theirs = _siglip_grads(open_clip_loss.SigLipLoss(**kw), img, txt)
            out[impl] = max(_rel(a, b) for a, b in zip(ours, theirs))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_siglip_gloo_processes_match_open_clip(tmp_path, world_size):
    """Every dist_impl on 2 and 3 processes: each rank's loss and its gradients (images, texts,
    scale, bias) equal open_clip's SigLipLoss on the same rank (3 ranks: bidir's odd remainder)."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_siglip_worker, args=(world_size, str(tmp_path / "init"), results), nprocs=world_size, join=True)
    for rank in range(world_size):
        for impl, err in results[rank].items():
            assert err < 1e-5, (rank, impl, err)
