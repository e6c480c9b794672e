"""Per-step prompt scheduling in one sampler call (start_step / end_step on conditioning entries),
and ComfyUI's own start_percent / end_percent ranges (ConditioningSetTimestepRange)."""
import numpy as np
import pytest

from ksampler_rt.runtime import Model, ksampler, ksampler_advanced
from ksampler_rt.runtime.cfg import CFGDenoiser

STEPS, SEED, SWITCH = 8, 7, 3
LATENT = {"samples": np.zeros((1, 4, 8, 8), np.float32)}
NEG = [[np.full((1, 4, 8), -0.5, np.float32), {}]]


def ctx(value):
    return np.full((1, 4, 8), value, np.float32)


@pytest.fixture(scope="module")
def model(analytic_unet_cls):
    return Model(analytic_unet_cls(), "sd15")


def scheduled(model, sampler):
    positive = [[ctx(0.5), {"end_step": SWITCH}], [ctx(2.0), {"start_step": SWITCH}]]
    return ksampler(model, SEED, STEPS, 8.0, sampler, "normal", positive, NEG, LATENT)["samples"]


def windows(model, sampler, continuation):
    first = ksampler_advanced(model, "enable", SEED, STEPS, 8.0, sampler, "normal", [[ctx(0.5), {}]], NEG, LATENT,
                              0, SWITCH, "enable", continuation=continuation)
    return ksampler_advanced(model, "disable", SEED, STEPS, 8.0, sampler, "normal", [[ctx(2.0), {}]], NEG, first,
                             SWITCH, 10000, "disable", continuation=continuation)["samples"]


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "uni_pc", "lms"])
def test_one_call_equals_the_exact_window_chain(model, sampler):
    assert np.array_equal(scheduled(model, sampler), windows(model, sampler, "exact"))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_deterministic_single_step_samplers_match_comfyui_window_chain(model, sampler):
    got, comfy = scheduled(model, sampler), windows(model, sampler, "comfyui")
    np.testing.assert_allclose(got, comfy, rtol=1e-5, atol=1e-4)  # ComfyUI's chain differs by its scale round trip


def test_schedule_really_switches(model):
    only_first = ksampler(model, SEED, STEPS, 8.0, "euler", "normal", [[ctx(0.5), {}]], NEG, LATENT)["samples"]
    assert not np.allclose(scheduled(model, "euler"), only_first, atol=1e-3)


def test_percent_ranges_pick_entries_by_sigma_like_comfyui(analytic_unet_cls):
    unet = analytic_unet_cls(record=True)
    model = Model(unet, "sd15")
    ms = model.model_sampling
    positive = [[ctx(1.0), {"start_percent": 0.0, "end_percent": 0.5}], [ctx(3.0), {"start_percent": 0.5, "end_percent": 1.0}]]
    d = CFGDenoiser(model, positive, NEG, 1.0, 1, (8, 8))
    boundary = ms.percent_to_sigma(0.5)
    x = np.zeros((1, 4, 8, 8), np.float32)
    d(x, np.float32(boundary * 2))   # high noise: only the first entry (sigma <= sigma(0%) and >= sigma(50%))
    d(x, np.float32(boundary / 2))   # low noise: only the second
    assert [float(c["context"][0, 0, 0]) for c in unet.calls] == [1.0, 3.0]
    d(x, np.float32(boundary))       # exactly on the edge both are active: one call with two rows
    assert unet.calls[-1]["context"].shape[0] == 2
