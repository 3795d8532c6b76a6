"""Video input for training and evaluation: frames decoded with torchcodec, and the data set
layouts as they are distributed (see the README's data section).

`read_frames` samples `num_frames` frames from equal intervals of a clip ("uniform": the middle
frame of each interval, for evaluation; "random": one random frame inside each interval, for
training). A file that cannot be decoded raises `VideoDecodeError` naming it; nothing is ever
replaced by black frames.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InputError

if TYPE_CHECKING:  # (annotations only: the trainer's config and process group import this module)
    from .train_config import TrainConfig
    from .world import World

SAMPLINGS = ("uniform", "random")


class VideoDecodeError(RuntimeError):
    """A video file could not be decoded (missing, truncated, not a video, no video stream)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


def frame_indices(num_available: int, num_frames: int, sampling: str = "uniform",
                  generator: torch.Generator | None = None) -> list[int]:
    """Indices of `num_frames` frames out of `num_available`, one per equal interval: the middle
    one ("uniform") or a random one ("random"). Fewer frames than asked repeat frames."""
    if num_available < 1:
        raise ValueError(f"num_available must be >= 1, got {num_available}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    step = num_available / num_frames
    out = []
    for i in range(num_frames):
        lo = min(num_available - 1, math.floor(i * step))
        hi = max(lo, min(num_available - 1, math.ceil((i + 1) * step) - 1))
        if sampling == "uniform":
            out.append(min(num_available - 1, math.floor((i + 0.5) * step)))
        else:
            out.append(int(torch.randint(lo, hi + 1, (1,), generator=generator)))
    return out


def read_frames(path, num_frames: int, *, sampling: str = "uniform", generator: torch.Generator | None = None,
                num_threads: int = 1, segment: tuple[float, float] | None = None, device: str = "cpu",
                return_info: bool = False, name: str | None = None):
    """uint8 [num_frames, 3, H, W] frames of the video at `path` (see `frame_indices`), taken from
    the whole clip or from `segment` = (start, end) seconds, decoded on `device` ("cuda": torchcodec's
    NVDEC decoder, frames returned on the GPU). `path` may also be the video file's bytes (a
    shard's sample, decoded in memory), `name` then naming it in errors. return_info: (frames,
    {"times": each frame's presentation time in seconds, "duration": the video's in seconds})."""
    from torchcodec.decoders import VideoDecoder

    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if isinstance(path, (bytes, bytearray)):
        source, path = bytes(path), name or "<video bytes>"
    else:
        path = Path(path)
        if not path.is_file():
            raise VideoDecodeError(path, "no such file")
        source = str(path)
    try:
        decoder = VideoDecoder(source, num_ffmpeg_threads=num_threads, seek_mode="approximate",
                               **({"device": device} if device != "cpu" else {}))
        available = decoder.metadata.num_frames or len(decoder)
    except Exception as err:  # torchcodec raises RuntimeError/ValueError for bad containers
        raise VideoDecodeError(path, f"{type(err).__name__}: {err}") from err
    if not available:
        raise VideoDecodeError(path, "the video stream has no frames")
    first = 0
    if segment is not None:
        fps = decoder.metadata.average_fps
        if not fps:
            raise VideoDecodeError(path, "no frame rate: cannot locate the segment")
        first = min(available - 1, max(0, int(segment[0] * fps)))
        available = max(1, min(available, math.ceil(segment[1] * fps)) - first)
    idx = [first + j for j in frame_indices(available, num_frames, sampling, generator)]
    order = sorted(set(idx))
    try:
        batch = decoder.get_frames_at(order)
    except Exception as err:  # a truncated file fails here, past its header
        raise VideoDecodeError(path, f"{type(err).__name__}: {err}") from err
    where = {j: n for n, j in enumerate(order)}
    pos = [where[j] for j in idx]
    frames = batch.data[pos]
    if not return_info:
        return frames
    times = [float(batch.pts_seconds[n]) for n in pos]
    duration = decoder.metadata.duration_seconds or (times[-1] if times else 0.0)
    return frames, {"times": times, "duration": float(duration)}


# ----------------------------------------------------------------------------- data set layouts

@dataclass
class VideoText:
    """One video with its caption(s) (retrieval, training) or class label (action recognition)."""

    video: str
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    segment: tuple[float, float] | None = None  # seconds, for segment-level annotations


def _video_path(root: Path, value: str) -> str:
    p = Path(value)
    return str(p if p.is_absolute() else root / p)


def load_caption_csv(csv_path, video_root=None, *, video_column=None, caption_column=None,
                     id_column=None, extension=".mp4") -> list[VideoText]:
    """Generic (WebVid-style) CSV: a video path column (or an id column plus `video_root` and
    `extension`) and a caption column. Column names are guessed when not given."""
    csv_path = Path(csv_path)
    root = Path(video_root) if video_root is not None else csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        caption_column = caption_column or next((c for c in ("caption", "name", "sentence", "text") if c in cols), None)
        video_column = video_column or next((c for c in ("video", "path", "video_path", "filename") if c in cols), None)
        id_column = id_column or next((c for c in ("videoid", "video_id", "id") if c in cols), None)
        if caption_column is None or (video_column is None and id_column is None):
            raise InputError(f"{csv_path}: needs a caption column and a video path or id column, got columns {cols}")
        out = []
        for row in reader:
            video = row[video_column] if video_column else row[id_column] + extension
            out.append(VideoText(_video_path(root, video), [row[caption_column]]))
    return out


def load_msrvtt(root, split: str = "test_1k") -> list[VideoText]:
    """MSR-VTT: "test_1k" reads MSRVTT_JSFUSION_test.csv (1,000 pairs, the 1k-A protocol);
    "train_9k" reads MSRVTT_train.9k.csv and takes every caption of those videos from
    MSRVTT_data.json. Videos are <root>/videos/all/<id>.mp4 or <root>/<id>.mp4."""
    root = Path(root)
    video_dir = next((d for d in (root / "videos" / "all", root / "videos", root) if d.is_dir()), root)
    if split == "test_1k":
        with open(root / "MSRVTT_JSFUSION_test.csv", newline="") as f:
            return [VideoText(str(video_dir / f"{r['video_id']}.mp4"), [r["sentence"]]) for r in csv.DictReader(f)]
    if split == "train_9k":
        with open(root / "MSRVTT_train.9k.csv", newline="") as f:
            ids = [r["video_id"] for r in csv.DictReader(f)]
        data = json.loads((root / "MSRVTT_data.json").read_text())
        caps: dict[str, list[str]] = {}
        for s in data["sentences"]:
            caps.setdefault(s["video_id"], []).append(s["caption"])
        return [VideoText(str(video_dir / f"{v}.mp4"), caps.get(v, [])) for v in ids]
    raise ValueError(f"split must be 'test_1k' or 'train_9k', got {split!r}")


def split_camel_case(name: str) -> str:
    """"ApplyEyeMakeup" -> "apply eye makeup"; "YoYo" -> "yo yo"; snake_case -> spaces."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name.replace("_", " "))
    return " ".join(words.split()).lower()


def load_ucf101(root, split: int = 1, subset: str = "test") -> tuple[list[VideoText], list[str]]:
    """UCF101: UCF-101/<Class>/v_<Class>_gXX_cYY.avi with ucfTrainTestlist/{classInd,
    trainlist0N, testlist0N}.txt. Returns (samples with 0-based labels, readable class names)."""
    root = Path(root)
    lists = root / "ucfTrainTestlist"
    classes = {}
    for line in (lists / "classInd.txt").read_text().split("\n"):
        if line.strip():
            num, name = line.split()
            classes[name] = int(num) - 1
    names = [split_camel_case(n) for n, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    fname = f"{'trainlist' if subset == 'train' else 'testlist'}0{split}.txt"
    videos = root / "UCF-101" if (root / "UCF-101").is_dir() else root
    out = []
    for line in (lists / fname).read_text().split("\n"):
        if line.strip():
            rel = line.split()[0]
            out.append(VideoText(str(videos / rel), label=classes[rel.split("/")[0]]))
    return out, names


def load_hmdb51(root, split_dir, split: int = 1, subset: str = "test") -> tuple[list[VideoText], list[str]]:
    """HMDB51: <root>/<class>/<name>.avi and <split_dir>/<class>_test_split<N>.txt files whose
    lines are "<name>.avi <tag>" (1 train, 2 test, 0 unused)."""
    root, split_dir = Path(root), Path(split_dir)
    files = sorted(split_dir.glob(f"*_test_split{split}.txt"))
    if not files:
        raise InputError(f"no *_test_split{split}.txt files in {split_dir}")
    want = "1" if subset == "train" else "2"
    class_names = [f.name[: -len(f"_test_split{split}.txt")] for f in files]
    out = []
    for label, (cls, f) in enumerate(zip(class_names, files)):
        for line in f.read_text().split("\n"):
            parts = line.split()
            if len(parts) == 2 and parts[1] == want:
                out.append(VideoText(str(root / cls / parts[0]), label=label))
    return out, [split_camel_case(c) for c in class_names]


def load_didemo(root, split: str = "test", video_dir=None, mode: str = "paragraph") -> list[VideoText]:
    """DiDeMo {split}_data.json (list of {video, description, times}). "paragraph": each video's
    descriptions joined, in file order (paragraph-to-video retrieval); "segment": one sample per
    description over its moment (times are 5-second chunk indices; the annotators' first
    [start, end] is used)."""
    root = Path(root)
    vdir = Path(video_dir) if video_dir else root / "videos"
    items = json.loads((root / f"{split}_data.json").read_text())
    if mode == "segment":
        out = []
        for item in items:
            start, end = item["times"][0]
            out.append(VideoText(str(vdir / item["video"]), [item["description"].strip()],
                                 segment=(5.0 * start, 5.0 * (end + 1))))
        return out
    if mode != "paragraph":
        raise ValueError(f"mode must be 'paragraph' or 'segment', got {mode!r}")
    paragraphs: dict[str, list[str]] = {}
    for item in items:
        paragraphs.setdefault(item["video"], []).append(item["description"].strip())
    return [VideoText(str(vdir / v), [" ".join(d)]) for v, d in paragraphs.items()]


def load_youcook2(root, split: str = "validation", video_dir=None) -> list[VideoText]:
    """YouCook2 youcookii_annotations_trainval.json: one sample per annotated segment
    (database[vid].annotations[] with segment [start, end] and sentence)."""
    root = Path(root)
    vdir = Path(video_dir) if video_dir else root / "videos"
    db = json.loads((root / "youcookii_annotations_trainval.json").read_text())["database"]
    out = []
    for vid, entry in db.items():
        if entry.get("subset") not in (split, None):
            continue
        path = next((str(p) for p in vdir.glob(f"**/{vid}.*")), str(vdir / f"{vid}.mp4"))
        for ann in entry["annotations"]:
            s, e = ann["segment"]
            out.append(VideoText(path, [ann["sentence"]], segment=(float(s), float(e))))
    return out


def load_activitynet(root, split: str = "val_1", video_dir=None, mode: str = "paragraph") -> list[VideoText]:
    """ActivityNet Captions {split}.json mapping video id to {duration, timestamps, sentences}.
    "paragraph": the sentences joined (paragraph-to-video); "segment": one sample per sentence
    over its [start, end] seconds."""
    root = Path(root)
    vdir = Path(video_dir) if video_dir else root / "videos"
    data = json.loads((root / f"{split}.json").read_text())
    if mode not in ("paragraph", "segment"):
        raise ValueError(f"mode must be 'paragraph' or 'segment', got {mode!r}")
    out = []
    for vid, entry in data.items():
        path = next((str(p) for p in vdir.glob(f"{vid}.*")), str(vdir / f"{vid}.mp4"))
        if mode == "segment":
            for (start, end), sentence in zip(entry["timestamps"], entry["sentences"]):
                out.append(VideoText(path, [sentence.strip()], segment=(float(start), float(end))))
        else:
            out.append(VideoText(path, [" ".join(s.strip() for s in entry["sentences"])]))
    return out


# ----------------------------------------------------------------------------- training clips

def check_decode_device(device: str, workers: int, probe: str | None = None) -> None:
    """A clear error for a decode device that cannot work, before training starts: "cuda" needs a
    GPU, torchcodec's CUDA decoder (an FFmpeg with NVDEC), and decoding in the main process."""
    if device == "cpu":
        return
    if device != "cuda":
        raise ValueError(f"--decode-device must be 'cpu' or 'cuda', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError("--decode-device cuda needs a CUDA GPU, and torch sees none (use --decode-device cpu)")
    if workers:
        raise ValueError("--decode-device cuda decodes in the main process (CUDA cannot be used in forked "
                         f"DataLoader workers): pass --workers 0, got --workers {workers}")
    if probe is not None and Path(probe).is_file():
        from torchcodec.decoders import VideoDecoder

        try:
            VideoDecoder(str(probe), device="cuda")
        except Exception as err:
            raise RuntimeError(f"--decode-device cuda: torchcodec's CUDA decoder failed on {probe} ({err}); its "
                               "FFmpeg may lack NVDEC support. Use --decode-device cpu.") from err


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
    """Samples -> (frames [F, 3, H, W] float, caption, path, index) from the sample's clip or
    segment; broken videos -> (None, None, path, index). Training and evaluation both read
    through it. A key is a sample index, or (epoch, index): the frames a clip gives depend only on
    (seed, epoch, index), so runs resume exactly and persistent DataLoader workers, whose copy of
    the dataset never sees the main process's attributes change, sample a new epoch's frames."""

    def __init__(self, samples, preprocess, num_frames, sampling, seed, decode_device: str = "cpu"):
        self.samples, self.preprocess, self.num_frames = samples, preprocess, num_frames
        self.sampling, self.seed, self.decode_device = sampling, seed, decode_device

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        s = self.samples[i]
        g = torch.Generator().manual_seed(hash((self.seed, epoch, i)) & 0x7FFFFFFF)
        try:
            frames = read_frames(s.video, self.num_frames, sampling=self.sampling, generator=g, segment=s.segment,
                                 device=self.decode_device)
        except VideoDecodeError:
            return None, None, s.video, i
        return self.preprocess(frames), (s.captions[0] if s.captions else ""), s.video, i


class EpochBatches(torch.utils.data.Sampler):
    """A DataLoader's batch sampler whose batches are replaced every epoch (`set`): one loader,
    and with it one set of persistent workers, serves the whole run. Yields lists of
    (epoch, index) keys for ClipDataset."""

    def __init__(self):
        self.epoch, self.batches = 0, []

    def set(self, epoch: int, batches: list[list[int]]) -> "EpochBatches":
        self.epoch, self.batches = epoch, batches
        return self

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter([[(self.epoch, i) for i in b] for b in self.batches])


def collate(batch):
    """ClipDataset items -> (frames [B, F, 3, H, W] or None, captions, broken video paths, the
    readable items' sample indices)."""
    ok = [b for b in batch if b[0] is not None]
    broken = [b[2] for b in batch if b[0] is None]
    if not ok:
        return None, [], broken, []
    return torch.stack([b[0] for b in ok]), [b[1] for b in ok], broken, [b[3] for b in ok]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of n items in an epoch: a function of (seed, epoch) only, so runs resume exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()


# ----------------------------------------------------------------------------- the trainer's batches

def rank_batches(n: int, cfg: TrainConfig, world: World, epoch: int) -> list[list[int]]:
    """This rank's slice of every global batch of the epoch (fixed by seed and epoch: resumable)."""
    order = epoch_order(n, cfg.seed, epoch)
    global_bs = cfg.batch_size * world.world
    return [order[i + world.rank * cfg.batch_size:i + (world.rank + 1) * cfg.batch_size]
            for i in range(0, len(order) - global_bs + 1, global_bs)]


def unlabeled_batches(uds, cfg: TrainConfig, world: World, epoch: int, first: int, end: int) -> list[list[int]]:
    """This rank's unlabeled clips for labeled batches [first, end) of the epoch: batch b takes
    the next unlabeled_batch_size clips of the epoch's order after the other ranks' (wrapping)."""
    uorder = epoch_order(len(uds), cfg.seed + 1, epoch)
    ub = cfg.unlabeled_batch_size
    return [[uorder[((b * world.world + world.rank) * ub + j) % len(uds)] for j in range(ub)]
            for b in range(first, end)]


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
