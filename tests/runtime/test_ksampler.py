"""KSampler / KSamplerAdvanced semantics and bad input (the parity test covers values vs ComfyUI)."""
import math

import numpy as np
import pytest

from ksampler_rt.runtime import Model, ksampler, ksampler_advanced
from ksampler_rt.runtime.model import UNetOutputError

POS = [[np.full((1, 4, 8), 0.5, np.float32), {}]]
NEG = [[np.full((1, 4, 8), -0.5, np.float32), {}]]
LATENT = {"samples": np.zeros((1, 4, 8, 8), np.float32)}


@pytest.fixture(scope="module")
def model(analytic_unet_cls):
    return Model(analytic_unet_cls(), "sd15")


def test_split_euler_equals_unsplit_within_float32_roundoff(model):
    """ComfyUI semantics: 0..k with leftover noise then k..N without noise = one run, up to the
    process_out/process_in round trip between the nodes."""
    full = ksampler(model, 42, 20, 8.0, "euler", "normal", POS, NEG, LATENT)["samples"]
    for k in (1, 10, 19):
        first = ksampler_advanced(model, "enable", 42, 20, 8.0, "euler", "normal", POS, NEG, LATENT, 0, k, "enable")
        second = ksampler_advanced(model, "disable", 42, 20, 8.0, "euler", "normal", POS, NEG, first, k, 20, "disable")
        np.testing.assert_allclose(second["samples"], full, rtol=1e-5, atol=1e-4 * np.abs(full).max())


def test_result_keeps_other_latent_keys_and_is_a_new_dict(model):
    latent = {"samples": np.zeros((2, 4, 8, 8), np.float32), "batch_index": [3, 5], "note": "kept"}
    out = ksampler(model, 1, 2, 5.0, "euler", "normal", POS, NEG, latent)
    assert out is not latent and out["batch_index"] == [3, 5] and out["note"] == "kept"
    assert out["samples"].dtype == np.float32 and out["samples"].shape == (2, 4, 8, 8)


def test_denoise_zero_and_empty_windows_return_the_input(model):
    latent = {"samples": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert np.array_equal(ksampler(model, 1, 10, 5.0, "euler", "normal", POS, NEG, latent, denoise=0.0)["samples"],
                          latent["samples"])
    for start, end in ((5, 5), (7, 3), (12, 10000)):
        out = ksampler_advanced(model, "enable", 1, 10, 5.0, "euler", "normal", POS, NEG, latent, start, end, "disable")
        assert np.array_equal(out["samples"], latent["samples"]), (start, end)


def test_add_noise_disabled_on_an_empty_latent_stays_near_zero_scale(model):
    """The seed's "nothing will be generated": no noise is added, the sampler only drifts with the model."""
    out = ksampler_advanced(model, "disable", 42, 20, 8.0, "euler", "normal", POS, NEG, LATENT, 0, 10000, "disable")
    noisy = ksampler_advanced(model, "enable", 42, 20, 8.0, "euler", "normal", POS, NEG, LATENT, 0, 10000, "disable")
    assert np.abs(out["samples"]).std() < np.abs(noisy["samples"]).std()


def test_callback_reports_every_step(model):
    seen = []
    ksampler(model, 1, 5, 5.0, "heun", "karras", POS, NEG, LATENT, callback=lambda i, n, x, d: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), r"steps: received 0, expected an integer in \[1, 10000\]"),
    (dict(steps=2.5), r"steps: received 2.5"),
    (dict(cfg=-1.0), r"cfg: received -1.0, expected a number in \[0, 100.0\]"),
    (dict(cfg=math.nan), r"cfg: received nan"),
    (dict(denoise=1.5), r"denoise"),
    (dict(seed=-1), r"seed: received -1"),
    (dict(seed=2 ** 64), r"seed: received 18446744073709551616"),
    (dict(sampler_name="euler_max"), r"sampler_name: received 'euler_max', expected one of: euler, "),
    (dict(scheduler="cosine"), r"scheduler: received 'cosine', expected one of"),
    (dict(latent_image={"samples": np.zeros((4, 8, 8), np.float32)}), r"latent_image\['samples'\]: received .* shape \(4, 8, 8\), expected a 4-D float"),
    (dict(latent_image={"samples": np.zeros((1, 4, 8, 8), np.int32)}), r"expected a 4-D float"),
    (dict(latent_image=np.zeros((1, 4, 8, 8))), r"latent_image: received ndarray, expected a LATENT dict"),
    (dict(positive=[[np.zeros((4, 8), np.float32), {}]]), r"positive\[0\]: received a context of shape \(4, 8\), expected \[1, T, D\]"),
    (dict(negative=[[np.zeros((1, 4, 16), np.float32), {}]]), r"negative\[0\]: received context width D=16, expected D=8"),
    (dict(positive=[]), r"positive: received list, expected a non-empty CONDITIONING list"),
])
def test_bad_input_names_parameter_value_and_what_is_accepted(model, kwargs, message):
    args = dict(seed=1, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", positive=POS, negative=NEG,
                latent_image=LATENT, denoise=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ksampler(model, **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_at_step=-1), r"start_at_step: received -1"),
    (dict(end_at_step=-3), r"end_at_step: received -3"),
    (dict(add_noise="yes"), r"add_noise: received 'yes', expected one of \('enable', 'disable'\)"),
    (dict(return_with_leftover_noise="maybe"), r"return_with_leftover_noise: received 'maybe'"),
])
def test_bad_advanced_input(model, kwargs, message):
    args = dict(add_noise="enable", noise_seed=1, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal",
                positive=POS, negative=NEG, latent_image=LATENT, start_at_step=0, end_at_step=4,
                return_with_leftover_noise="disable")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ksampler_advanced(model, **args)


def test_booleans_are_accepted_for_enable_disable(model):
    a = ksampler_advanced(model, True, 3, 4, 5.0, "euler", "normal", POS, NEG, LATENT, 0, 2, True)
    b = ksampler_advanced(model, "enable", 3, 4, 5.0, "euler", "normal", POS, NEG, LATENT, 0, 2, "enable")
    assert np.array_equal(a["samples"], b["samples"])


def test_a_unet_returning_nan_names_the_step_and_sigma():
    calls = []

    def unet(x, t, c, **kw):
        calls.append(t[0])
        out = np.zeros_like(x)
        if len(calls) == 3:
            out[0, 0, 0, 0] = np.nan
        return out

    with pytest.raises(UNetOutputError, match=r"step 3 of 4 \(sigma=[0-9.]+\): the UNet returned 1 non-finite"):
        ksampler(Model(unet, "sd15"), 1, 4, 5.0, "euler", "normal", POS, NEG, LATENT)


def test_model_rejects_unknown_family_and_non_callable():
    with pytest.raises(ValueError, match=r"family: received 'sd4', expected one of \("):
        Model(lambda *a: None, "sd4")
    with pytest.raises(TypeError, match="unet: received int"):
        Model(3, "sd15")
