"""CPU smoke tests of the real entry points on a tiny synthetic video set: training (labeled +
distillation, top-k temporal sampling), broken videos reported, resume == uninterrupted, WiSE."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("torchcodec")

from fitclip_ext import cli, model as fm  # noqa: E402
from fitclip_ext.train import main as train_main  # noqa: E402

from .helpers import square_clips, torchrun_train, train_process, wait_for_step  # noqa: E402


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    return square_clips(tmp_path_factory.mktemp("videos"), 8, 8, "train.csv")


def _args(video_set, out, *extra):
    return ["--train-csv", str(video_set / "train.csv"), "--out-dir", str(out), "--model", "fitclip-tiny",
            "--pretrained", "none", "--batch-size", "4", "--num-frames", "2", "--candidate-frames", "4",
            "--unlabeled-csv", str(video_set / "train.csv"), "--unlabeled-batch-size", "3", "--epochs", "2",
            "--lr", "1e-3", "--seed", "3", *extra]


def test_train_smoke_and_broken_videos_reported(video_set, tmp_path, capsys):
    res = train_main(_args(video_set, tmp_path / "run"))
    assert "\r" not in capsys.readouterr().err  # no progress-bar redraws where stderr is not a terminal
    assert res["steps"] == 4  # 9 clips, batches of 4, 2 epochs
    assert any(p.endswith("broken.mp4") for p in res["broken_videos"])
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    # step 1: the student is still the teacher, KL 0 (up to float32 rounding times scale^2);
    # after it the models differ
    u = [r["unlabeled_loss"] for r in steps]
    assert len(steps) == 4 and abs(u[0]) < 1e-2 and min(u) > -1e-2 and max(u) > 1
    assert any("broken_videos" in r for r in log)
    assert (tmp_path / "run" / "last.safetensors").exists() and (tmp_path / "run" / "loss.png").exists()
    assert (tmp_path / "run" / "zero_shot.safetensors").exists()  # the WiSE-FT anchor
    for r in steps:  # where a step's time goes: the parts add up to the step
        parts = r["data_wait_s"] + r["fwd_bwd_s"] + r["optimizer_s"] + r["checkpoint_s"]
        assert abs(parts - r["seconds"]) <= 0.1 * r["seconds"], r
        assert r["grad_norm"] > 0 and r["clips_per_s"] > 0
    summary = next(r["summary"] for r in log if "summary" in r)  # the run's time, checkpoints included
    assert summary["steps"] == 4 and summary["checkpoints"] == 2 and 0 < summary["checkpoint_s"] < summary["wall_s"]
    assert sum(r["seconds"] for r in steps) <= summary["wall_s"]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_equals_uninterrupted(video_set, tmp_path, workers):
    """Stopped mid-epoch (2 batches an epoch: after step 1) and resumed: both data streams, in the
    main process or in DataLoader workers, continue where they were."""
    w = ("--workers", workers)
    train_main(_args(video_set, tmp_path / "full", "--max-steps", "3", *w))
    first = train_main(_args(video_set, tmp_path / "killed", "--max-steps", "1", *w))  # "killed" after 1 step
    resumed = train_main(_args(video_set, tmp_path / "killed", "--max-steps", "3", "--resume", *w))
    assert first["steps"] == 1
    assert [r["step"] for r in resumed["history"]] == [2, 3]  # continued, did not start over
    _weights_equal(tmp_path / "full", tmp_path / "killed")


def _weights_equal(a_dir, b_dir):
    a, b = fm.load_state_dict(a_dir / "last.safetensors"), fm.load_state_dict(b_dir / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_checkpoint_schedule_and_keep_last(video_set, tmp_path):
    # 2 batches an epoch, 3 epochs: steps 1..6, epoch ends after steps 2, 4, 6; every 3 steps
    # adds step 3 (step 6 is an epoch end): nothing is written at steps 1 and 5
    out = tmp_path / "run"
    train_main(_args(video_set, out, "--epochs", "3", "--save-every-steps", "3", "--save-every-minutes", "0",
                     "--keep-last", "10"))
    assert sorted(p.name for p in out.glob("step-*")) == [f"step-{s:08d}{x}" for s in (2, 3, 4, 6)
                                                          for x in (".safetensors", "_state.pt")]
    log = [json.loads(line) for line in open(out / "log.jsonl") if '"loss"' in line]
    assert [r["step"] for r in log if r["checkpoint_s"] > 0] == [3]
    state = torch.load(out / "last_state.pt", weights_only=False)
    assert state["step"] == 6 and state["model_file"] == "step-00000006.safetensors"
    assert (out / "last.safetensors").read_bytes() == (out / "step-00000006.safetensors").read_bytes()
    assert not list(out.glob("*.tmp"))
    # --keep-last 2: only the newest two step checkpoints stay
    train_main(_args(video_set, tmp_path / "two", "--epochs", "3", "--save-every-steps", "3", "--keep-last", "2"))
    assert sorted(p.name for p in (tmp_path / "two").glob("step-*.safetensors")) == \
        ["step-00000004.safetensors", "step-00000006.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_run_resumes_to_the_uninterrupted_weights(video_set, tmp_path, sig):
    """SIGTERM: a checkpoint is written at the next step and the process exits with a message;
    SIGKILL: nothing is written, the last scheduled checkpoint stands. Either way --resume ends at
    the weights of a run that was never interrupted."""
    import signal

    killed = tmp_path / "killed"
    base = ["--epochs", "1000", "--save-every-steps", "3", "--save-every-minutes", "0"]
    proc = train_process(_args(video_set, killed, *base), tmp_path)
    try:
        wait_for_step(killed / "log.jsonl", 4, proc)
        proc.send_signal(getattr(signal, sig))
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    state = torch.load(killed / "last_state.pt", weights_only=False)
    if sig == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert f"SIGTERM received; wrote the checkpoint of step {state['step']}" in output
        assert state["step"] >= 4
    else:
        assert proc.returncode == -signal.SIGKILL and state["step"] >= 2  # (step 3's write may be in flight)
    end = state["step"] + 2
    # (in processes like the killed one: the same thread count, so the same float rounding)
    for argv in (_args(video_set, killed, *base, "--max-steps", str(end), "--resume"),
                 _args(video_set, tmp_path / "full", *base, "--max-steps", str(end))):
        run = train_process(argv, tmp_path)
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output[-3000:]
    _weights_equal(tmp_path / "full", killed)


def test_decode_device_errors_are_clear(video_set, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--decode-device must be 'cpu' or 'cuda'"):
        train_main(_args(video_set, tmp_path / "a", "--decode-device", "gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--decode-device cuda needs a CUDA GPU"):
            train_main(_args(video_set, tmp_path / "b", "--decode-device", "cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="pass --workers 0"):
        train_main(_args(video_set, tmp_path / "c", "--decode-device", "cuda", "--workers", "2"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_on_the_gpu(video_set, tmp_path):
    res = train_main(_args(video_set, tmp_path / "gpu", "--device", "cuda", "--decode-device", "cuda",
                           "--max-steps", "1"))
    assert res["steps"] == 1


def test_grad_checkpointing_gives_the_same_gradients(video_set, tmp_path):
    for name, extra in (("plain", []), ("ckpt", ["--grad-checkpointing"])):
        train_main(_args(video_set, tmp_path / name, "--max-steps", "1", "--dump-grads",
                         str(tmp_path / f"{name}.pt"), *extra))
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "ckpt.pt")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("chunk, extra", [("2", []), ("3", ["--loss-pooling", "topk", "--pool-k", "1"]),
                                          ("1", ["--loss", "siglip"]),
                                          ("2", ["--grad-checkpointing", "--grad-accum", "2"])],
                         ids=["mean-2", "topk-3", "siglip-1", "checkpointing-accum-2"])
def test_grad_cache_gives_the_whole_batch_gradients(video_set, tmp_path, chunk, extra):
    """--grad-cache-chunk: 4 labeled + 3 unlabeled clips encoded 1-3 at a time give the gradients
    (and so the weights) of the whole batch at once, top-k frame choice and distillation included.
    AdamW's first update is lr * g / (|g| + eps) elementwise: where a gradient is float noise
    around 0 (e.g. the attention's key biases, whose true gradient is 0) the sign of the noise
    decides it, so the weights are compared where |g| is above 1e-3 of its tensor's largest."""
    for name, opts in (("whole", []), ("cached", ["--grad-cache-chunk", chunk])):
        train_main(_args(video_set, tmp_path / name, "--max-steps", "1", "--epochs", "1", "--dump-grads",
                         str(tmp_path / f"{name}.pt"), *extra, *opts))
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "cached.pt")
    wa = fm.load_state_dict(tmp_path / "whole" / "last.safetensors")
    wb = fm.load_state_dict(tmp_path / "cached" / "last.safetensors")
    assert a.keys() == b.keys() and len(a) > 10 and a.keys() <= wa.keys() == wb.keys()
    compared = 0
    for k in a:
        assert torch.isfinite(a[k]).all() and torch.isfinite(b[k]).all(), k
        scale = a[k].abs().max().item() + 1e-12
        torch.testing.assert_close(b[k] / scale, a[k] / scale, rtol=0, atol=1e-5, msg=k)
        clear = a[k].abs() > 1e-3 * scale
        torch.testing.assert_close(wb[k][clear], wa[k][clear], rtol=0, atol=1e-6, msg=k)
        compared += int(clear.sum())
    assert compared > 0.5 * sum(int((t != 0).sum()) for t in a.values())  # (unused tokens' rows are 0)


def test_grad_cache_under_bf16_autocast(video_set, tmp_path):
    """--precision bf16 (autocast on the CPU): chunks re-encoded under the same autocast are as
    close to the float32 gradients as the whole bf16 batch is (here 11% of a tensor's largest
    entry apart, bf16's own rounding; cached and whole differ by 4%), per tensor within 2x its
    error plus 1e-3."""
    grads = {}
    for name, opts in (("fp32", []), ("whole", ["--precision", "bf16"]),
                       ("cached", ["--precision", "bf16", "--grad-cache-chunk", "3"])):
        train_main(_args(video_set, tmp_path / name, "--max-steps", "1", "--epochs", "1", "--dump-grads",
                         str(tmp_path / f"{name}.pt"), *opts))
        grads[name] = torch.load(tmp_path / f"{name}.pt")
    assert grads["fp32"].keys() == grads["cached"].keys() and len(grads["fp32"]) > 10

    def err(name, k):
        x, ref = grads[name][k].double(), grads["fp32"][k].double()
        return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()

    for k in grads["fp32"]:
        assert torch.isfinite(grads["cached"][k]).all(), k
        assert err("cached", k) <= 2 * err("whole", k) + 1e-3, (k, err("cached", k), err("whole", k))


def test_grad_cache_chunk_must_not_be_negative(video_set, tmp_path):
    with pytest.raises(ValueError, match="--grad-cache-chunk must be >= 0"):
        train_main(_args(video_set, tmp_path / "x", "--grad-cache-chunk", "-1"))


class _WhoDecodes(torch.utils.data.Dataset):
    """ClipDataset-shaped items that say which process made them and for which epoch."""

    def __len__(self):
        return 6

    def __getitem__(self, key):
        import os
        epoch, i = key
        return torch.tensor([os.getpid(), epoch]), f"caption {i}", f"clip{i}.mp4", i


def test_loaders_keep_their_workers_across_epochs_and_follow_the_epoch():
    from fitclip_ext.world import World
    from fitclip_ext.train import Loaders, TrainConfig, rank_batches

    cfg = TrainConfig(train_csv="unused", out_dir="unused", workers=2, batch_size=2, unlabeled_batch_size=1)
    data = Loaders(_WhoDecodes(), _WhoDecodes(), cfg, World("cpu"))
    seen = []
    for epoch in range(3):
        batches = rank_batches(6, cfg, data.world, epoch)
        pairs = list(data.epoch(batches, epoch, 1 if epoch == 0 else 0, len(batches)))
        assert len(pairs) == (2 if epoch == 0 else 3)  # epoch 0 resumed at its second batch
        for (frames, caps, broken, idx), (uframes, *_) in pairs:
            assert frames[:, 1].tolist() == [epoch, epoch] and uframes[:, 1].tolist() == [epoch]
            seen += frames[:, 0].tolist() + uframes[:, 0].tolist()
        # the labeled stream reads the epoch's batches in order (from the resume point)
        assert [p[0][3] for p in pairs] == batches[1 if epoch == 0 else 0:]
    import os
    assert os.getpid() not in seen and len(set(seen)) == 4  # 2 workers per stream, the same for all epochs


@pytest.mark.slow
def test_compile_gives_the_same_training(video_set, tmp_path):
    """--compile (torch.compile of the student's step forward and of the teacher) changes the
    speed, not the step: the same losses and gradients as eager up to float32 reassociation."""
    eager = train_main(_args(video_set, tmp_path / "eager", "--max-steps", "1", "--dump-grads",
                             str(tmp_path / "eager.pt")))
    compiled = train_main(_args(video_set, tmp_path / "compiled", "--max-steps", "1", "--compile", "--dump-grads",
                                str(tmp_path / "compiled.pt")))
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        assert abs(a["labeled_loss"] - b["labeled_loss"]) <= 1e-4 * abs(a["labeled_loss"])
        # a KL of the student against itself (step 1): float32 rounding times the scale^2 (4444)
        assert abs(a["unlabeled_loss"]) < 1e-2 and abs(b["unlabeled_loss"]) < 1e-2
    # the gradients (AdamW's first step is lr * sign(g) wherever |g| >> eps: a weight comparison
    # would amplify rounding in near-zero gradients)
    a, b = torch.load(tmp_path / "eager.pt"), torch.load(tmp_path / "compiled.pt")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        scale = a[k].abs().max().item() + 1e-12
        torch.testing.assert_close(b[k] / scale, a[k] / scale, rtol=0, atol=1e-4, msg=k)


def test_wise_cli(tmp_path):
    fm.save_checkpoint({"w": torch.zeros(2)}, tmp_path / "zs.safetensors")
    fm.save_checkpoint({"w": torch.ones(2)}, tmp_path / "ft.safetensors")
    assert cli.main(["wise", "--alpha", "0.4", "--zero-shot", str(tmp_path / "zs.safetensors"),
                     "--fine-tuned", str(tmp_path / "ft.safetensors"), "--out", str(tmp_path / "w.safetensors")]) == 0
    torch.testing.assert_close(fm.load_state_dict(tmp_path / "w.safetensors")["w"], torch.full((2,), 0.4))


def test_eval_cli_retrieval_and_classification(video_set, tmp_path):
    from fitclip_ext.evaluate import main as eval_main

    res = eval_main(["--model", "fitclip-tiny", "--pretrained", "none", "--task", "csv", "--root",
                     str(video_set / "train.csv"), "--num-frames", "3", "--out", str(tmp_path / "r.json")])
    r = res["retrieval"]
    assert r["videos"] == 8 and any(p.endswith("broken.mp4") for p in r["unreadable"])
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_mdr", "t2v_mnr", "v2t_r1", "v2t_mdr"):
        assert key in r
    assert 0 <= r["t2v_r1"] <= 100 and 1 <= r["t2v_mdr"] <= 8
    names = ["a red square", "a green square", "a blue square", "a yellow square"]
    (tmp_path / "classes.txt").write_text("\n".join(names))
    csv = tmp_path / "cls.csv"
    csv.write_text((video_set / "train.csv").read_text().replace("broken.mp4,a broken clip\n", ""))
    res = eval_main(["--model", "fitclip-tiny", "--pretrained", "none", "--task", "csv", "--root", str(csv),
                     "--video-root", str(video_set), "--classes", str(tmp_path / "classes.txt"), "--templates", "plain",
                     "--pooling", "topk", "--k", "2"])
    c = res["classification"]
    assert c["videos"] == 8 and 0 <= c["top1"] <= c["top5"] <= 100 and c["top5"] == 100  # 4 classes


def test_eval_caches_frame_embeddings(video_set, tmp_path, monkeypatch):
    """A second evaluation of the same model and videos (other pooling) reads the cached frame
    embeddings instead of decoding; decoding runs in DataLoader workers."""
    from fitclip_ext import data, evaluate

    model, *_ = fm.create("fitclip-tiny", None)
    fm.save_checkpoint(model.state_dict(), tmp_path / "m.safetensors")
    args = ["--model", "fitclip-tiny", "--pretrained", str(tmp_path / "m.safetensors"), "--task", "csv", "--root",
            str(video_set / "train.csv"), "--num-frames", "3", "--cache-dir", str(tmp_path / "cache")]
    first = evaluate.main(args + ["--workers", "2"])["retrieval"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the embeddings are cached")

    monkeypatch.setattr(data, "read_frames", no_decoding)
    again = evaluate.main(args)["retrieval"]
    assert again == first
    topk = evaluate.main(args + ["--pooling", "topk", "--k", "2"])["retrieval"]
    assert topk["videos"] == first["videos"] == 8 and topk["unreadable"] == first["unreadable"]


def test_read_frames_segment(tmp_path):
    from torchcodec.encoders import VideoEncoder

    from fitclip_ext import data

    levels = torch.tensor([10 + 12 * i for i in range(20)], dtype=torch.uint8)
    VideoEncoder(levels[:, None, None, None].expand(20, 3, 16, 16).contiguous(), frame_rate=10).to_file(str(tmp_path / "v.mp4"))
    frames = data.read_frames(tmp_path / "v.mp4", 2, segment=(1.0, 2.0))  # frames 10..19
    assert [round((f.float().mean().item() - 10) / 12) for f in frames] == [12, 17]


def test_demo_end_to_end_tiny(tmp_path):
    """The demo's real pipeline at toy sizes: world, image pre-training, FitCLIP, WiSE-FT, eval."""
    from fitclip_ext import demo

    doc = demo.main(["--out", str(tmp_path / "demo"), "--clips-per-combo", "2", "--pretrain-steps", "3",
                     "--epochs", "1", "--frames", "4", "--k", "3"])
    assert set(doc["results"]) == {"image_model", "fitclip", "fitclip_wise"}
    for r in doc["results"].values():
        assert 0 <= r["action_top1"] <= 100 and 0 <= r["t2v_r1"] <= 100
    assert (tmp_path / "demo" / "results.json").exists() and (tmp_path / "demo" / "results.png").exists()
    from fitclip_ext.search import Index

    index = Index.load(doc["search_index"])  # the held-out clips, searchable with the WiSE-FT model
    assert len(index.videos) == len((tmp_path / "demo" / "test.csv").read_text().splitlines()) - 1
    # the search path (top-k re-rank of every clip) gives the demo's own text-to-video R@1 and R@5
    import csv

    from fitclip_ext.search import Searcher

    searcher = Searcher(doc["search_index"])
    caption = {r["video"].split("/")[-1]: r["caption"] for r in csv.DictReader(open(tmp_path / "demo" / "test.csv"))}
    n, ranks = len(index.videos), []
    for u in sorted(set(caption.values())):
        order = [r["path"] for r in searcher.query(u, k=n, rerank=n, rerank_frames=3)]
        ranks.append(next(i for i, p in enumerate(order) if caption[p] == u) + 1)
    ranks = torch.tensor(ranks, dtype=torch.float32)
    wise = doc["results"]["fitclip_wise"]
    assert 100 * (ranks <= 1).float().mean().item() == pytest.approx(wise["t2v_r1"])
    assert 100 * (ranks <= 5).float().mean().item() == pytest.approx(wise["t2v_r5"])


def test_train_options_val_best_topk_loss_class_prompts_workers(video_set, tmp_path):
    (tmp_path / "classes.txt").write_text("RedSquare\nGreenSquare\nBlueSquare\nYellowSquare\n")
    res = train_main(_args(video_set, tmp_path / "run", "--val-csv", str(video_set / "train.csv"),
                           "--loss-pooling", "topk", "--pool-k", "1", "--class-prompts", str(tmp_path / "classes.txt"),
                           "--workers", "2", "--grad-accum", "2", "--epochs", "2"))
    assert res["steps"] == 2  # 2 batches per epoch, 2 per step, 2 epochs
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    vals = [r for r in log if "val_loss" in r]
    assert len(vals) == 2 and all(r["val_loss"] > 0 for r in vals), log
    assert (tmp_path / "run" / "best.safetensors").exists(), sorted(p.name for p in (tmp_path / "run").iterdir())
    assert all(r["unlabeled_loss"] > -1e-5 for r in log if "loss" in r), log  # a KL, up to rounding


def test_train_siglip_loss(video_set, tmp_path):
    """--loss siglip, mean and top-k pooling: SigLIP's initialisation (scale 10, bias -10), both
    learned and checkpointed; the bias travels to zero_shot/last checkpoints that fitclip's own
    loader reads back into the architecture, and a resumed run continues from it."""
    from fitclip_ext import model as fmodel

    for pooling in ("mean", "topk"):
        out = tmp_path / pooling
        res = train_main(_args(video_set, out, "--loss", "siglip", "--loss-pooling", pooling, "--pool-k", "1",
                               "--lr", "1e-3", "--val-csv", str(video_set / "train.csv")))
        log = [r for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
        assert res["steps"] >= 1 and all(math.isfinite(r["labeled_loss"]) and r["labeled_loss"] > 0 for r in log)
        zero = fmodel.load_state_dict(out / "zero_shot.safetensors")
        last = fmodel.load_state_dict(out / "last.safetensors")
        assert zero["logit_bias"].item() == -10.0 and abs(zero["logit_scale"].exp().item() - 10.0) < 1e-4
        assert last["logit_bias"].item() != -10.0 and last["logit_scale"].item() != zero["logit_scale"].item()
        model, *_ = fmodel.create("fitclip-tiny", str(out / "last.safetensors"))
        assert model.logit_bias.item() == last["logit_bias"].item()
    with pytest.raises(ValueError, match="--loss must be 'infonce' or 'siglip'"):
        train_main(_args(video_set, tmp_path / "bad", "--loss", "sigmoid"))


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    ["--candidate-frames", "4"],  # mean pooling (ClipLoss, local loss) + temporal sampling + distillation
    ["--loss-pooling", "topk", "--pool-k", "1", "--class-prompts", "classes.txt"],  # fused top-k loss, prompts
    ["--loss", "siglip"],  # SigLipLoss: local videos against the gathered captions, bias learned
    ["--candidate-frames", "4", "--grad-cache-chunk", "1"],  # gradient caching under DDP (no_sync but the last)
], ids=["mean-clip-loss", "topk-prompts", "siglip", "grad-cache"])
def test_torchrun_two_processes_equal_full_batch_gradients(video_set, tmp_path, options):
    """2 gloo processes with 2 + 2 clips per step give the gradients of one process with 4."""
    rows = [r for r in (video_set / "train.csv").read_text().splitlines() if "broken" not in r]
    (tmp_path / "good.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("RedSquare\nGreenSquare\nBlueSquare\nYellowSquare\n")
    opts = [str(tmp_path / o) if o == "classes.txt" else o for o in options]

    def args(out, per_rank):
        return ["--train-csv", str(tmp_path / "good.csv"), "--video-root", str(video_set), "--out-dir", str(out),
                "--model", "fitclip-tiny", "--pretrained", "none", "--num-frames", "2", "--batch-size", str(per_rank),
                "--unlabeled-csv", str(tmp_path / "good.csv"), "--unlabeled-batch-size", str(per_rank),
                "--max-steps", "1", "--seed", "5", "--dump-grads", str(out / "grads.pt"), *opts]

    train_main(args(tmp_path / "single", 4))
    torchrun_train(2, args(tmp_path / "ddp", 2), tmp_path)
    single = torch.load(tmp_path / "single" / "grads.pt")
    ddp = torch.load(tmp_path / "ddp" / "grads.pt")
    assert single.keys() == ddp.keys() and len(single) > 10
    for name in single:
        scale = single[name].abs().max().item() + 1e-12
        torch.testing.assert_close(ddp[name] / scale, single[name] / scale, rtol=0, atol=1e-4, msg=name)
    s_log = [json.loads(x) for x in open(tmp_path / "single" / "log.jsonl") if '"loss"' in x]
    d_log = [json.loads(x) for x in open(tmp_path / "ddp" / "log.jsonl") if '"loss"' in x]
    assert abs(s_log[0]["loss"] - d_log[0]["loss"]) < 1e-4 * max(1.0, abs(s_log[0]["loss"]))
