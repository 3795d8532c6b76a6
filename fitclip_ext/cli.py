"""`fitclip` command line: train | eval | wise | index | search | serve."""
from __future__ import annotations

import argparse
import sys


def wise_main(argv=None) -> str:
    from . import model as fmodel

    p = argparse.ArgumentParser(prog="fitclip wise", description="WiSE-FT: (1 - a) * zero-shot + a * fine-tuned")
    p.add_argument("--alpha", type=float, default=0.4,
                   help="weight of the fine-tuned model in [0, 1] (default: %(default)s, the WiSE-FT paper's choice)")
    p.add_argument("--zero-shot", required=True, help="checkpoint of the original model (safetensors or torch)")
    p.add_argument("--fine-tuned", required=True, help="checkpoint of the fine-tuned model")
    p.add_argument("--out", required=True, help="output .safetensors")
    a = p.parse_args(argv)
    merged = fmodel.wise_ft(fmodel.load_state_dict(a.zero_shot), fmodel.load_state_dict(a.fine_tuned), a.alpha)
    fmodel.save_checkpoint(merged, a.out, metadata={"wise_alpha": str(a.alpha)})
    print(f"wrote {a.out}")
    return a.out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "eval", "wise", "index", "search", "serve"):
        print("usage: fitclip {train,eval,wise,index,search,serve} ...  (`fitclip COMMAND --help` lists a "
              "command's flags)\n"
              "  train   FitCLIP fine-tuning of an open_clip model on videos\n"
              "  eval    zero-shot action recognition and text-to-video retrieval metrics\n"
              "  wise    WiSE-FT weight interpolation of a zero-shot and a fine-tuned checkpoint\n"
              "  index   index a folder of videos for text search\n"
              "  search  text-to-video search of an index\n"
              "  serve   a search page and JSON API over an index",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "train":
        from .train import main as train_main

        train_main(argv[1:])
    elif argv[0] == "eval":
        from .evaluate import main as eval_main

        eval_main(argv[1:])
    elif argv[0] == "index":
        from .search import index_main

        index_main(argv[1:])
    elif argv[0] == "search":
        from .search import search_main

        search_main(argv[1:])
    elif argv[0] == "serve":
        from .serve import main as serve_main

        serve_main(argv[1:])
    else:
        wise_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
