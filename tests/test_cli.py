"""Every command-line flag says what it does (`--help`), and `fitclip` without a command lists them."""
import argparse

import pytest

from fitclip_ext import cli, demo, evaluate, shards, train


@pytest.mark.parametrize("main", [train.main, evaluate.main, cli.wise_main, demo.main, shards.shards_main],
                         ids=["train", "eval", "wise", "demo", "shards"])
def test_every_flag_has_a_help_string(main, monkeypatch, capsys):
    missing = []
    add = argparse.ArgumentParser.add_argument

    def checked(self, *names, **kwargs):
        if not kwargs.get("help") and names and names[0] not in ("-h",):
            missing.append(names[0])
        return add(self, *names, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", checked)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert not missing, f"flags without help: {missing}"
    assert "--" in capsys.readouterr().out


def test_fitclip_without_a_command_lists_the_commands(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert all(cmd in err for cmd in ("train", "eval", "wise"))
    assert cli.main(["--help"]) == 0


# ----------------------------------------------------------------------------- failing like a tool

def _bad_inputs(tmp_path):
    """(argv, what the one-line error must say) for each command: a missing path and a malformed file."""
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("foo,bar\n1,2\n")
    good_csv = tmp_path / "good.csv"
    good_csv.write_text("video,caption\na.mp4,a dog\n")
    not_ckpt = tmp_path / "junk.safetensors"
    not_ckpt.write_bytes(b"this is not a checkpoint")
    (tmp_path / "videos").mkdir()
    (tmp_path / "broken_index").mkdir()
    (tmp_path / "broken_index" / "index.json").write_text("{ not json")
    return [
        (["train", "--train-csv", str(tmp_path / "missing.csv"), "--out-dir", str(tmp_path / "o")],
         "--train-csv: no such file"),
        (["train", "--train-csv", str(bad_csv), "--out-dir", str(tmp_path / "o2"), "--pretrained", "none",
          "--model", "ViT-B-32"], "needs a caption column"),
        (["train", "--train-csv", str(bad_csv), "--out-dir", str(tmp_path / "o3"), "--video-root",
          str(tmp_path / "nowhere")], "--video-root: no such folder"),
        (["wise", "--zero-shot", str(tmp_path / "missing.safetensors"), "--fine-tuned", str(not_ckpt), "--out",
          str(tmp_path / "w.safetensors")], "--zero-shot: no such file"),
        (["wise", "--zero-shot", str(not_ckpt), "--fine-tuned", str(not_ckpt), "--out", str(tmp_path / "w.safetensors")],
         "is not a safetensors or torch checkpoint"),
        (["eval", "--task", "ucf101", "--root", str(tmp_path / "missing")], "--root: no such folder"),
        (["eval", "--task", "csv", "--root", str(bad_csv)], "needs a caption column"),  # (default weights: no download)
        (["eval", "--task", "csv", "--root", str(good_csv), "--classes", str(tmp_path / "nope.txt")],
         "--classes: no such file"),
        (["index", str(tmp_path / "missing_dir"), "--out", str(tmp_path / "idx")], "VIDEO_DIR: no such folder"),
        (["index", str(tmp_path / "videos"), "--out", str(tmp_path / "idx"), "--pretrained",
          str(tmp_path / "missing.pt")], "--pretrained: no such file"),
        (["search", str(tmp_path / "broken_index"), "a dog"], "is corrupt"),
        (["serve", str(tmp_path / "missing_index")], "is not a fitclip index"),
        (["train", "--train-shards", str(tmp_path / "s-{000..001}.tar"), "--out-dir", str(tmp_path / "o4")],
         "--train-shards: 2 of 2 shards do not exist"),
        (["train", "--train-csv", str(good_csv), "--train-shards", str(not_ckpt), "--out-dir", str(tmp_path / "o5")],
         "one of them"),
        (["shards", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "sh")], "--csv: no such file"),
        (["shards", "--csv", str(bad_csv), "--out", str(tmp_path / "sh")], "needs a caption column"),
    ]


def test_every_command_fails_in_one_line_with_status_2(tmp_path, capsys):
    """A missing path or a malformed file: `fitclip COMMAND: error: ...` on stderr, exit status 2, no
    traceback, and no model loaded first (eval's default weights would need the network)."""
    for argv, expected in _bad_inputs(tmp_path):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # (search and serve report their own, the same way)
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert expected in err and f"fitclip {argv[0]}" in err, (argv, err)
        assert "Traceback" not in err, (argv, err)


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only bad input is reported in one line: a bug still raises."""
    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "wise_main", broken)
    with pytest.raises(KeyError):
        cli.main(["wise", "--zero-shot", "a"])
