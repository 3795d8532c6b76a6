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
    # (sm_90, the H100/H200 this project targets; `make aot` compiles sm_80 too, and every candidate)
    proc = subprocess.run([sys.executable, "-m", "fitclip_ext.kernels.aot", "--scope", "defaults", "--no-sass", "--arch", "90",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=1200)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 with problems" in proc.stdout


_MATMUL = '''
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fitclip_ext.kernels import aot

@triton.jit
def mm(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    r, c, k = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + r[:, None] * K + (k0 + k)[None, :])
        b = tl.load(b_ptr + (k0 + k)[:, None] * BN + c[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + r[:, None] * BN + c[None, :], acc)

out = {}
for stages in (1, 3):
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32", "BM": "constexpr", "BN": "constexpr",
           "BK": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    src = triton.compiler.ASTSource(fn=mm, signature=sig, constexprs={"BM": 128, "BN": 128, "BK": 64}, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": stages})
    row = dict(aot.pipeline_stats(ck.asm["ptx"], {"num_warps": 8, "num_stages": stages}, ck.metadata.shared, 90),
               arch="sm_90", matrix_instr="HGMMA")
    out[stages] = dict(row, overlaps=aot.overlaps(row))
print(json.dumps(out))
'''


def test_aot_pipeline_detector_on_a_plain_matmul(tmp_path):
    """The driver's reading of the PTX on the calibration case: a bf16 128 x 128 x 64 matmul with
    one stage has no cp.async and only wgmma waits of 0 (loads and products take turns); with
    three it has cp.async and a wait of 1 (a group in flight): not overlapping, then overlapping."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "matmul.py"  # (@triton.jit reads its source from a file)
    script.write_text(_MATMUL)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    one, three = rows["1"], rows["3"]
    assert one["cp_async"] == 0 and one["wgmma_waits"] == [0] and not one["overlaps"], one
    assert three["cp_async"] > 0 and 1 in three["wgmma_waits"] and three["overlaps"], three
    assert three["smem_ctas"] >= 2  # (96 KB of the 228 KB: two CTAs by shared memory)
