"""Build script: setuptools drives CMakeLists.txt to compile the C++ extension fitclip_ext._C.

The extension is compiled against the torch already installed in the target environment; no
other torch is downloaded. `pip install -e . --no-build-isolation` (what the Makefile runs) uses
that torch directly. Plain `pip install -e .` also works: pip's isolated build environment has
no torch, so the torch query runs the same interpreter with `-I`, which sees the environment's
own site-packages instead of the isolated ones.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Hugging Face's `kernels` package (a dependency of transformers 5) registers a setuptools
# egg_info writer imported as `kernels._internals.locking`: with this folder on sys.path (python
# setup.py, pip install -e .) the top-level kernels/ folder would shadow it and every build in such
# an environment would fail. Nothing here imports from the source tree through sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

from setuptools import Extension, setup  # noqa: E402
from setuptools.command.build_ext import build_ext  # noqa: E402

ROOT = Path(__file__).resolve().parent


def _torch_query_flags() -> list[str]:
    probe = "import torch"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        return []
    if subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True).returncode == 0:
        return ["-I"]
    raise RuntimeError(
        "fitclip_ext: torch is not installed in this environment. Install it first "
        "(e.g. `pip install torch==2.14.1`), then `pip install -e . --no-build-isolation`."
    )


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            import pybind11
        except ImportError as err:  # build requirement, see pyproject.toml
            raise RuntimeError("fitclip_ext: building needs pybind11 (`pip install pybind11`)") from err
        cmake = shutil.which("cmake") or "cmake"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), *generator,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFITCLIP_TORCH_QUERY_FLAGS={';'.join(_torch_query_flags())}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FITCLIP_BUILD_TYPE', 'Release')}",
            f"-DFITCLIP_OPT_LEVEL={os.environ.get('FITCLIP_OPT_LEVEL', '-O3')}",
        ]
        subprocess.run(args, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    name="fitclip-ext",
    version="0.1.0",
    description="Fused CLIP contrastive loss and top-k frame kernels (Triton, C++) and a FitCLIP video trainer",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/ and install as fitclip_ext.kernels: the distribution
    # must not claim the top-level name `kernels` (another PyPI package owns it).
    packages=["fitclip_ext", "fitclip_ext.backends", "fitclip_ext.kernels"],
    package_dir={"fitclip_ext": "fitclip_ext", "fitclip_ext.kernels": "kernels"},
    ext_modules=[CMakeExtension("fitclip_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["fitclip = fitclip_ext.cli:main"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "video": ["torchcodec>=0.14", "open_clip_torch>=3.0", "safetensors", "tqdm", "matplotlib", "pillow", "flask>=3",
                  "waitress>=3", "webdataset>=0.2"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "selenium>=4.20"],
    },
)
