"""CFG batching against ComfyUI's documented behaviour (comfy/samplers.py, 0.3.64)."""
import numpy as np
import pytest

from ksampler_rt.runtime.cfg import CFGDenoiser, repeat_to_batch_size
from ksampler_rt.runtime.model import Model, UNetOutputError


class RecordingUNet:
    """eps = mean of the context per row (so each row's conditioning is visible in the output)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timestep, context, **kwargs):
        self.calls.append((x.copy(), timestep.copy(), context.copy(), kwargs))
        return np.broadcast_to(context.mean(axis=(1, 2))[:, None, None, None], x.shape).astype(np.float32)


def cond(value, tokens=4, width=8):
    return [np.full((1, tokens, width), value, dtype=np.float32), {}]


def denoised_eps(model, x, sigma, eps):
    return x - np.float32(eps) * np.float32(sigma)


def test_one_call_uncond_rows_first_and_cfg_formula():
    unet = RecordingUNet()
    model = Model(unet, "sd15")
    x = np.ones((2, 4, 2, 2), np.float32)
    d = CFGDenoiser(model, [cond(1.0)], [cond(-1.0)], 7.5, 2, (2, 2))
    out = d(x, np.float32(2.0))
    assert len(unet.calls) == 1
    ctx = unet.calls[0][2]
    assert ctx.shape == (4, 4, 8)
    np.testing.assert_array_equal(ctx[:2], -1.0)  # uncond rows first (cond_or_uncond = [1, 0])
    np.testing.assert_array_equal(ctx[2:], 1.0)
    uncond, condd = x - np.float32(-1.0) * 2, x - np.float32(1.0) * 2
    np.testing.assert_array_equal(out, uncond + (condd - uncond) * np.float32(7.5))


def test_cfg_one_skips_uncond_unless_cfg_pp():
    unet = RecordingUNet()
    model = Model(unet, "sd15")
    x = np.zeros((1, 4, 2, 2), np.float32)
    out = CFGDenoiser(model, [cond(1.0)], [cond(-1.0)], 1.0, 1, (2, 2))(x, np.float32(1.0))
    assert unet.calls[-1][2].shape[0] == 1
    np.testing.assert_array_equal(out, x - 1.0)
    denoised, uncond = CFGDenoiser(model, [cond(1.0)], [cond(-1.0)], 1.0, 1, (2, 2), cfg_pp=True).with_uncond(x, np.float32(1.0))
    assert unet.calls[-1][2].shape[0] == 2
    np.testing.assert_array_equal(uncond, x + 1.0)


def test_several_entries_are_averaged_and_token_lengths_repeated_to_lcm():
    unet = RecordingUNet()
    model = Model(unet, "sd15")
    x = np.zeros((1, 4, 2, 2), np.float32)
    positive = [cond(1.0, tokens=77), cond(3.0, tokens=154)]
    out = CFGDenoiser(model, positive, [cond(0.0, tokens=77)], 2.0, 1, (2, 2))(x, np.float32(1.0))
    (call,) = unet.calls
    ctx = call[2]
    assert ctx.shape == (3, 154, 8)
    # batch order is the reverse of the queue [P1, P2, N]: N, P2, P1
    np.testing.assert_array_equal(ctx[:, 0, 0], [0.0, 3.0, 1.0])
    cond_mean = ((x - 3.0) + (x - 1.0)) / np.float32(2)
    np.testing.assert_array_equal(out, x + (cond_mean - x) * np.float32(2.0))


def test_contexts_too_different_run_as_separate_calls():
    unet = RecordingUNet()
    model = Model(unet, "sd15")
    x = np.zeros((1, 4, 2, 2), np.float32)
    CFGDenoiser(model, [cond(1.0, tokens=77 * 5)], [cond(0.0, tokens=77)], 2.0, 1, (2, 2))(x, np.float32(1.0))
    assert [c[2].shape[1] for c in unet.calls] == [385, 77]


def test_timestep_is_nearest_index_and_input_scaled_by_c_in():
    unet = RecordingUNet()
    model = Model(unet, "sd15")
    x = np.full((1, 4, 2, 2), 3.0, np.float32)
    sigma = np.float32(model.model_sampling.sigmas[500] * 1.001)
    CFGDenoiser(model, [cond(1.0)], [cond(0.0)], 1.0, 1, (2, 2))(x, sigma)
    x_in, t = unet.calls[0][0], unet.calls[0][1]
    assert t.dtype == np.float32 and t.tolist() == [500.0]
    np.testing.assert_allclose(x_in, 3.0 / np.sqrt(sigma ** 2 + 1), rtol=1e-6)


def test_bad_unet_output_names_step_and_sigma():
    model = Model(lambda x, t, c, **k: np.full(x.shape, np.nan, np.float32), "sd15")
    sigmas = np.array([14.6, 7.0, 0.0], np.float32)
    d = CFGDenoiser(model, [cond(1.0)], [cond(0.0)], 5.0, 1, (2, 2), sigmas=sigmas)
    with pytest.raises(UNetOutputError, match=r"step 2 of 2 \(sigma=7\).*non-finite"):
        d(np.zeros((1, 4, 2, 2), np.float32), sigmas[1])
    wrong = Model(lambda x, t, c, **k: np.zeros((1, 3, 2, 2), np.float32), "sd15")
    with pytest.raises(UNetOutputError, match=r"shape \(1, 3, 2, 2\), expected \(2, 4, 2, 2\)"):
        CFGDenoiser(wrong, [cond(1.0)], [cond(0.0)], 5.0, 1, (2, 2))(np.zeros((1, 4, 2, 2), np.float32), sigmas[0])


def test_repeat_to_batch_size_matches_comfyui():
    a = np.arange(2)[:, None]
    assert repeat_to_batch_size(a, 5)[:, 0].tolist() == [0, 1, 0, 1, 0]
    assert repeat_to_batch_size(a, 1)[:, 0].tolist() == [0]
