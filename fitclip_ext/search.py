"""Text-to-video search over a folder of videos: `fitclip index` builds an index, `fitclip search`
queries it (and `fitclip serve`, fitclip_ext/serve.py, puts a page and a JSON API on it).

An index is a folder that loads without unpickling:
    index.json               the model, frames per video, the videos (path relative to the video
                             folder, size, modification time, duration, the frames' times, the
                             thumbnail's frame width) and the unreadable ones with the reason
    embeddings.safetensors   "frames" [N, T, D] unit frame embeddings and "mean" [N, D] their mean
                             (so mean @ text is the mean of the frames' cosine similarities, the
                             mean pooling of `fitclip eval`), float16 or float32
    thumbs/<id>.jpg          a strip of the T frames, 64 px high
Frames are the middle frames of T equal intervals (the evaluation sampling). A second run over
the same folder keeps the videos whose size and modification time are unchanged, encodes new or
changed ones and drops deleted ones. Under torchrun each process encodes a share of the videos
(the index folder must be shared); rank 0 merges them.

Search is one matrix-vector product over the mean embeddings, in row chunks, then optionally a
re-rank of the best candidates by top-k frame similarity (`topk_frame_similarity`), and for each
result the frames most similar to the query (`select_frames`), with their times.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as fdata
from . import model as fmodel
from .errors import InputError, existing_dir, pretrained_path
from .evaluate import model_identity
from .frames import select_frames, topk_frame_similarity

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp",
                    ".ogv")
FORMAT = 1
THUMB_HEIGHT = 64
CHUNK_ROWS = 1 << 16  # rows of the mean embeddings per product: bounds the float32 temporaries


class BadIndex(InputError):
    """A missing, corrupt or incompatible index (the message says which and how to fix it)."""


def scan(video_dir: Path) -> list[Path]:
    """The videos under video_dir (recursively, by extension), sorted, relative to it."""
    return sorted(p.relative_to(video_dir) for p in video_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def scan_shards(root: Path, shards: list[Path]) -> list[tuple[tuple[str, int, int], tuple[Path, int, int]]]:
    """The videos inside webdataset shards (video2dataset's layout, one video member per key):
    ((path "shard:member" relative to root, the shard's size, its modification time), (shard,
    offset of the member's bytes, their length)) in shard and member order. A shard that is not
    a readable tar raises InputError naming it."""
    import tarfile

    from .shards import VIDEO_EXTENSIONS as SHARD_VIDEO

    out = []
    for shard in shards:
        st = shard.stat()
        try:
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in SHARD_VIDEO]
        except (tarfile.TarError, OSError) as err:
            raise InputError(f"--shards: {shard} cannot be read as a tar ({err})") from err
        rel = shard.relative_to(root).as_posix()
        out += [((f"{rel}:{m.name}", st.st_size, st.st_mtime_ns), (shard, m.offset_data, m.size)) for m in members]
    return out


def read_source(source) -> bytes | Path:
    """A video file's path as it is, or a shard member's bytes ((shard, offset, length))."""
    if isinstance(source, tuple):
        shard, offset, length = source
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return source


def _video_id(rel: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha1(f"{rel}|{size}|{mtime_ns}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the index on disk

@dataclass
class Index:
    path: Path
    meta: dict                # model, pretrained, num_frames, video_dir, dtype, format
    videos: list[dict]        # id, path, size, mtime_ns, duration, times, thumb_w
    broken: list[dict]        # path, reason
    frames: torch.Tensor      # [N, T, D]
    mean: torch.Tensor        # [N, D]

    @classmethod
    def load(cls, path) -> "Index":
        """Reads an index folder; a missing or corrupt one raises BadIndex naming the file."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, emb_file = path / "index.json", path / "embeddings.safetensors"
        if not meta_file.is_file():
            raise BadIndex(f"{path} is not a fitclip index (no index.json); build one with `fitclip index`")
        try:
            doc = json.loads(meta_file.read_text())
            meta, videos, broken = doc["meta"], doc["videos"], doc["broken"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BadIndex(f"{meta_file} is corrupt ({err}); rebuild the index with `fitclip index`") from err
        if meta.get("format") != FORMAT:
            raise BadIndex(f"{path} has index format {meta.get('format')}, this fitclip reads {FORMAT}: rebuild it")
        if not videos:
            frames = torch.zeros(0, meta["num_frames"], 0)
            return cls(path, meta, videos, broken, frames, frames[:, 0])
        try:
            t = load_file(str(emb_file))
            frames, mean = t["frames"], t["mean"]
        except Exception as err:  # missing file, truncated header, missing tensor
            raise BadIndex(f"{emb_file} cannot be read ({type(err).__name__}: {err}); rebuild the index") from err
        if frames.dim() != 3 or frames.shape[0] != len(videos) or mean.shape != (frames.shape[0], frames.shape[2]):
            raise BadIndex(f"{emb_file} holds {tuple(frames.shape)} frames and {tuple(mean.shape)} means for "
                              f"{len(videos)} videos in index.json; rebuild the index")
        return cls(path, meta, videos, broken, frames, mean)

    def save(self) -> None:
        """Writes the embeddings, then index.json (each atomically), so a reader never pairs a new
        index.json with old embeddings."""
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        if self.videos:
            fmodel.atomic_write(self.path / "embeddings.safetensors", lambda tmp: save_file(
                {"frames": self.frames.contiguous(), "mean": self.mean.contiguous()}, tmp))
        doc = {"meta": self.meta, "videos": self.videos, "broken": self.broken}
        fmodel.atomic_write(self.path / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))

    def video_file(self, i: int) -> Path:
        """The video's file; for a video inside a shard, the shard (see video_source)."""
        return Path(self.meta["video_dir"]) / self.videos[i]["path"].rsplit(":", 1)[0]

    def video_source(self, i: int):
        """The video's file, or (shard, offset, length) of its bytes inside a shard."""
        v = self.videos[i]
        if "offset" in v:
            return self.video_file(i), v["offset"], v["bytes"]
        return self.video_file(i)

    def thumb_file(self, i: int) -> Path:
        return self.path / "thumbs" / f"{self.videos[i]['id']}.jpg"


# ----------------------------------------------------------------------------- building

class _IndexClips(torch.utils.data.Dataset):
    """Videos -> (preprocessed frames [T, 3, H, W], thumbnail strip [h, w * T, 3] uint8, info dict,
    i) or (None, None, reason, i) for an unreadable video."""

    def __init__(self, files: list[Path], preprocess, num_frames: int):
        self.files, self.preprocess, self.num_frames = files, preprocess, num_frames

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        src = self.files[i]
        try:
            frames, info = fdata.read_frames(read_source(src), self.num_frames, sampling="uniform", return_info=True,
                                             name=f"{src[0]}@{src[1]}" if isinstance(src, tuple) else None)
        except (fdata.VideoDecodeError, OSError) as err:
            return None, None, getattr(err, "reason", str(err)), i
        h, w = frames.shape[-2:]
        tw = max(1, round(w * THUMB_HEIGHT / h))
        thumbs = F.interpolate(frames.float(), size=(THUMB_HEIGHT, tw), mode="bilinear", antialias=True,
                               align_corners=False)
        strip = thumbs.clamp(0, 255).to(torch.uint8).permute(2, 0, 3, 1).reshape(THUMB_HEIGHT, -1, 3)
        return self.preprocess(frames), strip, {**info, "thumb_w": tw}, i


def _collate(batch):
    return batch


@torch.no_grad()
def _encode(model, files: list[Path], num_frames: int, batch_size: int, workers: int, device, thumbs_dir: Path,
            ids: list[str], desc: str):
    """Encodes `files`: ([n_ok, T, D] unit frame embeddings, per-file info or reason)."""
    from PIL import Image
    from tqdm import tqdm

    ds = _IndexClips(files, fdata.frame_preprocess(model), num_frames)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    embs, infos = [], [None] * len(files)
    with tqdm(total=len(files), desc=desc, unit="video", disable=None) as bar:
        for batch in loader:
            ok = [b for b in batch if b[0] is not None]
            for frames, strip, info, i in batch:
                infos[i] = info if frames is not None else {"reason": info}
                if strip is not None:
                    fmodel.atomic_write(thumbs_dir / f"{ids[i]}.jpg",
                                        lambda tmp, s=strip: Image.fromarray(s.numpy()).save(tmp, format="JPEG",
                                                                                              quality=85))
            if ok:
                x = torch.stack([b[0] for b in ok]).to(device)
                e = F.normalize(fmodel.encode_frames(model, x).float(), dim=-1).cpu()
                embs += [(b[3], e[j]) for j, b in enumerate(ok)]
            bar.update(len(batch))
    return dict(embs), infos


def build_index(video_dir, out, model_name: str, pretrained: str | None, *, num_frames: int = 8,
                batch_size: int = 16, workers: int = 0, device: str = "cpu", dtype: str = "float16",
                shards: list[str] | None = None) -> dict:
    """Builds or updates the index at `out` for the videos under `video_dir`, or inside the local
    webdataset `shards` (video_dir None; a shard's videos are re-encoded when it changes); returns
    a report (videos indexed, encoded, kept, dropped, unreadable with reasons)."""
    from .world import World

    out = Path(out)
    if shards:
        shard_paths = [Path(u).resolve() for u in shards]
        video_dir = Path(os.path.commonpath([str(p.parent) for p in shard_paths]))
    else:
        video_dir = Path(video_dir).resolve()
        if not video_dir.is_dir():
            raise InputError(f"VIDEO_DIR must be a folder of videos, got {video_dir} (not a folder)")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"--num-frames must be an int >= 1, got {num_frames!r}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype must be 'float16' or 'float32', got {dtype!r}")
    world = World(device)
    identity = model_identity(model_name, pretrained)
    meta = {"format": FORMAT, "model": model_name, "pretrained": pretrained, "model_identity": identity,
            "num_frames": num_frames, "video_dir": str(video_dir), "dtype": dtype}
    old = None
    if (out / "index.json").exists():
        try:
            old = Index.load(out)
        except BadIndex as err:
            print(f"fitclip index: {err}; building it anew", file=sys.stderr)
        if old is not None and any(old.meta.get(k) != meta[k] for k in ("model_identity", "num_frames", "video_dir")):
            print("fitclip index: the model, --num-frames or the video folder changed; re-encoding every video",
                  file=sys.stderr)
            old = None
    previous = {} if old is None else {(v["path"], v["size"], v["mtime_ns"]): (i, v) for i, v in enumerate(old.videos)}
    entries, todo, sources = [], [], {}
    if shards:
        found = scan_shards(video_dir, shard_paths)
    else:
        found = []
        for rel in scan(video_dir):
            st = (video_dir / rel).stat()
            found.append(((rel.as_posix(), st.st_size, st.st_mtime_ns), video_dir / rel))
    for key, source in found:
        entries.append(key)
        sources[key] = source
        if key not in previous:
            todo.append(key)
    mine = todo[world.rank::world.world]
    model, *_ = fmodel.create(model_name, pretrained, device=world.device)
    ids = [_video_id(*k) for k in mine]
    embs, infos = _encode(model, [sources[k] for k in mine], num_frames, batch_size, workers, world.device,
                          out / "thumbs", ids, desc=f"indexing ({world.rank + 1}/{world.world})" if world.world > 1
                          else "indexing")
    part = {"keys": [list(k) for k in mine], "infos": infos}
    if world.world > 1:  # every rank's share through the (shared) index folder, merged by rank 0
        from safetensors.torch import save_file

        tensors = {str(j): e for j, e in embs.items()} or {"none": torch.zeros(0)}
        fmodel.atomic_write(out / f".part-{world.rank}.safetensors", lambda tmp: save_file(tensors, tmp))
        fmodel.atomic_write(out / f".part-{world.rank}.json", lambda tmp: Path(tmp).write_text(json.dumps(part)))
        import torch.distributed as dist

        dist.barrier()
        if not world.main:
            dist.barrier()
            return {"rank": world.rank, "encoded": len(embs)}
    encoded: dict = {}
    for r in range(world.world):
        if world.world > 1:
            from safetensors.torch import load_file

            p = json.loads((out / f".part-{r}.json").read_text())
            t = load_file(str(out / f".part-{r}.safetensors"))
            e = {int(j): v for j, v in t.items() if j != "none"}
        else:
            p, e = part, embs
        for j, (k, info) in enumerate(zip(p["keys"], p["infos"])):
            encoded[tuple(k)] = (info, e.get(j))
    videos, frames, broken = [], [], []
    store = torch.float16 if dtype == "float16" else torch.float32
    for key in entries:
        if key in previous:
            i, v = previous[key]
            videos.append(v)
            frames.append(old.frames[i].to(store))
            continue
        info, emb = encoded[key]
        if emb is None:
            broken.append({"path": key[0], "reason": info["reason"]})
            continue
        videos.append({"id": _video_id(*key), "path": key[0], "size": key[1], "mtime_ns": key[2],
                       "duration": info["duration"], "times": info["times"], "thumb_w": info["thumb_w"]})
        if isinstance(sources[key], tuple):  # (inside a shard: where its bytes are)
            videos[-1].update(offset=sources[key][1], bytes=sources[key][2])
        frames.append(emb.to(store))
    stack = torch.stack(frames) if frames else torch.zeros(0, num_frames, 0, dtype=store)
    index = Index(out, meta, videos, broken, stack, stack.float().mean(1).to(store) if frames else stack[:, 0])
    index.save()
    keep = {v["id"] for v in videos}
    for f in (out / "thumbs").glob("*.jpg"):  # thumbnails of deleted, changed or unreadable videos
        if f.stem not in keep:
            f.unlink()
    if world.world > 1:
        for r in range(world.world):
            for suffix in (".safetensors", ".json"):
                (out / f".part-{r}{suffix}").unlink(missing_ok=True)
        import torch.distributed as dist

        dist.barrier()
    n_encoded = sum(1 for k in todo if encoded[k][1] is not None)
    return {"index": str(out), "videos": len(videos), "encoded": n_encoded, "kept": len(videos) - n_encoded,
            "dropped": 0 if old is None else sum(1 for k in previous if k not in set(entries)),
            "unreadable": broken}


# ----------------------------------------------------------------------------- searching

def scores(index: Index, query: torch.Tensor) -> torch.Tensor:
    """[N] float32: the mean pooled similarity of every video to the unit query [D], one product
    per chunk of rows in the index's own dtype (float32 accumulation)."""
    q = query.to(index.mean.dtype)
    out = torch.empty(index.mean.shape[0], dtype=torch.float32)
    for r0 in range(0, index.mean.shape[0], CHUNK_ROWS):
        out[r0:r0 + CHUNK_ROWS] = (index.mean[r0:r0 + CHUNK_ROWS] @ q).float()
    return out


def search(index: Index, query: torch.Tensor, k: int = 10, *, rerank: int = 0, rerank_frames: int = 2,
           best_frames: int = 3) -> list[dict]:
    """The k videos most similar to the unit text embedding `query` [D]: path, score, and the
    `best_frames` frames most similar to the query with their times. rerank > 0: the best
    max(k, rerank) by mean pooling are re-scored by the mean of their `rerank_frames` best frames."""
    n = index.mean.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if n == 0:
        return []
    query = F.normalize(query.float().reshape(-1), dim=0)
    if query.shape[0] != index.mean.shape[1]:
        raise ValueError(f"the query embedding has {query.shape[0]} dimensions, the index {index.mean.shape[1]}: "
                         "search with the model the index was built with")
    s = scores(index, query)
    top_s, top = torch.topk(s, min(n, max(k, rerank)))
    if rerank:
        cand = index.frames[top].float()
        fine = topk_frame_similarity(query[None], cand, min(rerank_frames, cand.shape[1]))[0]
        order = torch.argsort(fine, descending=True, stable=True)
        top, top_s = top[order], fine[order]
    top, top_s = top[:k], top_s[:k]
    frames = index.frames[top].float()
    kf = min(best_frames, frames.shape[1])
    idx, sims = select_frames(frames, query.expand(len(top), -1).contiguous(), kf)
    results = []
    for r, (i, sc) in enumerate(zip(top.tolist(), top_s.tolist())):
        v = index.videos[i]
        best = sorted(zip(idx[r].tolist(), sims[r].tolist()), key=lambda t: -t[1])
        results.append({"rank": r + 1, "id": v["id"], "path": v["path"], "score": sc, "duration": v["duration"],
                        "best_frames": [{"frame": f, "time": v["times"][f], "score": fs} for f, fs in best]})
    return results


class Searcher:
    """An index with the model it was built with, for repeated queries (the CLI and the server)."""

    def __init__(self, index_path, device: str = "cpu"):
        self.index = Index.load(index_path)
        meta = self.index.meta
        self.model, _, _, self.tokenizer = fmodel.create(meta["model"], meta["pretrained"], device=device)
        self.model.eval()
        self.device = device

    @torch.no_grad()
    def embed(self, text: str) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer([text]).to(self.device)).float(), dim=-1)[0].cpu()

    def query(self, text: str, k: int = 10, rerank: int = 0, rerank_frames: int = 2) -> list[dict]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the query is empty: type what the video should show")
        return search(self.index, self.embed(text), k, rerank=rerank, rerank_frames=rerank_frames)


# ----------------------------------------------------------------------------- command line

def index_main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="fitclip index", description="index a folder of videos for text search")
    p.add_argument("video_dir", nargs="?", default=None, help="folder of videos (searched recursively)")
    p.add_argument("--shards", default=None, help="index the videos inside local webdataset shards instead "
                   "(video2dataset's layout), a brace pattern such as 'data/shard-{000000..000099}.tar'")
    p.add_argument("--out", required=True, help="index folder (created; updated when it exists)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture name (default: %(default)s)")
    p.add_argument("--pretrained", default="openai", help="open_clip tag or checkpoint file (default: %(default)s)")
    p.add_argument("--num-frames", type=int, default=8, help="frames encoded per video (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="videos per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding videos (default: 0)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="stored embedding precision (default: %(default)s)")
    a = p.parse_args(argv)
    if bool(a.video_dir) == bool(a.shards):
        raise InputError("give a VIDEO_DIR or --shards (one of them)")
    shards = None
    if a.shards:  # (before the model is loaded)
        from .shards import shard_urls

        shards = shard_urls("--shards", a.shards)
        remote = [u for u in shards if u.startswith("pipe:") or "://" in u]
        if remote:
            raise InputError(f"--shards: the page plays videos from local shards; {remote[0]} is not a local file")
    else:
        existing_dir("VIDEO_DIR", a.video_dir)
    pretrained_path("--pretrained", a.pretrained)
    rep = build_index(a.video_dir, a.out, a.model, None if a.pretrained == "none" else a.pretrained,
                      num_frames=a.num_frames, batch_size=a.batch_size, workers=a.workers, device=a.device,
                      dtype=a.dtype, shards=shards)
    if "rank" not in rep or rep.get("rank") == 0:
        print(f"{rep['index']}: {rep['videos']} videos ({rep['encoded']} encoded, {rep['kept']} kept, "
              f"{rep['dropped']} dropped), {len(rep['unreadable'])} unreadable")
        for b in rep["unreadable"]:
            print(f"  unreadable: {b['path']}: {b['reason']}")
    return rep


def search_main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="fitclip search", description="search an index built by `fitclip index`")
    p.add_argument("index", help="index folder")
    p.add_argument("query", help="what the video should show, e.g. 'a dog catching a frisbee'")
    p.add_argument("-k", type=int, default=10, help="results (default: %(default)s)")
    p.add_argument("--rerank", type=int, default=0,
                   help="re-score this many best candidates by their 2 best frames (default: 0, off)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' for the text encoder")
    a = p.parse_args(argv)
    try:
        results = Searcher(a.index, a.device).query(a.query, a.k, a.rerank)
    except (BadIndex, ValueError, RuntimeError, FileNotFoundError) as err:  # (a model checkpoint moved, too)
        print(f"fitclip search: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            times = ", ".join(f"{b['time']:.1f}s" for b in r["best_frames"])
            print(f"{r['rank']:3d}  {r['score']:.4f}  {r['path']}  (best frames at {times})")
    return results
