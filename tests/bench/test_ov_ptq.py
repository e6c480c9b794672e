"""The OpenVINO PTQ measurement's calibration recorder (``ksampler_rt.bench.ov_ptq``): the inputs it records are
the UNet calls of a real sampling (CFG batch 2, ComfyUI's ``normal`` timesteps, hand-computed below),
deterministic, with cond / uncond contexts of the UNet's width. The measurement itself is not run here."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    ov = pytest.importorskip("openvino")
    from ksampler_rt.engines.testing import make_tiny_export

    export = make_tiny_export(tmp_path_factory.mktemp("exp") / "sd15", "sd15")
    return ov.Core().read_model(str(export / "unet.onnx"))


def test_calibration_records_the_sampling_calls(tiny_unet):
    from ksampler_rt.bench.ov_ptq import unet_calibration_inputs

    kw = dict(runs=2, steps=4, latent=8, tokens=5, threads=1)
    samples = unet_calibration_inputs(tiny_unet, "sd15", **kw)
    names = [p.get_any_name() for p in tiny_unet.inputs]
    width = tiny_unet.inputs[2].get_partial_shape()[2].get_length()
    assert len(samples) == 8  # euler: one CFG-batched UNet call per step
    for s in samples:
        assert list(s) == names
        x, t, ctx = (s[n] for n in names)
        assert x.shape == (2, 4, 8, 8) and t.shape == (2,) and ctx.shape == (2, 5, width)
        assert not np.array_equal(ctx[0], ctx[1])  # cond and uncond are different draws
    # ComfyUI normal_scheduler on SD1.5 (sigma_min > 0): timesteps linspace(999, 0, steps), each sent twice
    expected = [999.0, 666.0, 333.0, 0.0] * 2
    assert [float(s[names[1]][0]) for s in samples] == expected
    assert all(s[names[1]][0] == s[names[1]][1] for s in samples)
    assert not np.array_equal(samples[0][names[2]], samples[4][names[2]])  # each run its own contexts
    again = unet_calibration_inputs(tiny_unet, "sd15", **kw)
    assert all(np.array_equal(a[n], b[n]) for a, b in zip(samples, again) for n in names)


def test_calibration_refuses_a_unet_with_extra_inputs(tmp_path):
    ov = pytest.importorskip("openvino")
    from ksampler_rt.bench.ov_ptq import unet_calibration_inputs
    from ksampler_rt.engines.testing import make_tiny_export

    xl = ov.Core().read_model(str(make_tiny_export(tmp_path / "sdxl", "sdxl") / "unet.onnx"))
    with pytest.raises(ValueError, match="int8 calibration: received a UNet with 4 inputs, expected 3"):
        unet_calibration_inputs(xl, "sdxl", runs=1, steps=1, latent=8)
