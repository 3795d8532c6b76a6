"""Video-text collections stored as webdataset shards, in video2dataset's layout: tar files whose
samples are `<key>.mp4` (or another container torchcodec reads, found by its extension),
`<key>.txt` (the caption) and `<key>.json` (metadata, optional).

- `write_shards` (`fitclip shards --csv videos.csv --out DIR`): a CSV's videos into shards with
  webdataset's ShardWriter, each video checked to decode first (unreadable files reported, not
  written).
- `ShardStream`: the samples of a list of shards as a stream of batches (webdataset reads and
  splits them; torchcodec decodes the video bytes in memory, frames sampled as for files: random
  in each interval for training, the middle for evaluation).

Exactly once per epoch: the shard list is permuted by (seed, epoch) and shard i goes to slot
i mod (ranks x workers), so with at least as many shards as slots every sample is read by one
worker of one rank (fewer shards are an error that names the numbers). Each worker shuffles
its samples in a buffer seeded by (seed, epoch, rank, worker) and groups them into batches of
`batch_size` samples before decoding; a batch carries (worker, index in that worker's stream),
so a run stopped mid-epoch resumes by skipping, without decoding, the batches each worker had
delivered: none read twice, none skipped. A sample whose video does not decode or that has no
caption is reported by shard and key and left out of its batch; a missing or unreadable shard
is an error naming it.
"""
from __future__ import annotations

import argparse
import json
import random
import zlib
from pathlib import Path

import torch

from .errors import InputError

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")


def _local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def shard_urls(flag: str, pattern: str) -> list[str]:
    """The shards a webdataset brace pattern names ("data-{000000..000099}.tar", "::" between
    patterns; `pipe:` and URLs are passed to webdataset as they are); local ones must exist."""
    import webdataset as wds

    urls = wds.shardlists.expand_urls(pattern)
    if not urls:
        raise InputError(f"{flag}: the pattern {pattern!r} names no shard")
    missing = [u for u in urls if _local(u) and not Path(u).is_file()]
    if missing:
        raise InputError(f"{flag}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    return urls


def check_slots(flag: str, urls: list[str], ranks: int, workers: int) -> None:
    """Every sample once per epoch needs a shard for each (rank, worker)."""
    slots = ranks * max(1, workers)
    if len(urls) < slots:
        raise InputError(f"{flag}: {len(urls)} shards for {ranks} process(es) x {max(1, workers)} DataLoader "
                         f"worker(s) = {slots} readers; each reader needs a shard of its own (write more, smaller "
                         "shards with `fitclip shards --max-count`, or use fewer workers)")


# ----------------------------------------------------------------------------- reading

class ShardStream(torch.utils.data.IterableDataset):
    """Batches of (frames [b, F, 3, H, W] or None, captions, broken "shard:key (reason)" names,
    keys) from this rank's shards, each with its position (worker, index in the worker's
    stream). `set_epoch(epoch, skip)` before iterating: `skip[w]` batches of worker w are passed
    over without decoding (a resumed epoch). The DataLoader over it must not keep persistent
    workers (they would keep the previous epoch's copy)."""

    def __init__(self, urls: list[str], preprocess, num_frames: int, sampling: str, seed: int, batch_size: int,
                 rank: int = 0, ranks: int = 1, shuffle_buffer: int = 256):
        self.urls, self.preprocess, self.num_frames, self.sampling = urls, preprocess, num_frames, sampling
        self.seed, self.batch_size, self.rank, self.ranks = seed, batch_size, rank, ranks
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.skip = 0, {}

    def set_epoch(self, epoch: int, skip: dict | None = None) -> "ShardStream":
        self.epoch, self.skip = epoch, dict(skip or {})
        return self

    def my_shards(self, worker: int, workers: int) -> list[str]:
        order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(
            self.seed * 1000003 + self.epoch)).tolist()
        slots = self.ranks * workers
        return [self.urls[i] for i in order[self.rank * workers + worker::slots]]

    def samples(self, worker: int, workers: int):
        """This worker's raw samples (dicts of bytes, as webdataset groups a tar's files by key)."""
        import webdataset as wds

        def named(exn):  # a missing or truncated shard: an error that names it
            url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in shards), None)
            raise InputError(f"shard {url or shards}: cannot be read ({type(exn).__name__}: {exn.args[0]})") from exn

        shards = self.my_shards(worker, workers)
        stream = wds.tarfile_to_samples(handler=named)({"url": u} for u in shards)
        if self.shuffle_buffer > 1:
            rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)) & 0x7FFFFFFF)
            stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        return stream

    def decode(self, sample: dict, generator: torch.Generator):
        from .data import VideoDecodeError, read_frames

        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        ext = next((e for e in VIDEO_EXTENSIONS if e in sample), None)
        if ext is None:
            return None, None, f"{name} (no video: {sorted(k for k in sample if not k.startswith('__'))})"
        if "txt" not in sample:
            return None, None, f"{name} (no caption)"
        try:
            frames = read_frames(sample[ext], self.num_frames, sampling=self.sampling, generator=generator, name=name)
        except VideoDecodeError as err:
            return None, None, f"{name} ({err.reason})"
        return self.preprocess(frames), sample["txt"].decode("utf-8").strip(), name

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = self.skip.get(worker, 0)
        raw, index = [], 0
        for sample in self.samples(worker, workers):
            raw.append(sample)
            if len(raw) == self.batch_size:
                if index >= skip:
                    yield self.batch(raw, worker, index)
                raw, index = [], index + 1
        if raw and index >= skip:
            yield self.batch(raw, worker, index)

    def batch(self, raw: list[dict], worker: int, index: int):
        frames, captions, broken, keys = [], [], [], []
        for sample in raw:
            key = zlib.crc32(str(sample.get("__key__")).encode())  # (str hashes differ between processes)
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, key)) & 0x7FFFFFFF)
            f, caption, name = self.decode(sample, g)
            if f is None:
                broken.append(name)
            else:
                frames.append(f)
                captions.append(caption)
                keys.append(name)
        batch = (torch.stack(frames) if frames else None, captions, broken, keys)
        return batch, (worker, index)


def _as_is(item):
    return item


class StreamLoader:
    """A DataLoader over a ShardStream for one epoch at a time, tracking the position to resume
    from: `position()` = {worker: batches delivered}."""

    def __init__(self, stream: ShardStream, workers: int, pin_memory: bool = False):
        self.stream, self.workers, self.pin = stream, workers, pin_memory
        self.done: dict[int, int] = {}

    def epoch(self, epoch: int, position: dict | None = None):
        self.done = {int(w): int(n) for w, n in (position or {}).items()}
        self.stream.set_epoch(epoch, self.done)
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, collate_fn=_as_is,
                                             num_workers=self.workers, pin_memory=self.pin,
                                             prefetch_factor=4 if self.workers else None)
        for batch, (worker, index) in loader:
            self.done[worker] = index + 1
            yield batch

    def position(self) -> dict:
        return dict(self.done)


class ShardLoaders:
    """The trainer's data from shards (the counterpart of data.Loaders): the labeled stream, and
    the unlabeled one beside it (None without), whose passes restart when it runs out before the
    labeled one. `epoch(epoch, position)` yields (labeled batch, unlabeled batch or None) as
    data.collate makes them, from `position` (what `position()` returned when the run stopped);
    the epoch ends for every rank when one rank's labeled shards are done."""

    def __init__(self, labeled: ShardStream, unlabeled: ShardStream | None, workers: int, world, pin: bool = False):
        self.labeled = StreamLoader(labeled, workers, pin)
        self.unlabeled = StreamLoader(unlabeled, workers, pin) if unlabeled is not None else None
        self.world = world
        self.upass = 0

    def _unlabeled(self, epoch: int, position: dict):
        self.upass = int(position.get("pass", 0))
        done = position.get("done")
        while True:
            n = 0
            for batch in self.unlabeled.epoch(epoch * 100003 + self.upass, done):
                n += 1
                yield batch
            if n == 0 and not done:
                return  # (no unlabeled sample at all)
            self.upass, done = self.upass + 1, None

    def epoch(self, epoch: int, position: dict | None = None):
        position = position or {}
        labeled = self.labeled.epoch(epoch, position.get("labeled"))
        unlabeled = self._unlabeled(epoch, position.get("unlabeled", {})) if self.unlabeled is not None else None
        while True:
            item = next(labeled, None)
            if self.world.min(0 if item is None else 1) == 0:  # every rank stops together
                return
            yield item, (next(unlabeled, None) if unlabeled is not None else None)

    def position(self) -> dict:
        pos = {"labeled": self.labeled.position()}
        if self.unlabeled is not None:
            pos["unlabeled"] = {"pass": self.upass, "done": self.unlabeled.position()}
        return pos


# ----------------------------------------------------------------------------- writing

def _probe(data: bytes) -> str | None:
    """None if torchcodec decodes the video's first frame, else the reason."""
    from torchcodec.decoders import VideoDecoder

    try:
        decoder = VideoDecoder(data, seek_mode="approximate")
        if not (decoder.metadata.num_frames or len(decoder)):
            return "the video stream has no frames"
        decoder.get_frame_at(0)
    except Exception as err:  # torchcodec's errors for what is not a readable video
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


def write_shards(samples, out_dir, max_count: int = 1000, progress: bool = True) -> dict:
    """Writes VideoText samples (data.load_caption_csv) to out_dir/shard-%06d.tar, max_count
    samples a shard, keys the zero-padded sample index: `<key>.<ext>` (the file's bytes, its
    extension), `<key>.txt` (the first caption), `<key>.json` ({"source": path, "captions"}).
    Returns {"shards": [...], "written": n, "unreadable": [{"path", "reason"}]}."""
    import webdataset as wds
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, unreadable = 0, []
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_count, verbose=0) as sink:
        for i, s in enumerate(tqdm(samples, desc="shards", unit="video", disable=not progress or None)):
            path = Path(s.video)
            ext = path.suffix.lstrip(".").lower() or "mp4"
            if not path.is_file():
                unreadable.append({"path": str(path), "reason": "no such file"})
                continue
            data = path.read_bytes()
            reason = _probe(data)
            if reason is None and ext not in VIDEO_EXTENSIONS:
                reason = f"extension .{ext} is not one of {VIDEO_EXTENSIONS}"
            if reason is not None:
                unreadable.append({"path": str(path), "reason": reason})
                continue
            sink.write({"__key__": f"{i:09d}", ext: data, "txt": (s.captions[0] if s.captions else ""),
                        "json": {"source": str(path), "captions": s.captions}})
            written += 1
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    return {"shards": shards, "written": written, "unreadable": unreadable}


def shards_main(argv=None) -> dict:
    from .data import load_caption_csv
    from .errors import existing_file

    p = argparse.ArgumentParser(prog="fitclip shards", description="write a CSV's videos and captions into "
                                "webdataset shards in video2dataset's layout")
    p.add_argument("--csv", required=True, help="a CSV with video path and caption columns (as for fitclip train)")
    p.add_argument("--video-root", default=None, help="folder the CSV's paths are relative to (default: the CSV's)")
    p.add_argument("--out", required=True, help="output folder (created): shard-000000.tar, ...")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard (default: %(default)s)")
    a = p.parse_args(argv)
    existing_file("--csv", a.csv)
    if a.max_count < 1:
        raise InputError(f"--max-count must be >= 1, got {a.max_count}")
    report = write_shards(load_caption_csv(a.csv, a.video_root), a.out, a.max_count)
    for u in report["unreadable"]:
        print(f"fitclip shards: skipped unreadable {u['path']}: {u['reason']}")
    n = len(report["shards"])
    print(f"wrote {report['written']} videos to {n} shard(s) in {a.out}"
          + (f" ({len(report['unreadable'])} unreadable, skipped)" if report["unreadable"] else "")
          + (f"; train with --train-shards '{a.out}/shard-{{000000..{n - 1:06d}}}.tar'" if n else ""))
    (Path(a.out) / "shards.json").write_text(json.dumps(report, indent=1))
    return report
