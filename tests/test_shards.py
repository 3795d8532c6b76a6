"""Training from webdataset shards in video2dataset's layout: `fitclip shards` writes them, the
trainer reads them (every sample once per epoch over processes and DataLoader workers, the rest
of an epoch after a resume, broken samples named and left out), and shards written by plain
webdataset code read the same way."""
import json
from pathlib import Path
import tarfile

import pytest
import torch

from fitclip_ext import model as fm
from fitclip_ext.data import load_caption_csv
from fitclip_ext.errors import InputError
from fitclip_ext.shards import ShardLoaders, ShardStream, check_slots, shard_urls, shards_main
from fitclip_ext.train import main as train_main
from fitclip_ext.world import World

from .helpers import square_clips, torchrun_cli, torchrun_train, train_process, wait_for_step


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory):
    """12 short H.264 clips (4 colours), a CSV of them plus one broken file."""
    return square_clips(tmp_path_factory.mktemp("clips"), 12, 6, "clips.csv",
                        caption=lambda i, colour: f"a {colour} square number {i}")


@pytest.fixture(scope="module")
def shard_dir(clip_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    report = shards_main(["--csv", str(clip_set / "clips.csv"), "--out", str(out), "--max-count", "3"])
    assert report["written"] == 12 and len(report["shards"]) == 4
    assert [u["path"] for u in report["unreadable"]] == [str(clip_set / "broken.mp4")]
    return out


def _pattern(d, n=4):
    return str(d / f"shard-{{000000..{n - 1:06d}}}.tar")


def _stream(d, batch_size=2, rank=0, ranks=1, n=4):
    return ShardStream(shard_urls("--train-shards", _pattern(d, n)), lambda f: f.float(), 2, "random", 7, batch_size,
                       rank, ranks, shuffle_buffer=4)


def _keys(loader, epoch, position=None, limit=None):
    keys, broken = [], []
    for i, ((frames, caps, bad, names), _) in enumerate(loader.epoch(epoch, position)):
        assert frames is None or (frames.shape[0] == len(caps) == len(names) and torch.isfinite(frames).all())
        keys += names
        broken += bad
        if limit is not None and i + 1 == limit:
            break
    return keys, broken


def test_written_shards_are_video2datasets_layout(shard_dir, clip_set):
    with tarfile.open(shard_dir / "shard-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["json"] * 3 + ["mp4"] * 3 + ["txt"] * 3
    assert meta["source"].startswith(str(clip_set)) and meta["captions"]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_and_the_order_follows_seed_and_epoch(shard_dir, workers):
    world = World("cpu")
    loaders = ShardLoaders(_stream(shard_dir), None, workers, world)
    e0, _ = _keys(loaders, 0)
    assert len(e0) == 12 and len(set(e0)) == 12
    again, _ = _keys(ShardLoaders(_stream(shard_dir), None, workers, world), 0)
    assert again == e0  # (seed, epoch) fix the order
    e1, _ = _keys(loaders, 1)
    assert sorted(e1) == sorted(e0) and e1 != e0


def test_ranks_split_the_shards_and_together_read_each_sample_once(shard_dir):
    seen = []
    for rank in range(2):
        stream = _stream(shard_dir, rank=rank, ranks=2)
        for w in range(2):
            seen += [s["__key__"] for s in stream.samples(w, 2)]
    assert sorted(seen) == [f"{i:09d}" for i in range(13) if i != 12]  # (the broken file was index 12)
    with pytest.raises(InputError, match="4 shards for 3 process"):
        check_slots("--train-shards", shard_urls("--train-shards", _pattern(shard_dir)), 3, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_reads_the_rest_without_repeats(shard_dir, workers):
    world = World("cpu")
    whole, _ = _keys(ShardLoaders(_stream(shard_dir), None, workers, world), 3)
    first = ShardLoaders(_stream(shard_dir), None, workers, world)
    head, _ = _keys(first, 3, limit=3)
    position = json.loads(json.dumps(first.position()))  # (as a checkpoint stores it)
    rest, _ = _keys(ShardLoaders(_stream(shard_dir), None, workers, world), 3, position)
    assert len(head) == 6 and not set(head) & set(rest)
    assert sorted(head + rest) == sorted(whole)


def test_broken_samples_are_named_and_left_out(tmp_path, clip_set):
    """Plain webdataset-written shards (video2dataset's layout) with a corrupt video and a sample
    without a caption: both named by shard and key, the rest read; a missing or truncated shard
    is an error naming it."""
    import webdataset as wds

    good = (clip_set / "clip0.mp4").read_bytes()
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "ok1", "mp4": good, "txt": "a red square", "json": {"url": "x"}})
        sink.write({"__key__": "corrupt", "mp4": b"garbage" * 10, "txt": "nothing"})
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        sink.write({"__key__": "nocap", "mp4": good})
        sink.write({"__key__": "ok2", "mp4": good, "txt": "another"})
    stream = ShardStream(shard_urls("--train-shards", str(tmp_path / "{a,b}.tar")), lambda f: f.float(), 2,
                         "uniform", 0, 4, shuffle_buffer=0)
    keys, broken = _keys(ShardLoaders(stream, None, 0, World("cpu")), 0)
    assert sorted(k.rsplit(":", 1)[1] for k in keys) == ["ok1", "ok2"]
    assert any(b.startswith(str(tmp_path / "a.tar") + ":corrupt (") for b in broken), broken
    assert any(b.startswith(str(tmp_path / "b.tar") + ":nocap (no caption)") for b in broken), broken
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(data[: len(data) // 3])  # truncated inside a member
    bad = ShardStream([str(tmp_path / "c.tar")], lambda f: f.float(), 2, "uniform", 0, 4, shuffle_buffer=0)
    with pytest.raises(InputError, match="c.tar"):
        _keys(ShardLoaders(bad, None, 0, World("cpu")), 0)


def test_training_goes_on_past_broken_samples_and_names_them(tmp_path, clip_set):
    import webdataset as wds

    good = [(clip_set / f"clip{i}.mp4").read_bytes() for i in range(4)]
    with wds.TarWriter(str(tmp_path / "only.tar")) as sink:
        for i, data in enumerate(good):
            sink.write({"__key__": f"v{i}", "mp4": data, "txt": f"clip {i}"})
        sink.write({"__key__": "corrupt", "mp4": b"\x00" * 64, "txt": "broken"})
        sink.write({"__key__": "nocap", "mp4": good[0]})
    out = train_main(["--train-shards", str(tmp_path / "only.tar"), "--out-dir", str(tmp_path / "run"), "--model",
                      "fitclip-tiny", "--pretrained", "none", "--batch-size", "3", "--num-frames", "2", "--seed", "1"])
    assert out["steps"] == 2
    names = out["summary"]["broken_videos"]
    assert len(names) == 2 and {n.split(" ")[0].rsplit(":", 1)[1] for n in names} == {"corrupt", "nocap"}
    steps = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl") if '"loss"' in x]
    assert sum(r["skipped_clips"] for r in steps) == 2


def test_validation_from_shards_keeps_the_best(clip_set, shard_dir, tmp_path):
    train_main(["--train-shards", _pattern(shard_dir), "--val-shards", _pattern(shard_dir, 2), "--out-dir",
                str(tmp_path / "run"), "--model", "fitclip-tiny", "--pretrained", "none", "--batch-size", "4",
                "--num-frames", "2", "--epochs", "2", "--lr", "1e-3"])
    val = [json.loads(x)["val_loss"] for x in open(tmp_path / "run" / "log.jsonl") if '"val_loss"' in x]
    assert len(val) == 2 and all(0 < v < 10 for v in val)
    assert (tmp_path / "run" / "best.safetensors").is_file()


def _train_args(clip_set, shard_dir, out, *extra):
    return ["--train-shards", _pattern(shard_dir), "--unlabeled-shards", _pattern(shard_dir), "--out-dir", str(out),
            "--model", "fitclip-tiny", "--pretrained", "none", "--batch-size", "2", "--unlabeled-batch-size", "2",
            "--num-frames", "2", "--candidate-frames", "3", "--epochs", "2", "--lr", "1e-3", "--seed", "3", *extra]


@pytest.mark.parametrize("workers", ["2"])  # (0 workers: the stream tests above; SIGTERM: below)
def test_train_from_shards_and_resume_equals_uninterrupted(clip_set, shard_dir, tmp_path, workers):
    whole = train_main(_train_args(clip_set, shard_dir, tmp_path / "whole", "--workers", workers, "--max-steps", "8"))
    assert whole["steps"] == 8  # 6 batches of 2 an epoch, into the second epoch
    train_main(_train_args(clip_set, shard_dir, tmp_path / "cut", "--workers", workers, "--max-steps", "4"))
    state = torch.load(tmp_path / "cut" / "last_state.pt", weights_only=False)
    assert state["stream"]["labeled"] and state["stream"]["unlabeled"]["done"]
    train_main(_train_args(clip_set, shard_dir, tmp_path / "cut", "--workers", workers, "--max-steps", "8",
                           "--resume"))
    a = fm.load_state_dict(tmp_path / "whole" / "last.safetensors")
    b = fm.load_state_dict(tmp_path / "cut" / "last.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("workers, steps", [("2", 4), ("0", 3)])
def test_two_processes_train_from_shards(clip_set, shard_dir, tmp_path, workers, steps):
    """2 gloo processes over the 4 shards (3 samples each, batches of 2). With 2 workers each
    (4 readers) a rank reads 2 shards in 4 batches of 2, 1, 2, 1; with none, a rank reads its 2
    shards as one stream of 6 samples, in 3 batches. Both ranks take the same steps."""
    out = tmp_path / "ddp"
    torchrun_train(2, _train_args(clip_set, shard_dir, out, "--workers", workers, "--epochs", "1"), tmp_path)
    logged = [json.loads(x) for x in open(out / "log.jsonl") if '"loss"' in x]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_from_shards_equals_eval_from_files(clip_set, shard_dir, tmp_path, workers):
    """The shards' frame embeddings are the files' (same frames, same model), and `fitclip eval
    --task shards` reports retrieval over them."""
    from fitclip_ext import evaluate

    model, *_ = fm.create("fitclip-tiny", None)
    samples = load_caption_csv(clip_set / "clips.csv")
    files, kept, broken = evaluate.embed_videos(model, samples, 3)
    assert broken == [str(clip_set / "broken.mp4")]
    by_caption = {samples[i].captions[0]: files[j] for j, i in enumerate(kept)}
    emb, shard_samples, shard_broken = evaluate.embed_shard_videos(model, shard_urls("--root", _pattern(shard_dir)),
                                                                   3, batch_size=5, workers=workers)
    assert shard_broken == [] and len(shard_samples) == 12
    for s, e in zip(shard_samples, emb):
        torch.testing.assert_close(e, by_caption[s.captions[0]], rtol=0, atol=1e-6)
    out = evaluate.main(["--task", "shards", "--root", _pattern(shard_dir), "--model", "fitclip-tiny", "--pretrained",
                         "none", "--num-frames", "3", "--workers", str(workers)])
    assert out["retrieval"]["videos"] == 12 and 0 <= out["retrieval"]["t2v_r1"] <= 100


def test_index_search_and_serve_from_shards(clip_set, shard_dir, tmp_path):
    """`fitclip index --shards`: the videos inside the shards are indexed like files (the same
    frame embeddings as indexing the files themselves), re-indexing keeps them, and the page
    plays a result from its shard's bytes, Range requests included."""
    from fitclip_ext import search as fsearch
    from fitclip_ext.serve import create_app

    torch.manual_seed(1)
    ckpt = tmp_path / "model.safetensors"
    fm.save_checkpoint(fm.create("fitclip-tiny", None)[0].state_dict(), ckpt)
    rep = fsearch.index_main(["--shards", _pattern(shard_dir), "--out", str(tmp_path / "idx"), "--model", "fitclip-tiny",
                              "--pretrained", str(ckpt), "--num-frames", "3", "--batch-size", "5"])
    assert rep["videos"] == 12 and rep["encoded"] == 12 and rep["unreadable"] == []
    again = fsearch.index_main(["--shards", _pattern(shard_dir), "--out", str(tmp_path / "idx"), "--model",
                                "fitclip-tiny", "--pretrained", str(ckpt), "--num-frames", "3"])
    assert again["encoded"] == 0 and again["kept"] == 12
    files = fsearch.build_index(clip_set, tmp_path / "files", "fitclip-tiny", str(ckpt), num_frames=3)
    assert files["videos"] == 12
    by_shard, by_file = fsearch.Index.load(tmp_path / "idx"), fsearch.Index.load(tmp_path / "files")
    file_row = {v["path"]: i for i, v in enumerate(by_file.videos)}
    for i, v in enumerate(by_shard.videos):
        shard, member = v["path"].rsplit(":", 1)
        with tarfile.open(shard_dir / shard) as tar:
            key = member.rsplit(".", 1)[0]
            source = json.loads(tar.extractfile(f"{key}.json").read())["source"]
        torch.testing.assert_close(by_shard.frames[i], by_file.frames[file_row[Path(source).name]])
    c = create_app(tmp_path / "idx").test_client()
    body = c.get("/api/search", query_string={"q": "a red square", "k": "3"}).get_json()
    first = body["results"][0]
    whole = c.get(first["video"])
    row = next(i for i, v in enumerate(by_shard.videos) if v["id"] == first["id"])
    shard, member = by_shard.videos[row]["path"].rsplit(":", 1)
    with tarfile.open(shard_dir / shard) as tar:
        assert whole.status_code == 200 and whole.data == tar.extractfile(member).read()
    part = c.get(first["video"], headers={"Range": "bytes=10-59"})
    assert part.status_code == 206 and part.data == whole.data[10:60]
    with pytest.raises(InputError, match="give a VIDEO_DIR or --shards"):
        fsearch.index_main(["--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_reads_the_rest(clip_set, shard_dir, tmp_path):
    """SIGTERM at step 3 of an epoch of 6 (2 workers): the checkpoint records each worker's
    position; --resume reads the rest of the epoch, and ends at the weights of a run that was
    never stopped (so it saw the same batches, none twice, none skipped)."""
    import signal

    killed = tmp_path / "killed"
    base = ["--workers", "2", "--epochs", "1000", "--save-every-minutes", "0"]
    proc = train_process(_train_args(clip_set, shard_dir, killed, *base), tmp_path)
    try:
        wait_for_step(killed / "log.jsonl", 3, proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    state = torch.load(killed / "last_state.pt", weights_only=False)
    assert 3 <= state["step"] and state["stream"]["labeled"], state
    end = state["step"] + 4  # (into the next epoch when stopped late in this one)
    for argv in (_train_args(clip_set, shard_dir, killed, *base, "--max-steps", str(end), "--resume"),
                 _train_args(clip_set, shard_dir, tmp_path / "full", *base, "--max-steps", str(end))):
        run = train_process(argv, tmp_path)
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output[-3000:]
    a = fm.load_state_dict(tmp_path / "full" / "last.safetensors")
    b = fm.load_state_dict(killed / "last.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_index_from_shards_under_torchrun_equals_one_process(shard_dir, tmp_path):
    """2 gloo processes, 2 DataLoader workers each, index the shards' videos: the index one
    process builds."""
    from fitclip_ext import search as fsearch

    torch.manual_seed(2)
    ckpt = tmp_path / "model.safetensors"
    fm.save_checkpoint(fm.create("fitclip-tiny", None)[0].state_dict(), ckpt)
    args = ["--shards", _pattern(shard_dir), "--model", "fitclip-tiny", "--pretrained", str(ckpt), "--num-frames", "3",
            "--batch-size", "2", "--workers", "2"]
    fsearch.index_main(args + ["--out", str(tmp_path / "one")])
    torchrun_cli(2, "index", [*args, "--out", str(tmp_path / "two")], tmp_path)
    one, two = fsearch.Index.load(tmp_path / "one"), fsearch.Index.load(tmp_path / "two")
    assert [v["path"] for v in one.videos] == [v["path"] for v in two.videos] and len(one.videos) == 12
    assert torch.allclose(one.frames.float(), two.frames.float(), atol=2e-3)
