"""Every shipped Triton kernel configuration compiles for sm_80 and sm_90 without spills and
with the tensor-core instructions expected (python -m fitclip_ext.kernels.aot)."""
import os
import subprocess
import sys

import pytest


def test_aot_compile_all_kernels(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "fitclip_ext.kernels.aot", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 with problems" in proc.stdout
