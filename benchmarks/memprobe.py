"""Child process: peak extra memory of one forward+backward.
usage: python -m benchmarks.memprobe contrastive <impl> <B> <D>
       python -m benchmarks.memprobe distill <impl> <B> <D>
       python -m benchmarks.memprobe sigmoid <impl> <B> <D>
       python -m benchmarks.memprobe topk_frame_similarity|video_contrastive_loss|select_frames <impl> <C> <V> <T> <D> <k>"""
import json
import sys

import torch

from .harness import measure_in_this_process


def main(argv):
    op, impl = argv[0], argv[1]
    if op == "contrastive":
        B, D = int(argv[2]), int(argv[3])
        from .contrastive_cases import fwd_bwd, loss_fn, make_inputs

        inputs = make_inputs(B, D)
        fn = fwd_bwd(loss_fn(impl), inputs)
    elif op == "sigmoid":
        from .sigmoid_cases import fwd_bwd, loss_fn, make_inputs

        fn = fwd_bwd(loss_fn(impl), make_inputs(int(argv[2]), int(argv[3])))
    elif op == "distill":
        from .distill_cases import fwd_bwd, loss_fn, make_inputs

        fn = fwd_bwd(loss_fn(impl), make_inputs(int(argv[2]), int(argv[3])))
    elif op in ("topk_frame_similarity", "video_contrastive_loss", "select_frames"):
        from .frame_cases import fwd_bwd_topk

        fn = fwd_bwd_topk(impl, *map(int, argv[2:7]), op=op)
    else:
        raise SystemExit(f"unknown op {op}")
    print(json.dumps(measure_in_this_process(fn, warmup=impl == "torch_compile")))


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1:])
