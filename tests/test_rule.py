"""The numerics rule itself (fitclip_ext.testing) fails what is wrong: a finite wrong result or an
infinite one where the naive same-dtype result overflowed (its infinite error bounds nothing), NaN,
and an overflow declared where nothing overflows; it passes an explicit overflow only with
infinities of the truth's sign where the float64 truth is beyond the dtype's range."""
import math

import pytest
import torch

from fitclip_ext import testing
from fitclip_ext.testing import assert_within_rule, rule_bound, rule_rows

F16_MAX = torch.finfo(torch.float16).max


@pytest.fixture(autouse=True)
def _keep_margins_clean():
    """These checks fail on purpose: their margins would top the session's summary of real ones."""
    n = len(testing.MARGINS)
    yield
    del testing.MARGINS[n:]


def _truth():
    return torch.tensor([160380.0, 3.0], dtype=torch.float64)  # (the first beyond float16's 65504)


def test_overflowed_naive_result_bounds_nothing():
    truth = _truth()
    naive = truth.to(torch.float16)  # [inf, 3]
    assert math.isinf(float(naive[0]))
    assert rule_bound(math.inf, torch.float16) == 1e-3 and rule_bound(math.nan, torch.float16) == 1e-3
    for wrong in ([5.0, 3.0], [math.inf, 3.0], [math.inf, 4.0], [math.nan, 3.0]):
        with pytest.raises(AssertionError):
            assert_within_rule("loss", torch.tensor(wrong, dtype=torch.float16), naive, truth, torch.float16)


def test_explicit_overflow_passes_only_infinities_of_the_truths_sign():
    truth = _truth()
    naive = truth.to(torch.float16)
    assert_within_rule("loss", torch.tensor([math.inf, 3.0], dtype=torch.float16), naive, truth, torch.float16,
                       overflow=True)
    for wrong in ([-math.inf, 3.0], [F16_MAX, 3.0], [math.inf, 3.5], [math.inf, math.nan]):
        with pytest.raises(AssertionError):
            assert_within_rule("loss", torch.tensor(wrong, dtype=torch.float16), naive, truth, torch.float16,
                               overflow=True)
    small = torch.tensor([1.0, 3.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="nothing overflows"):
        assert_within_rule("loss", small.half(), small.half(), small, torch.float16, overflow=True)


def test_rule_rows_fail_what_is_wrong():
    truth = _truth()
    naive = truth.to(torch.float16)
    good = torch.tensor([160380.0, 3.0], dtype=torch.float32)  # a kernel that kept a wider accumulator
    rows = rule_rows(["a", "b", "c"], [torch.tensor([5.0, 3.0]), torch.tensor([math.inf, 3.0]), good],
                     [naive] * 3, [truth] * 3, torch.float16)
    assert [r["ok"] for r in rows] == [False, False, True]
    assert rows[0]["bound"] == 1e-3
