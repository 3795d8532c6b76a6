"""Child process: peak extra memory of one forward+backward.
usage: python -m benchmarks.memprobe contrastive <impl> <B> <D>"""
import json
import sys

import torch

from .harness import measure_in_this_process


def main(argv):
    op, impl, B, D = argv[0], argv[1], int(argv[2]), int(argv[3])
    if op == "contrastive":
        from .contrastive_cases import fwd_bwd, loss_fn, make_inputs

        inputs = make_inputs(B, D)
        fn = fwd_bwd(loss_fn(impl), inputs)
    elif op == "topk_frame_similarity":
        from .frame_cases import fwd_bwd_topk

        fn = fwd_bwd_topk(impl, *map(int, argv[2:]))
    else:
        raise SystemExit(f"unknown op {op}")
    print(json.dumps(measure_in_this_process(fn, warmup=impl == "torch_compile")))


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1:])
