"""Every command-line flag says what it does (`--help`), and `fitclip` without a command lists them."""
import argparse

import pytest

from fitclip_ext import cli, demo, evaluate, train


@pytest.mark.parametrize("main", [train.main, evaluate.main, cli.wise_main, demo.main],
                         ids=["train", "eval", "wise", "demo"])
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
