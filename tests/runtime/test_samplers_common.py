"""Shared sampler steps (runtime/samplers/common.py) against the expressions they stand for."""
import numpy as np
import pytest

from ksampler_rt.runtime.samplers.common import nan_to_zero, times

F32 = np.float32


@pytest.mark.parametrize("factors", [
    (1.0, F32(0.731)),                     # s_noise = 1 (skipped), then sigma_up
    (F32(0.3), 1, F32(2.5)),
    (0.5, F32(1.7), 3.0),
    (F32(1.0),),
    (),
    (F32(np.nan), 1.0),
    (np.float64(1.0), F32(0.2)),           # a strong float64 1: widens, so it is applied as written
    (F32(0.25), np.float64(3.3)),
])
def test_times_equals_the_written_chain(factors):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 4, 9, 7)).astype(F32)
    a[0, 0, 0, :3] = [np.inf, -0.0, 1e-45]
    before = a.copy()
    want = a
    for f in factors:
        want = want * f
    got = times(a, *factors)
    assert got.dtype == want.dtype
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))
    assert np.array_equal(a, before)  # the input is never written
    if factors and any(f != 1 for f in factors):
        assert got is not a


def test_nan_to_zero_matches_nan_to_num():
    for v in [F32(np.nan), F32(np.inf), F32(-np.inf), F32(0.0), F32(-0.0), F32(3.5), F32(1e-45)]:
        got, want = nan_to_zero(v), np.nan_to_num(v, nan=0.0)
        assert type(got) is type(want) and got.tobytes() == want.tobytes(), v
