"""Exact continuation and one-call prompt scheduling on the flow families (SD3, FLUX.1 dev, schnell).

The VP version is tests/runtime/test_continuation.py / test_prompt_schedule.py. Here the model sampling
is CONST (noise scaling sigma*noise + (1-sigma)*latent, output divided by 1 - sigma), the sigma tables are
the shifted flow ones, and CFG hands the network pooled ``y`` and (FLUX.1 dev) ``guidance``: a window
chain joined with ``continuation="exact"`` must still equal the unsplit run bit for bit.
"""
import numpy as np
import pytest
from analytic_unet import AnalyticFlowNet  # tests/runtime/ is on sys.path (pytest's rootdir-less import)

from ksampler_rt.runtime import SAMPLER_NAMES, Model, ksampler, ksampler_advanced
from ksampler_rt.runtime.continuation import ContinuationState

STEPS, SEED = 6, 42
FAMILIES = {"sd3": (1000.0, False), "flux": (1.0, True), "flux-schnell": (1.0, False)}
LATENT = {"samples": np.zeros((1, 16, 8, 8), np.float32)}


def cond(value, guidance=None):
    options = {"pooled_output": np.full((1, 8), value / 2, np.float32)}
    if guidance is not None:
        options["guidance"] = guidance
    return [[np.full((1, 4, 8), value, np.float32), options]]


POS, NEG = cond(0.5, guidance=3.0), cond(-0.5)


def make_model(family, **kwargs):
    divisor, guidance = FAMILIES[family]
    return Model(AnalyticFlowNet(divisor, guidance), family, **kwargs)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return make_model(request.param)


def unsplit(model, sampler, cfg=4.5, scheduler="simple"):
    return ksampler(model, SEED, STEPS, cfg, sampler, scheduler, POS, NEG, LATENT)["samples"]


def window(model, sampler, latent, start, end, leftover, add_noise, pos=POS, mode="exact", cfg=4.5,
           scheduler="simple"):
    return ksampler_advanced(model, add_noise, SEED, STEPS, cfg, sampler, scheduler, pos, NEG, latent, start, end,
                             leftover, continuation=mode)


def chain(model, sampler, cuts, **kwargs):
    bounds = [0, *cuts, 10000]
    latent = LATENT
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        last = i == len(bounds) - 2
        latent = window(model, sampler, latent, a, b, "disable" if last else "enable",
                        "enable" if i == 0 else "disable", **kwargs)
        if not last:
            assert isinstance(latent.get("continuation"), ContinuationState)
    return latent["samples"]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_two_windows_equal_the_unsplit_run_bit_for_bit(model, sampler):
    reference = unsplit(model, sampler)
    assert np.isfinite(reference).all()
    for k in (1, STEPS // 2, STEPS - 1):
        got = chain(model, sampler, [k])
        assert np.array_equal(got, reference), (
            f"{model.family.name} {sampler}: split at {k} differs by {np.abs(got - reference).max()}")


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "er_sde", "sa_solver", "uni_pc"])
@pytest.mark.parametrize("scheduler", ["normal", "beta", "karras"])
def test_three_windows_other_schedulers(model, sampler, scheduler):
    assert np.array_equal(chain(model, sampler, [2, 4], scheduler=scheduler),
                          unsplit(model, sampler, scheduler=scheduler))


def test_cfg_one_continues_exactly(model):
    """cfg 1.0 (the FLUX example graphs) skips the uncond evaluation: the recording must cope."""
    assert np.array_equal(chain(model, "euler", [3], cfg=1.0), unsplit(model, "euler", cfg=1.0))


def test_leftover_noise_window_returns_the_state_scaled_out(model):
    """A flow window that keeps its leftover noise returns latent / (1 - sigma) in LATENT space (ComfyUI's
    inverse noise scaling), which the state's x must reproduce so the next window accepts it."""
    first = window(model, "dpmpp_2m", LATENT, 0, 3, "enable", "enable")
    state = first["continuation"]
    sigma = state.sigmas[3]
    assert 0.0 < sigma < 1.0
    comfy = window(model, "dpmpp_2m", LATENT, 0, 3, "enable", "enable", mode="comfyui")
    np.testing.assert_allclose(first["samples"], comfy["samples"], rtol=1e-6, atol=1e-6)


def test_shift_is_part_of_the_fingerprint():
    first = window(make_model("sd3"), "dpmpp_2m", LATENT, 0, 3, "enable", "enable")
    with pytest.warns(UserWarning, match="shift differs"):
        window(make_model("sd3", shift=6.0), "dpmpp_2m", first, 3, 10000, "disable", "disable")


def test_family_is_part_of_the_fingerprint():
    first = window(make_model("flux"), "euler", LATENT, 0, 3, "enable", "enable")
    with pytest.warns(UserWarning, match="family differs"):
        window(make_model("flux-schnell"), "euler", first, 3, 10000, "disable", "disable")


# -- prompt scheduling in one call ------------------------------------------------------------------
SWITCH = 3


def scheduled(model, sampler):
    a, b = cond(0.5, guidance=3.0)[0], cond(2.0, guidance=5.0)[0]
    positive = [[a[0], {**a[1], "end_step": SWITCH}], [b[0], {**b[1], "start_step": SWITCH}]]
    return ksampler(model, SEED, STEPS, 4.5, sampler, "simple", positive, NEG, LATENT)["samples"]


def switched_windows(model, sampler):
    first = window(model, sampler, LATENT, 0, SWITCH, "enable", "enable", pos=cond(0.5, guidance=3.0))
    return window(model, sampler, first, SWITCH, 10000, "disable", "disable", pos=cond(2.0, guidance=5.0))["samples"]


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "uni_pc",
                                     "res_multistep", "lms"])
def test_prompt_schedule_in_one_call_equals_the_exact_window_chain(model, sampler):
    got = scheduled(model, sampler)
    assert np.array_equal(got, switched_windows(model, sampler))
    assert not np.allclose(got, unsplit(model, sampler), atol=1e-4)  # the switch really happened


def test_flux_guidance_follows_the_scheduled_entry():
    """FLUX.1 dev: each step's network call gets the guidance of the entry active at that step; the negative,
    which has none, gets ComfyUI's default 3.5. (The call that announced the switch step with the old entry is
    made again with the new one.)"""
    model = make_model("flux")
    scheduled(model, "euler")
    rows = [tuple(call["guidance"].tolist()) for call in model.unet.calls]  # CFG batch: uncond row, cond row
    assert rows[:SWITCH] == [(3.5, 3.0)] * SWITCH
    assert rows[-(STEPS - SWITCH):] == [(3.5, 5.0)] * (STEPS - SWITCH)
