"""The GPU check script (benchmarks/gpu_check.py) runs end to end on tiny sizes (CPU tensors
through the Triton interpreter), so the one short run on a lent GPU cannot fail on a script bug:
every correctness check passes, no case errors, the JSON is complete, and the report renders it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_tiny_runs_and_renders(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("tiny-cpu-*.json")
    doc = json.loads(path.read_text())
    assert doc["finished"]
    assert doc["correctness"] and all(c["ok"] for c in doc["correctness"])
    ops = {c["op"] for c in doc["cases"]}
    assert {"contrastive_loss", "contrastive_loss autotune", "infonce large index", "topk_frame_similarity",
            "video_contrastive_loss", "select_frames", "distillation_loss", "sigmoid_loss"} <= ops
    assert not [c for c in doc["cases"] if "error" in c]
    for op, n_kernels in (("contrastive_loss autotune", 2), ("distillation_loss autotune", 2),
                          ("topk_frame_similarity + video_contrastive_loss + select_frames autotune", 4)):
        tune = next(c for c in doc["cases"] if c["op"] == op)
        assert len(tune["kernels"]) >= n_kernels and tune["tuned_ms"] > 0, op
        assert all(len(k["timings_ms"] or {}) > 1 for k in tune["kernels"][-1:]), op

    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    text = "\n".join(report.gpu_tables(doc))
    assert "### sigmoid_loss" in text
    assert "### contrastive_loss" in text and "Autotune of contrastive_loss at B=64" in text and "relative errors" in text
