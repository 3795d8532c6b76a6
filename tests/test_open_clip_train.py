"""open_clip's own trainer with and without the one-word swap (`-m fitclip_ext.open_clip_train`)
on a small image-caption CSV: the per-step losses agree."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train.main", reason="open_clip_train needs pandas, webdataset, braceexpand")

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ("import sys; from fitclip_ext import model; model.register_tiny_configs(); "
            "from open_clip_train.main import main; main(sys.argv[1:])")


@pytest.fixture(scope="module")
def image_csv(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    rows = ["filepath,title"]
    for i in range(24):
        name, rgb = list(colours.items())[i % 4]
        img = torch.randint(0, 60, (40, 40, 3), generator=g, dtype=torch.uint8)
        img[10:30, 10:30] = torch.tensor(rgb, dtype=torch.uint8)
        Image.fromarray(img.numpy()).save(root / f"img{i}.png")
        rows.append(f"{root / f'img{i}.png'},a photo of a {name} square number {i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


def _run(cmd_head, csv, logs, name, extra=(), epochs=2):
    args = [*extra, "--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--model", "fitclip-tiny", "--device", "cpu", "--precision", "fp32",
            "--batch-size", "4", "--epochs", str(epochs), "--lr", "1e-3", "--warmup", "0", "--workers", "0", "--seed", "0",
            "--log-every-n-steps", "1", "--logs", str(logs), "--name", name, "--save-frequency", "0",
            "--report-to", ""]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *cmd_head, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (logs / name / "out.log").read_text()
    swapped = "is fitclip_ext." in proc.stderr
    return [float(v) for v in re.findall(r"Contrastive_loss: ([0-9.eE+-]+) \(", log)], swapped


@pytest.mark.slow
def test_swap_gives_the_same_per_step_losses(image_csv, tmp_path):
    theirs, swapped_theirs = _run(["-c", BASELINE], image_csv, tmp_path / "logs", "open_clip")
    ours, swapped_ours = _run(["-m", "fitclip_ext.open_clip_train"], image_csv, tmp_path / "logs", "fitclip")
    assert swapped_ours and not swapped_theirs
    assert len(theirs) == 12  # 24 images, batches of 4, 2 epochs, a loss logged every step
    assert len(ours) == len(theirs)
    # the log prints 5 significant digits
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=1e-4)
    assert theirs[-1] < theirs[0]  # it trains


@pytest.mark.slow
def test_siglip_swap_gives_the_same_per_step_losses(image_csv, tmp_path):
    """--siglip: open_clip's trainer with its SigLipLoss and with fitclip_ext.SigLipLoss (SigLIP's
    initialisation, scale log 10 and bias -10, from open_clip's trainer in both)."""
    extra = ["--siglip"]
    theirs, swapped_theirs = _run(["-c", BASELINE], image_csv, tmp_path / "logs", "open_clip", extra, epochs=1)
    ours, swapped_ours = _run(["-m", "fitclip_ext.open_clip_train"], image_csv, tmp_path / "logs", "fitclip", extra,
                              epochs=1)
    assert swapped_ours and not swapped_theirs
    assert len(theirs) == 6 and len(ours) == len(theirs)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=1e-4)
    assert theirs[-1] < theirs[0]


def test_patch_makes_create_loss_build_the_fused_loss():
    import argparse

    import open_clip

    import fitclip_ext
    from fitclip_ext.open_clip_train import patch_open_clip

    patch_open_clip()
    args = argparse.Namespace(distill=False, model="ViT-B-32", siglip=False, local_loss=True, gather_with_grad=True,
                              rank=0, world_size=1, horovod=False)
    loss = open_clip.create_loss(args)
    assert isinstance(loss, fitclip_ext.ClipLoss) and loss.local_loss and loss.gather_with_grad
    args.siglip, args.loss_dist_impl = True, "shift"
    loss = open_clip.create_loss(args)
    assert isinstance(loss, fitclip_ext.SigLipLoss) and loss.dist_impl == "shift"
