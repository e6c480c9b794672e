"""Rectified-flow model sampling (SD3 / SD3.5, FLUX.1 dev / schnell) against golden data made by running
ComfyUI 0.3.64's own ModelSamplingDiscreteFlow / ModelSamplingFlux / CONST and latent formats
(tests/runtime/golden/make_comfyui_flow_golden.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ksampler_rt.runtime import Model
from ksampler_rt.runtime.model_sampling import (ModelSamplingDiscreteFlow, ModelSamplingFlux, flux_shift,
                                                get_family, make_model_sampling)

GOLDEN = Path(__file__).parent / "golden"
DATA = np.load(GOLDEN / "flow_model_sampling.npz")
META = json.loads((GOLDEN / "flow_model_sampling.json").read_text())
FAMILY_OF = {"sd3": "sd3", "sd3_shift_5": "sd3", "flux": "flux", "flux_1024x768": "flux",
             "flux-schnell": "flux-schnell"}


def _model(case: str) -> Model:
    family = FAMILY_OF[case]
    shift = META["cases"][case]["shift"]
    return Model(lambda x, t, c, **kw: x, family, shift=None if shift == get_family(family).shift else shift)


@pytest.mark.parametrize("case", sorted(FAMILY_OF))
def test_sigma_table_bit_exact(case):
    ms = _model(case).model_sampling
    ref = DATA[f"{case}/sigmas"]
    assert ms.sigmas.dtype == np.float32 and ms.sigmas.shape == ref.shape
    assert np.array_equal(ms.sigmas, ref)
    assert ms.sigma_min == ref[0] and ms.sigma_max == ref[-1]


@pytest.mark.parametrize("case", sorted(FAMILY_OF))
def test_sigma_and_timestep_bit_exact(case):
    ms = _model(case).model_sampling
    mult = META["cases"][case]["multiplier"]
    t = DATA["probe_t"] * np.float32(mult)
    assert np.array_equal(ms.sigma(t), DATA[f"{case}/sigma_of_t"])
    assert np.array_equal(ms.timestep(DATA[f"{case}/probe_sigma"]), DATA[f"{case}/timestep"])


@pytest.mark.parametrize("case", sorted(FAMILY_OF))
def test_percent_to_sigma(case):
    ms = _model(case).model_sampling
    ours = np.asarray([ms.percent_to_sigma(p) for p in META["percents"]])
    np.testing.assert_array_equal(ours, DATA[f"{case}/percent_to_sigma"])


@pytest.mark.parametrize("case", sorted(FAMILY_OF))
def test_const_prediction_and_latent_format(case):
    model = _model(case)
    ms = model.model_sampling
    noise, latent, out = DATA["noise"], DATA["latent"], DATA["model_output"]
    np.testing.assert_array_equal(ms.noise_scaling(np.float32([0.8]), noise, latent), DATA[f"{case}/noise_scaling"])
    np.testing.assert_array_equal(ms.inverse_noise_scaling(np.float32(0.3), latent),
                                  DATA[f"{case}/inverse_noise_scaling"])
    np.testing.assert_array_equal(ms.calculate_denoised(np.float32([0.6, 0.2]), out, latent), DATA[f"{case}/denoised"])
    assert ms.calculate_input(np.float32(0.5), latent) is latent  # no c_in for flow models
    np.testing.assert_array_equal(model.process_latent_in(latent), DATA[f"{case}/process_in"])
    np.testing.assert_array_equal(model.process_latent_out(latent), DATA[f"{case}/process_out"])


def test_flux_node_shift():
    # the figure and ComfyUI's node, computed by the golden script
    assert flux_shift(1024, 768) == pytest.approx(0.9766666666666666, abs=1e-15)
    assert flux_shift(1024, 768) == META["cases"]["flux_1024x768"]["shift"]
    assert flux_shift(1024, 1024) == pytest.approx(1.15)  # 4096 tokens: max_shift
    assert flux_shift(256, 256) == pytest.approx(0.5)     # 256 tokens: base_shift


def test_hand_values():
    """Independent of the golden data: the formulas at a few points, in float64."""
    sd3 = ModelSamplingDiscreteFlow(shift=3.0, multiplier=1000)
    assert len(sd3.sigmas) == 1000 and sd3.sigmas[-1] == 1.0
    assert float(sd3.sigmas[499]) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), rel=1e-6)
    assert float(sd3.timestep(np.float32(0.25))) == 250.0
    flux = ModelSamplingFlux(shift=1.15)
    assert len(flux.sigmas) == 10000
    e = math.exp(1.15)
    assert float(flux.sigmas[4999]) == pytest.approx(e / (e + 1 / 0.5 - 1), rel=1e-6)
    schnell = make_model_sampling(get_family("flux-schnell"))
    assert np.array_equal(schnell.sigmas, np.arange(1, 1001, dtype=np.float32) / np.float32(1000))


def test_shift_validation():
    unet = lambda x, t, c, **kw: x  # noqa: E731
    with pytest.raises(ValueError, match=r"shift: received -1, expected a finite number > 0"):
        Model(unet, "sd3", shift=-1)
    with pytest.raises(ValueError, match=r"shift: received 3.0, expected None for the discrete VP family 'sd15'"):
        Model(unet, "sd15", shift=3.0)
    assert Model(unet, "sd3", shift=5).model_sampling.shift == 5.0
    assert Model(unet, "flux").latent_channels == 16
