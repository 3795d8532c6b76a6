"""Triton kernels of fitclip_ext (importable as `fitclip_ext.kernels`). Importing this package
compiles nothing and queries no device; kernels compile on first launch."""
