"""Video decoding with torchcodec and the data set layouts, on files the tests write."""
from __future__ import annotations

import json

import pytest
import torch

from fitclip_ext import data

torchcodec = pytest.importorskip("torchcodec")


def _write_video(path, num_frames, size=32):
    """Frame i is a flat grey of level 10 + 12 i, so decoded frames can be told apart."""
    from torchcodec.encoders import VideoEncoder

    levels = torch.tensor([10 + 12 * i for i in range(num_frames)], dtype=torch.uint8)
    frames = levels[:, None, None, None].expand(num_frames, 3, size, size).contiguous()
    VideoEncoder(frames, frame_rate=10).to_file(str(path))
    return path


def _which(frames):
    return [round((f.float().mean().item() - 10) / 12) for f in frames]


def test_frame_indices_uniform_and_random():
    assert data.frame_indices(10, 4) == [1, 3, 6, 8]
    assert data.frame_indices(3, 5) == [0, 0, 1, 2, 2]  # fewer frames than asked: repeats
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = data.frame_indices(10, 4, "random", g)
        assert [0 <= idx[0] <= 2, 2 <= idx[1] <= 4, 5 <= idx[2] <= 7, 7 <= idx[3] <= 9] == [True] * 4
    a = data.frame_indices(100, 8, "random", torch.Generator().manual_seed(3))
    b = data.frame_indices(100, 8, "random", torch.Generator().manual_seed(3))
    assert a == b
    with pytest.raises(ValueError, match="sampling must be one of"):
        data.frame_indices(10, 4, "middle")


def test_read_frames_uniform(tmp_path):
    path = _write_video(tmp_path / "clip.mp4", 10)
    frames = data.read_frames(path, 4)
    assert frames.dtype == torch.uint8 and frames.shape == (4, 3, 32, 32)
    assert _which(frames) == [1, 3, 6, 8]


def test_read_frames_short_clip_repeats(tmp_path):
    path = _write_video(tmp_path / "short.mp4", 3)
    assert _which(data.read_frames(path, 5)) == [0, 0, 1, 2, 2]


def test_read_frames_random_is_reproducible(tmp_path):
    path = _write_video(tmp_path / "clip.mp4", 12)
    a = data.read_frames(path, 4, sampling="random", generator=torch.Generator().manual_seed(1))
    b = data.read_frames(path, 4, sampling="random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert all(3 * i <= j < 3 * i + 3 for i, j in enumerate(_which(a)))


def test_unreadable_videos_raise_naming_the_file(tmp_path):
    with pytest.raises(data.VideoDecodeError, match="missing.mp4.*no such file"):
        data.read_frames(tmp_path / "missing.mp4", 4)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    with pytest.raises(data.VideoDecodeError, match="notes.mp4"):
        data.read_frames(text, 4)
    good = _write_video(tmp_path / "good.mp4", 20).read_bytes()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(good[: len(good) // 3])
    with pytest.raises(data.VideoDecodeError, match="truncated.mp4"):
        data.read_frames(cut, 4)


def test_caption_csv_path_and_id_forms(tmp_path):
    (tmp_path / "a.csv").write_text('video,caption\nclips/x.mp4,"a dog, running"\n/abs/y.mp4,a cat\n')
    rows = data.load_caption_csv(tmp_path / "a.csv")
    assert rows[0].video == str(tmp_path / "clips/x.mp4") and rows[0].captions == ["a dog, running"]
    assert rows[1].video == "/abs/y.mp4"
    (tmp_path / "b.csv").write_text("videoid,name\n123,a bird\n")
    rows = data.load_caption_csv(tmp_path / "b.csv", tmp_path / "vids")
    assert rows[0].video == str(tmp_path / "vids" / "123.mp4") and rows[0].captions == ["a bird"]
    (tmp_path / "c.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="needs a caption column"):
        data.load_caption_csv(tmp_path / "c.csv")


def test_msrvtt_layouts(tmp_path):
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7960,video7960,a man is singing\nret1,msr7961,video7961,cars race\n")
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\nvideo2\n")
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"sentences": [
        {"caption": "first", "video_id": "video1"}, {"caption": "second", "video_id": "video1"},
        {"caption": "third", "video_id": "video2"}, {"caption": "other", "video_id": "video9"}]}))
    test = data.load_msrvtt(tmp_path, "test_1k")
    assert [t.video for t in test] == [str(tmp_path / "video7960.mp4"), str(tmp_path / "video7961.mp4")]
    assert test[1].captions == ["cars race"]
    train = data.load_msrvtt(tmp_path, "train_9k")
    assert [t.captions for t in train] == [["first", "second"], ["third"]]


def test_ucf101_and_hmdb51_layouts(tmp_path):
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    (lists / "testlist01.txt").write_text("YoYo/v_YoYo_g01_c01.avi\nApplyEyeMakeup/v_ApplyEyeMakeup_g02_c03.avi\n")
    (lists / "trainlist01.txt").write_text("YoYo/v_YoYo_g08_c01.avi 2\n")
    samples, names = data.load_ucf101(tmp_path, 1, "test")
    assert names == ["apply eye makeup", "yo yo"]
    assert [s.label for s in samples] == [1, 0]
    assert samples[0].video.endswith("YoYo/v_YoYo_g01_c01.avi")
    train, _ = data.load_ucf101(tmp_path, 1, "train")
    assert len(train) == 1 and train[0].label == 1

    splits = tmp_path / "hmdb_splits"
    splits.mkdir()
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi 2\nc.avi 0\n")
    (splits / "cartwheel_test_split1.txt").write_text("d.avi 2\n")
    samples, names = data.load_hmdb51(tmp_path / "hmdb", splits, 1, "test")
    assert names == ["brush hair", "cartwheel"]
    assert [(s.video.split("/")[-2:], s.label) for s in samples] == [(["brush_hair", "b.avi"], 0), (["cartwheel", "d.avi"], 1)]


def test_didemo_youcook2_activitynet_layouts(tmp_path):
    (tmp_path / "test_data.json").write_text(json.dumps([
        {"video": "v1.mp4", "description": "a man enters. ", "times": [[0, 1]]},
        {"video": "v1.mp4", "description": "he sits", "times": [[2, 3]]},
        {"video": "v2.mp4", "description": "rain", "times": [[0, 0]]}]))
    didemo = data.load_didemo(tmp_path, "test")
    assert [d.captions for d in didemo] == [["a man enters. he sits"], ["rain"]]
    (tmp_path / "youcookii_annotations_trainval.json").write_text(json.dumps({"database": {
        "abc": {"subset": "validation", "annotations": [{"segment": [3, 9], "sentence": "crack eggs"}]},
        "xyz": {"subset": "training", "annotations": [{"segment": [0, 2], "sentence": "boil"}]}}}))
    yc = data.load_youcook2(tmp_path, "validation")
    assert len(yc) == 1 and yc[0].captions == ["crack eggs"] and yc[0].segment == (3.0, 9.0)
    (tmp_path / "val_1.json").write_text(json.dumps({"v_1": {"duration": 10, "timestamps": [[0, 5], [5, 10]],
                                                             "sentences": ["One. ", "Two."]}}))
    anet = data.load_activitynet(tmp_path, "val_1")
    assert anet[0].captions == ["One. Two."]
    seg = data.load_activitynet(tmp_path, "val_1", mode="segment")
    assert [(s.captions, s.segment) for s in seg] == [(["One."], (0.0, 5.0)), (["Two."], (5.0, 10.0))]
    dseg = data.load_didemo(tmp_path, "test", mode="segment")
    assert dseg[1].captions == ["he sits"] and dseg[1].segment == (10.0, 20.0)
