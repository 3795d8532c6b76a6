"""Zero-shot evaluation (`fitclip eval`): action recognition (prompt-ensembled class names,
top-1/top-5) and text-to-video / video-to-text retrieval (R@1/5/10, median and mean rank), with
mean pooling of frame similarities or top-k pooling (`topk_frame_similarity`)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as fdata
from .errors import InputError, existing_dir, existing_file, pretrained_path
from . import metrics
from . import model as fmodel
from .frames import topk_frame_similarity


def cache_file(cache_dir, model_id: str, samples, num_frames: int) -> Path:
    """Where the frame embeddings of (model, samples, frames) are cached: a digest of the model's
    identity, the videos (path, size, modification time, segment) and the frame count."""
    h = hashlib.sha256(f"{model_id}|{num_frames}".encode())
    for s in samples:
        p = Path(s.video)
        stat = p.stat() if p.exists() else None
        h.update(f"|{p}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}|{s.segment}".encode())
    return Path(cache_dir) / f"frames-{h.hexdigest()[:24]}.safetensors"


@torch.no_grad()
def embed_videos(model, samples, num_frames: int, batch_size: int = 16, device="cpu", workers: int = 0,
                 cache: Path | None = None):
    """(unit frame embeddings [N, T, D], kept sample indices, unreadable paths): frames are the
    middle frames of T equal intervals (the evaluation sampling), decoded in `workers`
    DataLoader processes. With `cache` (a file from `cache_file`) the embeddings are read from it
    when it exists, and written to it otherwise, so another pooling or prompt set does not decode
    the videos again."""
    from safetensors.torch import load_file, save_file

    if cache is not None and cache.exists():
        t = load_file(str(cache))
        broken = json.loads(cache.with_suffix(".json").read_text())["unreadable"]
        return t["frame_emb"], t["kept"].tolist(), broken
    from tqdm import tqdm

    model.eval()
    clips = fdata.ClipDataset(samples, fdata.frame_preprocess(model), num_frames, "uniform", seed=0)
    loader = torch.utils.data.DataLoader(clips, batch_size=batch_size, num_workers=workers, collate_fn=fdata.collate,
                                         pin_memory=torch.device(device).type == "cuda")
    embs, kept, broken = [], [], []
    for frames, _, bad, idx in tqdm(loader, desc="encoding videos", unit="batch", disable=None):
        broken += bad
        if frames is not None:
            embs.append(F.normalize(fmodel.encode_frames(model, frames.to(device)).float(), dim=-1).cpu())
            kept += idx
    if not embs:
        raise ValueError("no readable video in the evaluation set")
    frame_emb = torch.cat(embs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fmodel.atomic_write(cache.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(
            {"unreadable": broken, "videos": len(samples), "num_frames": num_frames})))
        fmodel.atomic_write(cache, lambda tmp: save_file(
            {"frame_emb": frame_emb.contiguous(), "kept": torch.tensor(kept, dtype=torch.int64)}, tmp))
    return frame_emb, kept, broken


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size: int = 256, device="cpu") -> torch.Tensor:
    out = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


def scores(text_emb: torch.Tensor, frame_emb: torch.Tensor, pooling: str, k: int) -> torch.Tensor:
    """[texts, videos]: mean pooling (mean of frame similarities = similarity to the mean of the
    unit frame embeddings) or the mean of the k best frames."""
    if pooling == "mean":
        return text_emb @ frame_emb.mean(1).T
    if pooling == "topk":
        return topk_frame_similarity(text_emb, frame_emb, min(k, frame_emb.shape[1]))
    raise ValueError(f"pooling must be 'mean' or 'topk', got {pooling!r}")


@torch.no_grad()
def embed_shard_videos(model, urls: list[str], num_frames: int, batch_size: int = 16, device="cpu", workers: int = 0):
    """embed_videos for shards (`--task shards`): (unit frame embeddings [N, T, D], the N readable
    samples as VideoText (key, caption), unreadable "shard:key (reason)" names); each shard read
    by one DataLoader worker, the frames sampled as for files (the middle of T intervals)."""
    from tqdm import tqdm

    from .shards import ShardStream, StreamLoader

    model.eval()
    stream = ShardStream(urls, fdata.frame_preprocess(model), num_frames, "uniform", 0, batch_size, shuffle_buffer=0)
    embs, kept, broken = [], [], []
    for frames, captions, bad, keys in tqdm(StreamLoader(stream, workers, torch.device(device).type == "cuda").epoch(0),
                                            desc="encoding videos", unit="batch", disable=None):
        broken += bad
        if frames is not None:
            embs.append(F.normalize(fmodel.encode_frames(model, frames.to(device)).float(), dim=-1).cpu())
            kept += [fdata.VideoText(key, [caption]) for key, caption in zip(keys, captions)]
    if not embs:
        raise ValueError("no readable video in the evaluation shards")
    return torch.cat(embs), kept, broken


def classification(model, tokenizer, samples, class_names, templates, num_frames, pooling="mean", k=1,
                   device="cpu", embedded=None, **embed) -> dict:
    """Top-1/top-5 of samples' labels; `embedded`: (frame embeddings, kept indices, unreadable)
    made already (shards), instead of decoding samples' files."""
    frame_emb, kept, broken = embedded or embed_videos(model, samples, num_frames, device=device,
                                                       **_cached(embed, samples, num_frames))
    encode = lambda texts: embed_texts(model, tokenizer, texts, device=device)  # noqa: E731
    class_emb = metrics.class_embeddings(encode, class_names, templates)
    logits = scores(class_emb, frame_emb, pooling, k).T
    labels = torch.tensor([samples[i].label for i in kept])
    return {**metrics.classification_metrics(logits, labels), "videos": len(kept), "unreadable": broken}


def retrieval(model, tokenizer, samples, num_frames, pooling="mean", k=1, device="cpu", embedded=None,
              **embed) -> dict:
    """Text-to-video and video-to-text metrics of samples' first captions (`embedded`: as for
    classification)."""
    frame_emb, kept, broken = embedded or embed_videos(model, samples, num_frames, device=device,
                                                       **_cached(embed, samples, num_frames))
    texts, owner = [], []
    for v, i in enumerate(kept):
        for caption in samples[i].captions[:1] or [""]:
            texts.append(caption)
            owner.append(v)
    sim = scores(embed_texts(model, tokenizer, texts, device=device), frame_emb, pooling, k)
    return {**metrics.retrieval_metrics(sim, torch.tensor(owner)), "videos": len(kept), "unreadable": broken}


def _cached(embed: dict, samples, num_frames: int) -> dict:
    """embed_videos' keywords: workers, batch_size, and the cache file when a cache_dir and the
    model's identity are given."""
    embed = dict(embed)
    cache_dir, model_id = embed.pop("cache_dir", None), embed.pop("model_id", None)
    if cache_dir and model_id:
        embed["cache"] = cache_file(cache_dir, model_id, samples, num_frames)
    return embed


def model_identity(name: str, pretrained: str | None) -> str:
    """The model's name and weights (a checkpoint file by path, size and modification time)."""
    if pretrained and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        return f"{name}|{os.path.abspath(pretrained)}|{st.st_size}|{st.st_mtime_ns}"
    return f"{name}|{pretrained}"


def print_table(results: dict) -> None:
    rows = []
    if "splits" in results:
        rows += [(f"split {k}", r) for k, r in results["splits"].items()] + [("mean", results["mean"])]
    for key in ("classification", "retrieval"):
        if key in results:
            rows.append((key, results[key]))
    cols = [c for c in ("top1", "top5", "t2v_r1", "t2v_r5", "t2v_r10", "t2v_mdr", "t2v_mnr", "v2t_r1", "v2t_r5",
                        "v2t_r10", "v2t_mdr", "v2t_mnr") if any(c in r for _, r in rows)]
    print(f"{results['task']} ({results['model']}, {results['pretrained']}, {results['pooling']} pooling)")
    print(f"{'':15}" + "".join(f"{c:>9}" for c in cols))
    for name, r in rows:
        print(f"{name:15}" + "".join(f"{r[c]:9.1f}" if c in r else f"{'-':>9}" for c in cols))
    unreadable = [p for _, r in rows for p in r.get("unreadable", [])]
    if unreadable:
        print(f"{len(unreadable)} unreadable videos skipped, e.g. {unreadable[:3]}")


def check_paths(a) -> None:
    """Every path flag of `fitclip eval` names what exists, and a CSV has the columns it needs
    (errors.InputError otherwise)."""
    if a.task == "csv":
        existing_file("--root (the CSV of --task csv)", a.root)
        fdata.load_caption_csv(a.root, a.video_root)  # (its columns, before any model is created)
    elif a.task == "shards":
        from .shards import check_slots, shard_urls

        check_slots("--root", shard_urls("--root (the shards of --task shards)", a.root), 1, a.workers)
    else:
        existing_dir("--root", a.root)
    for flag, value, check in (("--classes", a.classes, existing_file), ("--video-root", a.video_root, existing_dir),
                               ("--hmdb-splits", a.hmdb_splits, existing_dir)):
        if value:
            check(flag, value)
    if a.pretrained not in ("none", "None"):
        pretrained_path("--pretrained", a.pretrained)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="fitclip eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture name")
    p.add_argument("--pretrained", default="openai", help="open_clip tag or checkpoint file")
    p.add_argument("--task", required=True, choices=["ucf101", "hmdb51", "msrvtt", "didemo", "youcook2", "activitynet", "csv",
                                                     "shards"],
                   help="zero-shot action recognition (ucf101, hmdb51, csv with --classes) or text-to-video retrieval")
    p.add_argument("--root", required=True, help="data set folder (the CSV for --task csv; for --task shards a "
                   "webdataset pattern of shards in video2dataset's layout, e.g. 'val/shard-{000000..000009}.tar')")
    p.add_argument("--split", default=None, help="1-3 for UCF101/HMDB51, or the layout's split name")
    p.add_argument("--hmdb-splits", default=None, help="folder of HMDB51 split files")
    p.add_argument("--classes", default=None, help="for --task csv or shards: classify against these names (one per "
                   "line; each caption is its class name)")
    p.add_argument("--video-root", default=None, help="for --task csv: folder the CSV's video paths are relative to")
    p.add_argument("--num-frames", type=int, default=4, help="frames decoded (uniformly) per video")
    p.add_argument("--pooling", choices=["mean", "topk"], default="mean",
                   help="video-text score: mean of the frames, or mean of the --k most similar (topk_frame_similarity)")
    p.add_argument("--k", type=int, default=1, help="frames per score for --pooling topk")
    p.add_argument("--mode", choices=["paragraph", "segment"], default="paragraph",
                   help="DiDeMo / ActivityNet: paragraph-to-video or segment (moment) retrieval")
    p.add_argument("--templates", choices=["ucf101", "plain"], default="ucf101",
                   help="class-name prompts: CLIP's UCF101 templates, averaged, or the bare name")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding the videos")
    p.add_argument("--batch-size", type=int, default=16, help="videos encoded per batch")
    p.add_argument("--cache-dir", default=None,
                   help="keep the frame embeddings of each (model, video set, --num-frames) here and reuse them: "
                        "another --pooling, --k or prompt set does not decode again (random-init models are not "
                        "cached)")
    a = p.parse_args(argv)
    check_paths(a)  # before the model is created (which may download weights)
    pretrained = None if a.pretrained in ("none", "None") else a.pretrained
    model, _, _, tok = fmodel.create(a.model, pretrained, device=a.device)
    templates = metrics.ucf101_templates() if a.templates == "ucf101" else ["{}"]
    kw = dict(num_frames=a.num_frames, pooling=a.pooling, k=a.k, device=a.device, workers=a.workers,
              batch_size=a.batch_size, cache_dir=a.cache_dir,
              model_id=model_identity(a.model, pretrained) if pretrained else None)
    results: dict = {"task": a.task, "model": a.model, "pretrained": a.pretrained, "pooling": a.pooling, "k": a.k}
    if a.task in ("ucf101", "hmdb51"):
        per_split = {}
        for split in ([int(a.split)] if a.split else [1, 2, 3]):
            if a.task == "ucf101":
                samples, names = fdata.load_ucf101(a.root, split, "test")
            else:
                samples, names = fdata.load_hmdb51(a.root, a.hmdb_splits or a.root, split, "test")
            per_split[split] = classification(model, tok, samples, names, templates, **kw)
        results["splits"] = per_split
        results["mean"] = {m: sum(r[m] for r in per_split.values()) / len(per_split) for m in ("top1", "top5")}
    elif a.task == "shards":  # (a webdataset pattern; with --classes each caption is its class name)
        from .shards import shard_urls

        frame_emb, samples, broken = embed_shard_videos(model, shard_urls("--root", a.root), a.num_frames,
                                                        a.batch_size, a.device, a.workers)
        kw.update(embedded=(frame_emb, list(range(len(samples))), broken))
        if a.classes:
            names = [n.strip() for n in Path(a.classes).read_text().splitlines() if n.strip()]
            for s in samples:
                if s.captions[0] not in names:
                    raise InputError(f"--classes: the caption {s.captions[0]!r} of {s.video} is not a class name")
                s.label = names.index(s.captions[0])
            results["classification"] = classification(model, tok, samples, names, templates, **kw)
        else:
            results["retrieval"] = retrieval(model, tok, samples, **kw)
    elif a.task == "csv" and a.classes:
        samples = fdata.load_caption_csv(a.root, a.video_root)
        names = [n.strip() for n in Path(a.classes).read_text().splitlines() if n.strip()]
        for s in samples:
            s.label = names.index(s.captions[0])
        results["classification"] = classification(model, tok, samples, names, templates, **kw)
    else:
        loaders = {"msrvtt": lambda: fdata.load_msrvtt(a.root, a.split or "test_1k"),
                   "didemo": lambda: fdata.load_didemo(a.root, a.split or "test", mode=a.mode),
                   "youcook2": lambda: fdata.load_youcook2(a.root, a.split or "validation"),
                   "activitynet": lambda: fdata.load_activitynet(a.root, a.split or "val_1", mode=a.mode),
                   "csv": lambda: fdata.load_caption_csv(a.root, a.video_root)}
        results["retrieval"] = retrieval(model, tok, loaders[a.task](), **kw)
    print_table(results)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1, default=str))
    return results
