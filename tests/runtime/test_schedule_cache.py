"""samplers/common.py schedule_cached: coefficient tables computed once per distinct schedule."""
import numpy as np
import pytest

from ksampler_rt.runtime import Model, calculate_sigmas
from ksampler_rt.runtime.samplers.classic import lms_coefficients
from ksampler_rt.runtime.samplers.common import schedule_cached
from ksampler_rt.runtime.samplers.unipc import unipc_plan


def test_cached_by_value_type_and_bytes():
    calls = []

    @schedule_cached(maxsize=2)
    def table(sigmas, order):
        calls.append(order)
        return [sigmas * order]

    a = np.array([3.0, 1.0, 0.0], np.float32)
    first = table(a, 2)
    assert table(a.copy(), 2) is first and calls == [2]          # same bytes: one computation
    assert table(a.astype(np.float64), 2) is not first           # another dtype is another key
    assert table(a, 3)[0].tolist() == [9.0, 3.0, 0.0]
    assert len(calls) == 3
    with pytest.raises(ValueError, match="read-only"):
        first[0][0] = 1.0                                          # shared results cannot be corrupted
    table(a, 2)                                                    # evicted (maxsize 2): computed again
    assert len(calls) == 4


def test_lms_and_unipc_tables_equal_fresh_computation():
    model = Model(lambda x, t, c, **k: x, "sd15")
    for scheduler, steps in (("karras", 9), ("normal", 20), ("exponential", 7)):
        s = calculate_sigmas(model, scheduler, steps)
        cached = lms_coefficients(s, 4)
        fresh = lms_coefficients.__wrapped__(s, 4)
        assert cached == fresh
        assert lms_coefficients(s.copy(), 4) is cached
        t = s.copy()
        t[-1] = np.float32(0.001)
        plan, fresh_plan = unipc_plan(t, "bh2"), unipc_plan.__wrapped__(t, "bh2")
        assert [p.b_scale for p in plan] == [p.b_scale for p in fresh_plan]
        assert all(np.array_equal(p.rks, q.rks) for p, q in zip(plan, fresh_plan))
