"""UniPC (bh1, bh2) as ComfyUI wraps it: VP rescale, sigma 0 -> 0.001, order min(3, steps - 1),
lower_order_final, one model call per step, the result multiplied back at the end."""
from __future__ import annotations

import numpy as np
import pytest

from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete
from ksampler_rt.runtime.samplers import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, SAMPLERS
from ksampler_rt.runtime.samplers.unipc import unipc_plan

F32 = np.float32
Q = F32(0.5)
NAMES = ["uni_pc", "uni_pc_bh2"]
X0 = (np.linspace(-3, 3, 16, dtype=F32) * F32(10)).reshape(1, 4, 2, 2)


class GaussianModel:
    model_sampling = ModelSamplingDiscrete()

    def __init__(self):
        self.calls, self.sigmas = 0, []

    def __call__(self, x, sigma):
        self.calls += 1
        self.sigmas.append(float(sigma))
        assert x.dtype == np.float32
        return x * Q / (F32(sigma) ** 2 + Q)


def geometric(n, hi=10.0, lo=0.1):
    return np.exp(np.linspace(np.log(hi), np.log(lo), n + 1)).astype(F32)


def flow(x, s0, s1):
    return x * np.sqrt((s1 ** 2 + Q) / (s0 ** 2 + Q))


@pytest.mark.parametrize("name,min_gain", [("uni_pc", 50), ("uni_pc_bh2", 20)])
def test_converges_to_gaussian_flow(name, min_gain):
    errs = []
    for n in (6, 24):
        sig = geometric(n)
        out = SAMPLERS[name].fn(GaussianModel(), X0.copy(), sig)
        assert out.dtype == np.float32
        exact = flow(X0, sig[0], sig[-1])  # ends above 0: multiplied back to k-diffusion scale
        errs.append(np.abs(out - exact).max() / np.abs(exact).max())
    assert errs[1] < 2e-3 and errs[0] / errs[1] > min_gain


@pytest.mark.parametrize("name", NAMES)
def test_zero_end_uses_0_001(name):
    sig = np.append(geometric(11, 14.6, 0.03), F32(0))
    out = SAMPLERS[name].fn(GaussianModel(), X0.copy(), sig)
    exact = flow(X0, sig[0], 0.001)
    assert np.abs(out - exact).max() / np.abs(exact).max() < 1e-3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_one_call_per_step_and_callbacks(name, steps):
    sig = np.append(geometric(steps - 1, 14.6, 0.03), F32(0)) if steps > 1 else np.array([14.6, 0], F32)
    model, seen = GaussianModel(), []
    out = SAMPLERS[name].fn(model, X0.copy(), sig, None, callback=lambda i, x, d: seen.append(i))
    assert model.calls == steps and seen == list(range(steps))
    assert model.sigmas == [float(s) for s in sig[:-1]]  # never evaluated at the final 0.001
    assert np.isfinite(out).all()


def test_single_step_returns_rescaled_input():
    """order = min(3, steps - 1) = 0: ComfyUI only evaluates once and hands back x, rescaled."""
    sig = np.array([14.6, 0], F32)
    out = SAMPLERS["uni_pc"].fn(GaussianModel(), X0.copy(), sig)
    alpha_end = 1 / np.sqrt(1 + 0.001 ** 2)
    np.testing.assert_allclose(out, X0 / np.sqrt(1 + 14.6 ** 2) / alpha_end, rtol=1e-6)


def test_plan_orders():
    """Warm-up raises the order 1, 2, 3; lower_order_final drops it to 2 and 1 at the end; the
    corrector runs on every update but the last."""
    t = np.append(geometric(9, 14.6, 0.03), F32(0.001))
    plan = unipc_plan(t)
    assert [u.order for u in plan] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [u.rhos_c is not None for u in plan] == [True] * 9 + [False]
    assert [u.order for u in unipc_plan(t[:3])] == [1, 1]  # steps 2: order min(3, 1)
    assert [u.order for u in unipc_plan(t[:4])] == [1, 2, 1]


def test_discards_penultimate_sigma():
    assert {"uni_pc", "uni_pc_bh2"} <= DISCARD_PENULTIMATE_SIGMA_SAMPLERS
