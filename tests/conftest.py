import json
import math
import os

import torch

# Without a GPU the Triton kernels are tested through the interpreter. Triton reads this when a
# kernel is decorated, so it must be set before fitclip_ext.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest


@pytest.fixture(autouse=True, scope="session")
def _exact_bf16_dot_under_the_interpreter():
    """The interpreter's bf16 tl.dot multiplies raw bit patterns; with the operands widened to
    float32 first (fitclip_ext.kernels.interpret) every Triton kernel's bf16 path is tested."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        yield
        return
    from fitclip_ext.kernels.interpret import exact_bf16_dot

    with exact_bf16_dot():
        yield


@pytest.fixture(autouse=True)
def _skip_cpp_cases_without_extension(request):
    """The GPU check machine runs the tests from the source tree without building the C++
    extension (gpu_check.sh sets FITCLIP_ALLOW_NO_CPP=1); everywhere else a missing extension
    fails the C++ cases instead of skipping them."""
    callspec = getattr(request.node, "callspec", None)
    if os.environ.get("FITCLIP_ALLOW_NO_CPP") == "1" and callspec is not None and callspec.params.get("backend") == "cpp":
        from fitclip_ext import backends

        if not backends.load_cpp():
            # only under FITCLIP_ALLOW_NO_CPP=1 (the GPU machine, which runs the Triton cases from
            # the source tree); make test builds the extension and a missing one fails there
            pytest.skip("C++ extension fitclip_ext._C not built")


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="the edit-test loop (make test-fast): no test marked slow (build, packaging, ahead-of-time "
                          "compile, browser, GPU script, trainer end to end), and of each parametrized test the first "
                          f"{FAST_CASES} cases of every (backend, dtype): every op on every backend and dtype against "
                          "float64, on fewer shapes")


FAST_CASES = 2


def pytest_collection_modifyitems(config, items):
    if config.getoption("--fast"):
        keep, dropped, seen = [], [], {}
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if item.get_closest_marker("slow") is not None:
                dropped.append(item)
                continue
            if "backend" in params and "dtype" in params:
                key = (item.module.__name__, item.originalname, params["backend"], str(params["dtype"]))
                seen[key] = seen.get(key, 0) + 1
                if seen[key] > FAST_CASES:
                    dropped.append(item)
                    continue
            keep.append(item)
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    # The few long tests (marked slow) first, so that under pytest-xdist (make test runs -n auto)
    # they overlap with the many short ones instead of running alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session):
    # Under pytest-xdist each worker hands its margins to the controller (pytest_testnodedown).
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        from fitclip_ext.testing import MARGINS

        workeroutput["fitclip_margins"] = json.dumps(MARGINS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from fitclip_ext.testing import MARGINS

    MARGINS.extend(tuple(r) for r in json.loads(getattr(node, "workeroutput", {}).get("fitclip_margins", "[]")))


def pytest_terminal_summary(terminalreporter):
    """The tightest tolerance margins of the float64-rule checks (error / bound; above 1 fails)."""
    from fitclip_ext.testing import MARGINS

    if not MARGINS:
        return
    terminalreporter.section("tightest float64-rule margins (error / bound)")
    for test, name, ratio in sorted(MARGINS, key=lambda r: -r[2] if r[2] == r[2] else -math.inf)[:12]:  # NaN first
        terminalreporter.write_line(f"{ratio:7.3f}  {name:24} {test}")
