"""The source distribution builds on its own: pip (and `python -m build`) build the wheel from the
sdist, so it must carry the C++ sources and CMakeLists.txt, not only the Python files. Then the
package installed from it (not the editable checkout) loads its C++ extension and its kernels."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    # from a copy without build state: setuptools also packs whatever an existing
    # *.egg-info/SOURCES.txt lists, which would hide a file the manifest forgot
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", "*.so", "demo_out", ".triton36", ".whl", "results"))
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=src,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (archive,) = out.glob("fitclip_ext-*.tar.gz")
    return archive


def test_sdist_carries_everything_the_build_needs(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = ["CMakeLists.txt", "setup.py", "pyproject.toml"]
    for folder, pattern in (("csrc", "*"), ("fitclip_ext", "*.py"), ("kernels", "*.py")):
        needed += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / folder).glob(pattern)) if p.is_file()]
    missing = [n for n in needed if n not in names]
    assert not missing, f"{sdist.name} lacks {missing}"
    assert any(n.startswith("csrc/") and n.endswith(".cpp") for n in needed)


@pytest.mark.slow
def test_install_from_sdist_builds_and_runs(sdist, tmp_path):
    target = tmp_path / "site"
    # -O0: this checks the packaging and that the build loads and computes right, in half the
    # compile time of -O3 (make setup's build is the optimised one the other tests run)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                           "--target", str(target), str(sdist)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, FITCLIP_OPT_LEVEL="-O0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = """
import torch, fitclip_ext
from pathlib import Path
assert Path(fitclip_ext.__file__).resolve().is_relative_to(Path(TARGET).resolve()), fitclip_ext.__file__
from fitclip_ext import backends
assert backends.load_cpp(), "the installed C++ extension does not load"
from fitclip_ext.kernels import contrastive  # the Triton kernels install as fitclip_ext.kernels
from fitclip_ext.reference import contrastive_loss_reference
g = torch.Generator().manual_seed(0)
a = torch.nn.functional.normalize(torch.randn(37, 24, generator=g), dim=-1).requires_grad_()
b = torch.nn.functional.normalize(torch.randn(37, 24, generator=g), dim=-1).requires_grad_()
s = torch.tensor(20.0)
loss = fitclip_ext.contrastive_loss(a, b, s, backend="cpp")
ga, gb = torch.autograd.grad(loss, (a, b))
a64, b64 = (x.detach().double().requires_grad_() for x in (a, b))
ref = contrastive_loss_reference(a64, b64, s.double())
ra, rb = torch.autograd.grad(ref, (a64, b64))
for x, y in ((loss, ref), (ga, ra), (gb, rb)):
    err = ((x.double() - y).norm() / y.norm()).item()
    assert err < 1e-5, err
print("ok")
""".replace("TARGET", repr(str(target)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    # run outside the checkout, so that the checkout's own fitclip_ext cannot be what is imported
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
