"""`fitclip` command line: train | eval | wise | index | search | serve | shards."""
from __future__ import annotations

import argparse
import sys

from .errors import InputError, existing_file


def wise_main(argv=None) -> str:
    from . import model as fmodel

    p = argparse.ArgumentParser(prog="fitclip wise", description="WiSE-FT: (1 - a) * zero-shot + a * fine-tuned")
    p.add_argument("--alpha", type=float, default=0.4,
                   help="weight of the fine-tuned model in [0, 1] (default: %(default)s, the WiSE-FT paper's choice)")
    p.add_argument("--zero-shot", required=True, help="checkpoint of the original model (safetensors or torch)")
    p.add_argument("--fine-tuned", required=True, help="checkpoint of the fine-tuned model")
    p.add_argument("--out", required=True, help="output .safetensors")
    a = p.parse_args(argv)
    if not 0.0 <= a.alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1], got {a.alpha}")
    states = []
    for flag, path in (("--zero-shot", a.zero_shot), ("--fine-tuned", a.fine_tuned)):
        existing_file(flag, path)
        try:
            states.append(fmodel.load_state_dict(path))
        except Exception as err:  # (safetensors' and torch's own errors for a file that is not a checkpoint)
            raise InputError(f"{flag}: {path} is not a safetensors or torch checkpoint ({type(err).__name__}: "
                             f"{str(err)[:200]})") from err
    merged = fmodel.wise_ft(states[0], states[1], a.alpha)
    fmodel.save_checkpoint(merged, a.out, metadata={"wise_alpha": str(a.alpha)})
    print(f"wrote {a.out}")
    return a.out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "eval", "wise", "index", "search", "serve", "shards"):
        print("usage: fitclip {train,eval,wise,index,search,serve,shards} ...  (`fitclip COMMAND --help` lists a "
              "command's flags)\n"
              "  train   FitCLIP fine-tuning of an open_clip model on videos\n"
              "  eval    zero-shot action recognition and text-to-video retrieval metrics\n"
              "  wise    WiSE-FT weight interpolation of a zero-shot and a fine-tuned checkpoint\n"
              "  index   index a folder of videos for text search\n"
              "  search  text-to-video search of an index\n"
              "  serve   a search page and JSON API over an index\n"
              "  shards  write a CSV's videos into webdataset shards (video2dataset's layout)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        _run(argv[0], argv[1:])
    except InputError as err:  # bad input: one line, argparse's convention; anything else keeps its traceback
        print(f"fitclip {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _run(command: str, argv: list[str]) -> None:
    if command == "train":
        from .train import main as train_main

        train_main(argv)
    elif command == "eval":
        from .evaluate import main as eval_main

        eval_main(argv)
    elif command == "index":
        from .search import index_main

        index_main(argv)
    elif command == "search":
        from .search import search_main

        search_main(argv)
    elif command == "serve":
        from .serve import main as serve_main

        serve_main(argv)
    elif command == "shards":
        from .shards import shards_main

        shards_main(argv)
    else:
        wise_main(argv)

if __name__ == "__main__":
    sys.exit(main())
