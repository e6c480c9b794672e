"""The compiled CFG head (runtime/cfg_jit.py) on the flow families' CONST prediction: the same floats as the
numpy path (ComfyUI's CONST.calculate_denoised is x - out * sigma, the eps formula; no c_in), with the
pooled ``y`` and FLUX.1 dev's ``guidance`` still reaching the network."""
import numpy as np
import pytest
from analytic_unet import AnalyticFlowNet  # tests/runtime/ is on sys.path (pytest's rootdir-less import)

from ksampler_rt.runtime import Model, cfg_jit, ksampler
from ksampler_rt.runtime.cfg import CFGDenoiser

pytestmark = pytest.mark.skipif(not cfg_jit.available(), reason="the compiled CFG head is not available here")

NETS = {"sd3": (1000.0, False), "flux": (1.0, True), "flux-schnell": (1.0, False)}


def cond(value, **extra):
    return [[np.full((1, 5, 8), value, np.float32), {"pooled_output": np.full((1, 8), value, np.float32), **extra}]]


@pytest.mark.parametrize("family", sorted(NETS))
def test_flow_cfg_uses_the_compiled_head(family):
    model = Model(AnalyticFlowNet(*NETS[family]), family)
    assert CFGDenoiser(model, cond(0.5), cond(-0.5), 4.5, 1, (8, 8))._fusable


@pytest.mark.parametrize("family", sorted(NETS))
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "uni_pc",
                                     "res_multistep_cfg_pp", "er_sde"])
def test_compiled_head_equals_the_numpy_path_bit_for_bit(family, sampler, monkeypatch):
    latent = {"samples": np.random.default_rng(3).standard_normal((2, 16, 8, 8)).astype(np.float32)}

    def run():
        net = AnalyticFlowNet(*NETS[family])
        out = ksampler(Model(net, family), 7, 5, 4.5, sampler, "simple", cond(0.5, guidance=2.0), cond(-0.5),
                       latent, 0.8)["samples"]
        return out, net.calls

    fused, calls = run()
    monkeypatch.setattr(cfg_jit, "available", lambda: False)
    plain, plain_calls = run()
    assert np.array_equal(fused, plain)
    assert len(calls) == len(plain_calls)
    for a, b in zip(calls, plain_calls):
        np.testing.assert_array_equal(a["timestep"], b["timestep"])
        np.testing.assert_array_equal(a["y"], b["y"])
        if family == "flux":
            np.testing.assert_array_equal(a["guidance"], b["guidance"])
