"""Parity with REAL ComfyUI 0.3.64 (CPU, float32) on golden data.

The golden data in tests/runtime/golden/ was produced by
tests/runtime/golden/make_comfyui_golden.py, which runs ComfyUI's own
``nodes.KSampler`` / ``nodes.KSamplerAdvanced`` / ``comfy.samplers.KSampler`` around a real
``comfy.model_base.BaseModel`` (SD1.5 eps, SD2 v-prediction) or ``SDXL`` whose
``diffusion_model`` is the analytic UNet of tests/runtime/analytic_unet.py (in torch). Here the
same cases are rebuilt with ``ksampler_rt.runtime`` and the numpy twin of that UNet.

Tolerances
----------
* Sigma lists: exact for the table-lookup schedulers (simple, ddim_uniform, beta); ``rtol=1e-6``
  for the others (float32 tables, log-interpolation, float64->float32 formulas). Measured when the
  data was made: 333 of 378 lists bit-identical, the rest within 1 ulp.
* Sampler outputs (values ~1..200 in VAE space, i.e. after ÷0.18215): the torch run uses SLEEF
  float32 tanh/exp/log/expm1 and torch's reduction order for means, numpy uses its own SIMD
  transcendental functions and pairwise sums. Those ulp-level differences are amplified by
  cfg 8 and the steps, so outputs are compared with ``|got - want| <= SAMPLE_TOL * max(1, max|want|)``
  and ``rtol=SAMPLE_TOL`` elementwise. Measured: median 1.1e-6, worst 1.7e-5 (heun, 2 steps,
  values up to 128), so SAMPLE_TOL = 5e-5 leaves a ~3x margin for other CPUs' SIMD paths.
  The initial noise (torch mt19937 + Box-Muller) and the ancestral / Brownian-tree noise ports
  are held to the same tolerance: a wrong noise stream or a wrong formula gives errors of
  1e-2..1e+1, far above it.

Case ids are the golden ids (``ks/<sampler>/<variant>``, ``ksa/...``, ``sd2-v/...``,
``sdxl/...``), so ``pytest -k euler`` or ``-k sdxl`` selects subsets.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from analytic_unet import AnalyticUNet  # tests/runtime/ is on sys.path (pytest's rootdir-less import)

from ksampler_rt.runtime import (SAMPLER_NAMES, SCHEDULER_NAMES, Model, calculate_sigmas, ksampler,
                                 ksampler_advanced)

try:  # the registry of *implemented* samplers (SAMPLER_NAMES may list names not built yet)
    from ksampler_rt.runtime.samplers import SAMPLERS as _IMPLEMENTED
except ImportError:  # pragma: no cover
    _IMPLEMENTED = {n: None for n in SAMPLER_NAMES}

GOLDEN = Path(__file__).parent / "golden"
META = json.loads((GOLDEN / "cases.json").read_text())
SCHED = np.load(GOLDEN / "schedulers.npz")
DATA = np.load(GOLDEN / "samplers.npz")

SIGMA_RTOL = 1e-6
EXACT_SCHEDULERS = {"simple", "ddim_uniform", "beta"}  # pure sigma-table lookups
SAMPLE_TOL = 5e-5  # rtol, and atol scaled by the output's max |value| where that exceeds 1

COMFY_SAMPLERS = META["samplers"]
COMFY_SCHEDULERS = META["schedulers"]
SCHED_CASES = META["scheduler_cases"]
SAMPLER_CASES = [c for c in META["sampler_cases"] if not c.get("error")]
CASES_BY_ID = {c["id"]: c for c in SAMPLER_CASES}


# ----------------------------------------------------------------------------- registry
def test_golden_environment_recorded():
    env = META["env"]
    assert env["comfyui_version"] == "0.3.64"
    assert env["comfyui_commit"] == "a125cd84b054a57729b5eecab930ca9408719832"
    assert env["torch"].startswith("2.")
    assert env["cpu_capability"]


def test_every_comfyui_sampler_is_registered():
    """Once this passes, no parity case can be skipped for a missing sampler."""
    assert len(COMFY_SAMPLERS) == 42
    missing = [n for n in COMFY_SAMPLERS if n not in _IMPLEMENTED]
    assert not missing, f"samplers of ComfyUI 0.3.64 not implemented: {missing}"
    assert not [n for n in COMFY_SAMPLERS if n not in SAMPLER_NAMES]


def test_scheduler_names_match_comfyui():
    assert list(SCHEDULER_NAMES) == COMFY_SCHEDULERS


# ----------------------------------------------------------------------------- schedulers
class _SD15:
    model = None

    @classmethod
    def get(cls):
        if cls.model is None:
            cls.model = Model(AnalyticUNet(), family="sd15")
        return cls.model


@pytest.mark.parametrize("case", SCHED_CASES, ids=[c["id"] for c in SCHED_CASES])
def test_scheduler_sigmas(case):
    want = SCHED[case["id"]]
    if case["error"]:
        with pytest.raises(Exception):
            calculate_sigmas(_SD15.get(), case["scheduler"], case["steps"], case["sampler_name"], case["denoise"])
        return
    got = calculate_sigmas(_SD15.get(), case["scheduler"], case["steps"], case["sampler_name"], case["denoise"])
    got = np.asarray(got)
    assert got.dtype == np.float32
    assert got.shape == want.shape, (got, want)
    if case["scheduler"] in EXACT_SCHEDULERS:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=SIGMA_RTOL, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- samplers
def _conditioning(names, family):
    out = []
    for n in names:
        extra = {}
        if family == "sdxl":
            extra["pooled_output"] = DATA["pooled/" + n].copy()
        out.append([DATA["cond/" + n].copy(), extra])
    return out


def _latent(case):
    lat = case["latent"]
    if lat.startswith("out:"):  # a chained KSamplerAdvanced stage: ComfyUI's own first-stage output
        return DATA["out/" + lat[4:]].copy()
    return DATA["latent/" + lat].copy()


def _accepts_callback(fn):
    try:
        return "callback" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _run(case, unet, latent=None, callback=None):
    model = Model(unet, family=case["family"])
    p = case["params"]
    pos = _conditioning(case["positive"], case["family"])
    neg = _conditioning(case["negative"], case["family"])
    lat = {"samples": _latent(case) if latent is None else latent}
    kw = {} if callback is None else {"callback": callback}
    if case["kind"] == "ksampler":
        return ksampler(model, p["seed"], p["steps"], p["cfg"], p["sampler_name"], p["scheduler"], pos, neg, lat,
                        denoise=p["denoise"], **kw)
    return ksampler_advanced(model, p["add_noise"], p["noise_seed"], p["steps"], p["cfg"], p["sampler_name"],
                             p["scheduler"], pos, neg, lat, p["start_at_step"], p["end_at_step"],
                             p["return_with_leftover_noise"], **kw)


def _assert_close(got, want, what):
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= SAMPLE_TOL * scale, f"{what}: max |diff| {err:.3g} > {SAMPLE_TOL:g} x scale {scale:.3g}"
    np.testing.assert_allclose(got, want, rtol=SAMPLE_TOL, atol=SAMPLE_TOL * scale, err_msg=what)


def _skip_unimplemented(case):
    name = case["params"]["sampler_name"]
    if name not in _IMPLEMENTED:  # impossible once test_every_comfyui_sampler_is_registered passes
        pytest.skip(f"sampler {name!r} not in ksampler_rt.runtime.samplers.SAMPLERS yet")


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=[c["id"] for c in SAMPLER_CASES])
def test_sampler_parity(case):
    _skip_unimplemented(case)
    steps = []
    cb = None
    if case["perstep"] and _accepts_callback(ksampler):
        def cb(i, total, x, denoised):
            steps.append((i, np.array(x, copy=True), np.array(denoised, copy=True)))
    out = _run(case, AnalyticUNet(), callback=cb)
    want = DATA["out/" + case["id"]]
    got = out["samples"]
    assert np.asarray(got).dtype == np.float32
    _assert_close(got, want, case["id"])
    if cb is not None:
        want_x = DATA["steps_x/" + case["id"]]
        want_d = DATA["steps_denoised/" + case["id"]]
        assert len(steps) == len(want_x), f"{len(steps)} callback steps, ComfyUI made {len(want_x)}"
        for k, (i, x, d) in enumerate(steps):
            assert i == k
            _assert_close(x, want_x[k], f"{case['id']} step {k} x")
            _assert_close(d, want_d[k], f"{case['id']} step {k} denoised")


CHAINED = [c for c in SAMPLER_CASES if c["latent"].startswith("out:")]


@pytest.mark.parametrize("case", CHAINED, ids=[c["id"] for c in CHAINED])
def test_advanced_split_chained_on_own_output(case):
    """Stage b fed with *our* stage a output (not ComfyUI's) still matches ComfyUI's stage b."""
    _skip_unimplemented(case)
    first = CASES_BY_ID[case["latent"][4:]]
    a = _run(first, AnalyticUNet())["samples"]
    b = _run(case, AnalyticUNet(), latent=np.asarray(a))["samples"]
    _assert_close(b, DATA["out/" + case["id"]], case["id"] + " (chained)")


RECORDED = [c for c in SAMPLER_CASES if c.get("record_unet")]


@pytest.mark.parametrize("case", RECORDED, ids=[c["id"] for c in RECORDED])
def test_unet_inputs_match_comfyui(case, monkeypatch):
    """What the UNet receives: one batched call per step, rows [uncond..., cond...], integer
    timesteps, the c_in-scaled latent, and (SDXL) the 2816-wide ADM vector.

    The golden data was made on an AMD EPYC, where torch's MKL takes its SSE4.2 path, whose float32
    exp gives the ADM frequencies their last bits: this machine's MKL is lowered to the same path
    (MKL_ENABLE_INSTRUCTIONS, which the runtime reads as MKL does) so y compares to the golden bits."""
    _skip_unimplemented(case)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", META["env"].get("mkl_enable_instructions", "SSE4_2"))
    unet = AnalyticUNet(record=True)
    _run(case, unet)
    cid = case["id"]
    want_t = DATA["unet/timestep/" + cid]
    assert len(unet.calls) == case["unet_calls"] == len(want_t)
    assert case["unet_cond_or_uncond"] == [1, 0]  # ComfyUI: uncond rows first
    for k, call in enumerate(unet.calls):
        np.testing.assert_array_equal(np.asarray(call["timestep"], np.float32), want_t[k])
        np.testing.assert_allclose(call["context"].mean(axis=(1, 2)), DATA["unet/context_mean/" + cid][k],
                                   rtol=1e-6, atol=1e-7)
        _assert_close(call["x"], DATA["unet/x/" + cid][k], f"{cid} call {k} x_in")
        if "unet/y/" + cid in DATA.files:
            assert call["y"] is not None
            np.testing.assert_allclose(call["y"], DATA["unet/y/" + cid][k], rtol=1e-5, atol=1e-6)
