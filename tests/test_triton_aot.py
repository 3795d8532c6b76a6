"""Every Triton kernel configuration the dispatcher launches by default (each kernel, dtype, flag
combination, size bucket and both JIT specialisations) compiles for sm_80 and sm_90 without
spills, within the shared memory of the architecture and with the tensor-core instructions
expected. The full candidate matrix (FITCLIP_TRITON_AUTOTUNE's) is `make aot`."""
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_aot_compile_default_configurations(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "fitclip_ext.kernels.aot", "--scope", "defaults", "--no-sass",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=1200)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 with problems" in proc.stdout
