"""The compiled fused passes (runtime/fused_jit.py) give the numpy code's floats bit for bit: the
Brownian increment (sum of tree intervals, sign, / sqrt|dt|) and the UniPC step, on shapes that end
in a partial block, every step order, VP and flow families, and with a float64 denoiser (numpy path)."""
from __future__ import annotations

import numpy as np
import pytest

from ksampler_rt.runtime import Model, fused_jit, ksampler
from ksampler_rt.runtime.brownian import BrownianTree
from ksampler_rt.runtime.noise import NoiseSource
from ksampler_rt.runtime.samplers import SAMPLERS

pytestmark = pytest.mark.skipif(not fused_jit.available(), reason="the compiled kernels are not available here")
F32 = np.float32


def numpy_path(monkeypatch):
    monkeypatch.setattr(fused_jit, "available", lambda: False)


def test_brownian_scaled_is_the_numpy_increment(monkeypatch):
    shape = (2, 3, 1031)  # 6186 elements: three blocks of 2048 and a partial one
    tree = BrownianTree(0.002, 1.0, shape, 5)
    rng = np.random.default_rng(3)
    for _ in range(12):
        ta, tb = np.sort(rng.uniform(0.002, 1.0, 2))
        neg = bool(rng.integers(2))
        div = np.sqrt(np.abs(F32(tb) - F32(ta)))
        w = tree(ta, tb)  # the numpy sum, left to right
        got = tree.scaled(ta, tb, neg, div)
        assert got.dtype == F32 and got.shape == shape
        assert np.array_equal(got, (-w if neg else w) / div)
    with monkeypatch.context() as m:
        numpy_path(m)
        assert np.array_equal(tree.scaled(0.1, 0.7, True, F32(0.5)), -tree(0.1, 0.7) / F32(0.5))
    with np.errstate(divide="ignore", invalid="ignore"):  # numpy's division semantics, no exception
        assert np.array_equal(tree.scaled(0.1, 0.7, False, F32(0.0)), tree(0.1, 0.7) / F32(0.0), equal_nan=True)
        assert np.isnan(tree.scaled(0.3, 0.3, False, F32(0.0))).all()  # ta == tb: 0 / 0 as before


def test_brownian_sum_rejects_mixed_arrays():
    with pytest.raises(ValueError, match="values"):
        fused_jit.brownian_sum([np.zeros(4, F32), np.zeros(4, np.float64)], False, F32(1.0))


def zero_cost_unet(x, timestep, context, **kw):
    t = np.asarray(timestep, F32).reshape(-1)[:, None, None, None]
    return (F32(0.9) * x + F32(0.1) * np.tanh(x) + t * F32(0.001)).astype(F32)


@pytest.fixture(scope="module")
def conds():
    rng = np.random.default_rng(0)

    def cond(pooled):
        extra = {"pooled_output": rng.standard_normal((1, pooled)).astype(F32)} if pooled else {}
        return [[rng.standard_normal((1, 7, 16)).astype(F32), extra]]

    return {"sd15": (cond(None), cond(None), 4), "flux": (cond(8), cond(8), 16), "sd3": (cond(8), cond(8), 16)}


@pytest.mark.parametrize("family", ["sd15", "flux", "sd3"])
@pytest.mark.parametrize("sampler", ["uni_pc", "uni_pc_bh2", "dpmpp_sde"])
def test_ksampler_bit_identical_to_numpy(monkeypatch, conds, family, sampler):
    pos, neg, ch = conds[family]
    model = Model(zero_cost_unet, family=family)
    latent = {"samples": np.random.default_rng(1).standard_normal((1, ch, 33, 21)).astype(F32)}
    steps_list = (1, 2, 3, 4, 7) if sampler != "dpmpp_sde" else (3,)
    fused = [ksampler(model, 9, s, 3.0, sampler, "normal", pos, neg, latent, denoise=0.8)["samples"]
             for s in steps_list]
    numpy_path(monkeypatch)
    for s, got in zip(steps_list, fused):
        ref = ksampler(model, 9, s, 3.0, sampler, "normal", pos, neg, latent, denoise=0.8)["samples"]
        assert got.tobytes() == ref.tobytes(), (family, sampler, s)


class Denoiser:
    """A bare sampler-level denoiser (the sampler contract), optionally answering in float64."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.model_sampling = Model(zero_cost_unet, family="flux").model_sampling

    def __call__(self, x, sigma):
        return (x * F32(0.7) + F32(0.01) * F32(sigma)).astype(self.dtype)


@pytest.mark.parametrize("dtype", [F32, np.float64])
def test_unipc_loop_matches_numpy_for_any_denoiser_dtype(monkeypatch, dtype):
    x = np.random.default_rng(2).standard_normal((1, 16, 9, 9)).astype(F32)
    sigmas = np.array([1.0, 0.8, 0.6, 0.4, 0.25, 0.1, 0.0], F32)  # flow sigmas, order 1 to 3
    fn = SAMPLERS["uni_pc"].fn
    seen = []
    got = fn(Denoiser(dtype), x.copy(), sigmas, NoiseSource(0), callback=lambda i, xi, d: seen.append(xi.copy()))
    numpy_path(monkeypatch)
    ref_seen = []
    ref = fn(Denoiser(dtype), x.copy(), sigmas, NoiseSource(0), callback=lambda i, xi, d: ref_seen.append(xi.copy()))
    assert np.isfinite(got).all() and got.dtype == ref.dtype and got.tobytes() == ref.tobytes()
    assert len(seen) == len(ref_seen) and all(a.tobytes() == b.tobytes() for a, b in zip(seen, ref_seen))
