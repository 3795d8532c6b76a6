"""The embedded demo (`make demo`): FitCLIP on a synthetic video-text world, offline, on a CPU.

1. A world of coloured shapes that grow, bounce, slide or spin: what happens shows only in the set
   of a clip's frames (mean pooling ignores order), some frames of every clip miss the object
   (frame selection matters), and frames look like video (noise, blur, H.264 compression).
2. A tiny CLIP is pre-trained on clean still images captioned "a red square": the stand-in for a
   pretrained image-text model, which has never seen motion.
3. FitCLIP fine-tunes a student on labeled clips ("a red square spinning") plus unlabeled clips
   distilled from the frozen image model, with top-k temporal sampling; then WiSE-FT.
4. Zero-shot evaluation on held-out colour x shape x motion combinations: action recognition over
   the four motions and text-to-video retrieval. Prints a before/after table, writes
   results.json and plots. The numbers are whatever this run measures.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 70, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "triangle", "bar")
MOTIONS = ("growing", "bouncing", "sliding", "spinning")
SIZE = 32


def _shape_mask(shape: str, size: float, cx: float, cy: float, angle: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    x, y = xs - cx, ys - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y  # object coordinates
    h = size / 2
    if shape == "square":
        return (u.abs() <= h) & (v.abs() <= h)
    if shape == "bar":
        return (u.abs() <= h * 1.4) & (v.abs() <= h * 0.35)
    return (v <= h) & (v >= -h) & (u.abs() <= (v + h) / 2)  # triangle pointing "up" in object space


def render(colour: str, shape: str, size: float, cx: float, cy: float, angle: float, visible: bool,
           g: torch.Generator, video_like: bool) -> torch.Tensor:
    """One uint8 frame [3, SIZE, SIZE]."""
    base = torch.full((3, SIZE, SIZE), 90.0) + (torch.randn(3, 1, 1, generator=g) * 10 if video_like else 0)
    if visible:
        m = _shape_mask(shape, size, cx, cy, angle)
        base[:, m] = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None]
    if video_like:
        base = F.avg_pool2d(base[None], 3, stride=1, padding=1, count_include_pad=False)[0]  # blur
        base = base + torch.randn(base.shape, generator=g) * 12  # sensor noise
    return base.clamp(0, 255).to(torch.uint8)


def render_clip(colour, shape, motion, num_frames, g) -> torch.Tensor:
    """[num_frames, 3, SIZE, SIZE]: the motion plays over the clip; a quarter of the frames miss
    the object (occlusion, cuts), which is what temporal sampling learns to skip."""
    frames = []
    cx0, cy0 = 16 + torch.randint(-3, 4, (1,), generator=g).item(), 16 + torch.randint(-3, 4, (1,), generator=g).item()
    angle0 = torch.rand(1, generator=g).item() * math.pi
    empty = set(torch.randperm(num_frames, generator=g)[: num_frames // 4].tolist())
    for t in range(num_frames):
        p = t / max(1, num_frames - 1)
        size, cx, cy, angle, visible = 12.0, cx0, cy0, angle0, True
        if motion == "growing":
            size = 4 + 14 * p
        elif motion == "bouncing":
            cy = 6 + 20 * (1 - abs(2 * p - 1))  # up and back down
        elif motion == "sliding":
            cx = 6 + 20 * p
        elif motion == "spinning":
            angle = angle0 + p * math.pi * 0.9
        frames.append(render(colour, shape, size, cx, cy, angle, visible and t not in empty, g, video_like=True))
    return torch.stack(frames)


def still(colour, shape, g) -> torch.Tensor:
    size = 8 + torch.rand(1, generator=g).item() * 6  # photos: the object mid-sized, near the centre
    cx, cy = (12 + torch.rand(2, generator=g) * 8).tolist()
    return render(colour, shape, size, cx, cy, torch.rand(1, generator=g).item() * math.pi, True, g, video_like=False)


def make_world(out: Path, num_frames: int, clips_per_combo: int, seed: int) -> dict:
    """Writes the clips as H.264 mp4 files and labeled / unlabeled / test CSVs."""
    from torchcodec.encoders import VideoEncoder

    g = torch.Generator().manual_seed(seed)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rows = {"labeled": [], "unlabeled": [], "test": []}
    n = 0
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            for mi, motion in enumerate(MOTIONS):
                # unseen colour x shape x motion combinations: two motions of every colour x shape
                # (so text-to-video retrieval needs the motion, not only colour and shape)
                held_out = (ci + si + mi) % 2 == 0
                for j in range(clips_per_combo):
                    path = out / "clips" / f"clip{n:04d}.mp4"
                    VideoEncoder(render_clip(colour, shape, motion, num_frames, g), frame_rate=8).to_file(str(path))
                    n += 1
                    if held_out:
                        rows["test"].append((path.name, f"a {colour} {shape} {motion}", motion))
                    elif j % 2 == 0:
                        rows["labeled"].append((path.name, f"a {colour} {shape} {motion}", motion))
                    else:  # unlabeled: only a weak caption without the motion
                        rows["unlabeled"].append((path.name, f"a {colour} {shape}", motion))
    for name, items in rows.items():
        lines = ["video,caption,motion"] + [f"clips/{v},{c},{m}" for v, c, m in items]
        (out / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return {k: len(v) for k, v in rows.items()}


def pretrain_image_model(out: Path, steps: int, batch: int, seed: int) -> Path:
    """The stand-in for a pretrained image-text model: CLIP on clean stills, no motion words."""
    from tqdm import tqdm

    from . import model as fmodel
    from .contrastive import contrastive_loss
    from .data import frame_preprocess

    torch.manual_seed(seed)
    model, _, _, tok = fmodel.create("fitclip-tiny")
    pre = frame_preprocess(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 7)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for step in tqdm(range(steps), desc="pre-training the image model on stills", disable=None):
        pick = torch.randint(0, len(combos), (batch,), generator=g).tolist()
        images = pre(torch.stack([still(*combos[i], g) for i in pick]))
        texts = [f"a {combos[i][0]} {combos[i][1]}" for i in pick]
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tok(texts)), dim=-1)
        # duplicates in a batch share a caption: soft-label them as positives by averaging CE terms
        loss = contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    path = out / "image_model.safetensors"
    fmodel.save_checkpoint(model.state_dict(), path)
    return path


def evaluate(checkpoint: Path, world: Path, num_frames: int, k: int) -> dict:
    """Zero-shot scores with top-k pooling (the k frames of each clip most similar to the text)."""
    from . import data as fdata
    from . import metrics
    from . import model as fmodel
    from .evaluate import embed_texts, embed_videos, scores

    model, _, _, tok = fmodel.create("fitclip-tiny", str(checkpoint))
    samples = fdata.load_caption_csv(world / "test.csv")
    frame_emb, kept, _ = embed_videos(model, samples, num_frames)
    import csv

    motions = [r["motion"] for r in csv.DictReader(open(world / "test.csv"))]
    labels = torch.tensor([MOTIONS.index(motions[i]) for i in kept])
    encode = lambda texts: embed_texts(model, tok, texts)  # noqa: E731
    # zero-shot action recognition: which of the four motions, prompt-ensembled
    templates = [f"a {c} {s} {{}}" for c in COLOURS for s in SHAPES]  # ensembled over colours and shapes
    class_emb = metrics.class_embeddings(encode, list(MOTIONS), templates)
    cls = metrics.classification_metrics(scores(class_emb, frame_emb, "topk", k).T, labels)
    # text-to-video retrieval over the held-out combinations: each distinct caption against all
    # test clips; every clip of that combination counts as a correct answer
    captions = [samples[i].captions[0] for i in kept]
    unique = sorted(set(captions))
    sim = scores(encode(unique), frame_emb, "topk", k)  # [captions, clips]
    relevant = torch.tensor([[c == u for c in captions] for u in unique])
    best_relevant = sim.masked_fill(~relevant, float("-inf")).max(1, keepdim=True).values
    ranks = ((sim > best_relevant) & ~relevant).sum(1) + 1
    ret = metrics.rank_summary(ranks, "t2v")
    return {"action_top1": cls["top1"], "action_top5": cls["top5"], "t2v_r1": ret["t2v_r1"], "t2v_r5": ret["t2v_r5"],
            "t2v_mdr": ret["t2v_mdr"], "retrieval_captions": len(unique), "test_clips": len(kept)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in zip(axes, ("action_top1", "t2v_r1"), ("zero-shot motion recognition top-1 (%)",
                                                                 "text-to-video R@1 (%)")):
        vals = [results[n][key] for n in names]
        ax.bar(names, vals, color=["#999999", "#3b7dd8", "#2ca02c"][: len(names)])
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(vals):
            ax.text(i, v + 1, f"{v:.1f}", ha="center")
        ax.set_ylim(0, 105)
    fig.suptitle("held-out colour x shape x motion combinations")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fitclip_ext.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="folder for the synthetic videos, checkpoints and results")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (candidates for top-k sampling)")
    p.add_argument("--k", type=int, default=6, help="frames kept per clip by temporal sampling (a quarter miss the object)")
    p.add_argument("--clips-per-combo", type=int, default=10, help="clips per (object, motion) pair of the synthetic world")
    p.add_argument("--pretrain-steps", type=int, default=600,
                   help="steps pre-training the tiny image model on stills (the stand-in for CLIP pre-training)")
    p.add_argument("--epochs", type=int, default=50, help="FitCLIP fine-tuning epochs")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning lr (the tiny random-init model needs far more than 3e-6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the models and the training")
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = make_world(out, a.frames, a.clips_per_combo, a.seed)
    print(f"world: {counts} clips of {a.frames} frames in {out / 'clips'} ({time.time() - t0:.0f} s)")
    image_model = pretrain_image_model(out, a.pretrain_steps, 96, a.seed)

    from . import model as fmodel
    from .train import main as train_main

    train_main(["--train-csv", str(out / "labeled.csv"), "--unlabeled-csv", str(out / "unlabeled.csv"),
                "--out-dir", str(out / "fitclip"), "--model", "fitclip-tiny", "--pretrained", str(image_model),
                "--num-frames", str(a.k), "--candidate-frames", str(a.frames), "--batch-size", "16",
                "--unlabeled-batch-size", "16", "--epochs", str(a.epochs), "--lr", str(a.lr), "--temperature", "0.05",
                "--labeled-weight", "0.9999", "--unlabeled-weight", "0.0001", "--seed", str(a.seed)])
    fitclip = out / "fitclip" / "last.safetensors"
    wise = out / "fitclip_wise.safetensors"
    fmodel.save_checkpoint(fmodel.wise_ft(fmodel.load_state_dict(image_model), fmodel.load_state_dict(fitclip), 0.4), wise)
    results = {name: evaluate(ckpt, out, a.frames, a.k) for name, ckpt in
               (("image_model", image_model), ("fitclip", fitclip), ("fitclip_wise", wise))}
    n_caps = results["image_model"]["retrieval_captions"]
    print(f"\nheld-out combinations: {n_caps} captions, {counts['test']} clips; chance: motion top-1 "
          f"{100 / len(MOTIONS):.0f}%, t2v R@1 about {100 / n_caps:.0f}%")
    print(f"{'model':14} {'motion top-1':>12} {'t2v R@1':>8} {'t2v R@5':>8} {'t2v MdR':>8}")
    for name, r in results.items():
        print(f"{name:14} {r['action_top1']:12.1f} {r['t2v_r1']:8.1f} {r['t2v_r5']:8.1f} {r['t2v_mdr']:8.1f}")
    doc = {"results": results, "chance": {"action_top1": 100 / len(MOTIONS), "t2v_r1": 100 / n_caps},
           "clips": counts, "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    plot(results, out / "results.png")
    print(f"\nresults: {(out / 'results.json').resolve()}  plot: {(out / 'results.png').resolve()}  "
          f"({time.time() - t0:.0f} s)")
    doc["search_index"] = str(index_held_out(out, wise, a.frames))
    print(f"search the held-out clips with the WiSE-FT model in a browser:\n  fitclip serve {doc['search_index']}"
          f"   (then open http://127.0.0.1:8000/; or: fitclip search {doc['search_index']} \"a red square spinning\")")
    return doc


def index_held_out(out: Path, checkpoint: Path, num_frames: int) -> Path:
    """`fitclip index` over the held-out clips (linked into out/test_clips) with `checkpoint`."""
    import os
    import shutil

    from .search import build_index

    folder = out / "test_clips"
    folder.mkdir(exist_ok=True)
    for line in (out / "test.csv").read_text().splitlines()[1:]:
        src = out / line.split(",")[0]
        dst = folder / src.name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:  # another file system: a copy
                shutil.copy2(src, dst)
    index = out / "search_index"
    build_index(folder, index, "fitclip-tiny", str(checkpoint), num_frames=num_frames, dtype="float32")
    return index


if __name__ == "__main__":
    main()
