"""open_clip's own trainer (`open_clip_train`) with the fused loss: one changed word on the command
line,

    python -m open_clip_train.main --train-data ...       # open_clip's ClipLoss
    python -m fitclip_ext.open_clip_train --train-data ... # fitclip_ext.ClipLoss, same arguments

and the same under torchrun (`torchrun --nproc_per_node N -m fitclip_ext.open_clip_train ...`).
Every ClipLoss that open_clip's `create_loss` builds (the plain CLIP loss, with --local-loss and
--gather-with-grad as given) becomes fitclip_ext.ClipLoss, and with --siglip (and
--loss-dist-impl) its SigLipLoss becomes fitclip_ext.SigLipLoss: same values and gradients, no
B x B (or local x global) logits. CoCa and distillation runs keep open_clip's own losses.
In your own code, `fitclip_ext.open_clip_train.patch_open_clip()` before `create_loss` does the same.
The tiny offline model configs of fitclip_ext (e.g. "fitclip-tiny") are registered too.
"""
from __future__ import annotations

import sys

from .distributed import ClipLoss, SigLipLoss


def patch_open_clip() -> None:
    """Makes open_clip.create_loss (and open_clip.ClipLoss / SigLipLoss) build fitclip_ext.ClipLoss
    and fitclip_ext.SigLipLoss."""
    import open_clip
    import open_clip.factory

    open_clip.factory.ClipLoss = ClipLoss
    open_clip.ClipLoss = ClipLoss
    open_clip.factory.SigLipLoss = SigLipLoss
    open_clip.SigLipLoss = SigLipLoss


def main(argv=None):
    from . import model as fmodel

    fmodel.register_tiny_configs()
    patch_open_clip()
    try:
        from open_clip_train.main import main as open_clip_main
    except ImportError as err:  # open_clip_train's data loading needs pandas, webdataset, braceexpand
        raise SystemExit(f"open_clip_train could not be imported ({err}); install open_clip_torch[training] "
                         "or pandas, webdataset and braceexpand") from err
    print("fitclip_ext: open_clip's ClipLoss is fitclip_ext.ClipLoss and its SigLipLoss is fitclip_ext.SigLipLoss "
          "in this run", file=sys.stderr)
    return open_clip_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
