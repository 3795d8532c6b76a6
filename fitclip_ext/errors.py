"""What the command line reports in one line (`fitclip COMMAND: error: ...`, exit status 2, no
traceback, argparse's convention): bad user input, a missing path, a malformed file, a flag's bad
value. Anything else is unexpected and keeps its traceback."""
from __future__ import annotations

from pathlib import Path

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class InputError(ValueError):
    """Bad input from the user; the message names the flag or file and what was expected."""


def existing_file(flag: str, path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{flag}: no such file: {path}" if not p.exists() else f"{flag}: {path} is not a file")
    return p


def existing_dir(flag: str, path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{flag}: no such folder: {path}" if not p.exists() else f"{flag}: {path} is not a folder")
    return p


def pretrained_path(flag: str, value) -> None:
    """An open_clip pretrained value that names a file (a path or a checkpoint suffix) must exist;
    a tag ('openai', 'laion2b_s34b_b79k') is left to open_clip."""
    if value and (Path(value).suffix in CHECKPOINT_SUFFIXES or "/" in str(value)):
        existing_file(flag, value)
