"""Exact continuation: 0..k + k..N equals 0..N bit for bit, for every sampler (issue: exact continuation)."""
import numpy as np
import pytest

from ksampler_rt.runtime import SAMPLER_NAMES, Model, ksampler, ksampler_advanced
from ksampler_rt.runtime.continuation import ContinuationState

STEPS = 6
SEED = 42


def cond(value):
    return [[np.full((1, 4, 8), value, np.float32), {}]]


POS, NEG = cond(0.5), cond(-0.5)
LATENT = {"samples": np.zeros((1, 4, 8, 8), np.float32)}


@pytest.fixture(scope="module")
def model(analytic_unet_cls):
    return Model(analytic_unet_cls(), "sd15")


def unsplit(model, sampler):
    return ksampler(model, SEED, STEPS, 8.0, sampler, "normal", POS, NEG, LATENT)["samples"]


def window(model, sampler, latent, start, end, leftover, add_noise, mode="exact", pos=POS):
    return ksampler_advanced(model, add_noise, SEED, STEPS, 8.0, sampler, "normal", pos, NEG, latent, start, end,
                             leftover, continuation=mode)


def chain(model, sampler, cuts):
    """Windows 0..c1, c1..c2, ..., ck..end with exact continuation."""
    bounds = [0, *cuts, 10000]
    latent = LATENT
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        last = i == len(bounds) - 2
        latent = window(model, sampler, latent, a, b, "disable" if last else "enable",
                        "enable" if i == 0 else "disable")
        if not last:
            assert isinstance(latent.get("continuation"), ContinuationState)
    return latent["samples"]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_two_windows_equal_the_unsplit_run_bit_for_bit(model, sampler):
    reference = unsplit(model, sampler)
    for k in (1, STEPS // 2, STEPS - 1):
        got = chain(model, sampler, [k])
        assert np.array_equal(got, reference), f"{sampler}: split at {k} differs by {np.abs(got - reference).max()}"


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "dpmpp_sde", "lms"])
def test_three_windows(model, sampler):
    assert np.array_equal(chain(model, sampler, [2, 4]), unsplit(model, sampler))


def test_default_mode_keeps_comfyui_behaviour(model):
    """Without exact continuation, ancestral samplers restart their noise: the split differs (as in ComfyUI)."""
    first = window(model, "euler_ancestral", LATENT, 0, 3, "enable", "enable", mode="comfyui")
    assert "continuation" not in first
    second = window(model, "euler_ancestral", first, 3, 10000, "disable", "disable", mode="comfyui")
    assert not np.allclose(second["samples"], unsplit(model, "euler_ancestral"), atol=1e-3)


def test_first_window_samples_are_the_state_scaled_out(model):
    first = window(model, "dpmpp_2m", LATENT, 0, 3, "enable", "enable")
    state = first["continuation"]
    assert state.step == 3
    np.testing.assert_array_equal(first["samples"], state.x / np.float32(0.18215))


def test_prompt_switch_changes_only_later_steps(model):
    """Conditioning may change between windows; the join stays exact (replayed steps keep window 1's)."""
    first = window(model, "dpmpp_2m", LATENT, 0, 3, "enable", "enable")
    switched = window(model, "dpmpp_2m", first, 3, 10000, "disable", "disable", pos=cond(2.0))
    same = window(model, "dpmpp_2m", first, 3, 10000, "disable", "disable")
    assert np.array_equal(same["samples"], unsplit(model, "dpmpp_2m"))
    assert not np.allclose(switched["samples"], same["samples"])


@pytest.mark.parametrize("change, message", [
    (dict(sampler="euler"), "sampler_name differs"),
    (dict(start=2), "start_at_step differs"),
])
def test_mismatched_state_warns_and_falls_back(model, change, message):
    first = window(model, "dpmpp_2m", LATENT, 0, 3, "enable", "enable")
    sampler = change.get("sampler", "dpmpp_2m")
    start = change.get("start", 3)
    with pytest.warns(UserWarning, match=message):
        got = window(model, sampler, first, start, 10000, "disable", "disable")
    comfy = window(model, sampler, first, start, 10000, "disable", "disable", mode="comfyui")
    assert np.array_equal(got["samples"], comfy["samples"])


def test_bad_mode_is_rejected(model):
    with pytest.raises(ValueError, match=r"continuation: received 'bitexact', expected one of \('comfyui', 'exact'\)"):
        window(model, "euler", LATENT, 0, 3, "enable", "enable", mode="bitexact")


@pytest.mark.parametrize("sampler", sorted(set(SAMPLER_NAMES) - {"dpm_fast", "dpm_adaptive"}))
def test_next_window_model_first_sees_the_step_k_state(analytic_unet_cls, sampler):
    """The window boundary is a real step boundary: window 2's UNet is first called at sigma_k on x_k."""
    k = 3
    first = window(Model(analytic_unet_cls(), "sd15"), sampler, LATENT, 0, k, "enable", "enable")
    state = first["continuation"]
    unet = analytic_unet_cls(record=True)
    second_model = Model(unet, "sd15")
    window(second_model, sampler, first, k, 10000, "disable", "disable")
    call = unet.calls[0]
    ms = second_model.model_sampling
    assert call["timestep"][0] == ms.timestep(state.sigmas[k]), sampler
    if sampler.startswith("uni_pc"):
        return  # UniPC evaluates sigma_k on its predictor and corrects x_k with that value afterwards
    expected_x_in = ms.calculate_input(state.sigmas[k], state.x)
    np.testing.assert_array_equal(call["x"][0], expected_x_in[0])


def test_changed_samples_make_the_state_stale(model):
    first = window(model, "dpmpp_2m", LATENT, 0, 3, "enable", "enable")
    edited = dict(first, samples=first["samples"] * np.float32(0.5))
    with pytest.warns(UserWarning, match="samples changed"):
        got = window(model, "dpmpp_2m", edited, 3, 10000, "disable", "disable")
    comfy = window(model, "dpmpp_2m", edited, 3, 10000, "disable", "disable", mode="comfyui")
    assert np.array_equal(got["samples"], comfy["samples"])
