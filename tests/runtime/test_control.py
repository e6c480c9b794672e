"""ControlNet in the runtime (runtime/control.py, cfg.py) against REAL ComfyUI 0.3.64 and by hand.

Golden data: tests/runtime/golden/make_comfyui_controlnet_golden.py ran ComfyUI's own ControlNetApply /
ControlNetApplyAdvanced / KSampler and comfy/controlnet.py around the torch twins of
tests/runtime/analytic_control.py. Here the same graphs are built with the workflow's ControlNet nodes and
sampled by the runtime with the numpy twins. Compared:

* the sequence of ControlNet and UNet calls (network, timestep, rows, whether the UNet got residuals):
  exact -- this is the percent window in sigma space, chaining, positive-only application reaching the
  uncond rows, and which entries are batched together;
* the residuals the UNet received at its first controlled call and the final latents: rel L2 <= 1e-5
  (torch's SLEEF tanh / reduction order vs numpy's: measured worst ~1e-6);
* the resized hint: exact for one-image hints (nearest-exact picks pixels), per-row sums for batches.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ksampler_rt.runtime import Model, ksampler
from ksampler_rt.runtime.control import (ControlNet, ControlOutputError, broadcast_image_to, controls_for_uncond,
                                         merge)
from ksampler_rt.runtime.model import UNetOutputError
from ksampler_rt.workflow.controlnet_nodes import controlnet_apply, controlnet_apply_advanced, resize_hint

GOLDEN = Path(__file__).parent / "golden"
META = json.loads((GOLDEN / "controlnet.json").read_text())
DATA = np.load(GOLDEN / "controlnet.npz")
CASES = META["cases"]
REL_L2 = 1e-5


from tests.runtime import analytic_control as AC  # noqa: E402


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _conditioning(case, names):
    out = []
    for n in names:
        options = {"pooled_output": DATA["pooled/" + n]} if case["family"] == "sdxl" else {}
        out.append([DATA["cond/" + n], options])
    return out


def run_case(case):
    """The golden case through the workflow nodes and the runtime; returns (latent, log, unet, nets)."""
    log: list = []
    nets = {name: AC.AnalyticControlNet(name, family=case["family"], log=log) for name in AC.CONTROLNETS}
    nets.update({name: AC.AnalyticAdapter(name, family=case["family"], log=log) for name in AC.ADAPTERS})
    unet = AC.AnalyticControlledUNet(log)
    pos, neg = _conditioning(case, case["positive"]), _conditioning(case, case["negative"])
    for op in case["ops"]:
        image = DATA["image/" + op["image"]]
        if op["node"] == "ControlNetApply":
            (pos,) = controlnet_apply(None, "1", pos, nets[op["cn"]], image, op["strength"])
        else:
            pos, neg = controlnet_apply_advanced(None, "1", pos, neg, nets[op["cn"]], image, op["strength"],
                                                 op["start_percent"], op["end_percent"])
    model = Model(unet, family=case["family"])
    latent = {"samples": DATA["latent/" + case["latent"]].copy()}
    out = ksampler(model, case["seed"], case["steps"], case["cfg"], case["sampler"], case["scheduler"], pos, neg,
                   latent, 1.0)
    return out["samples"], log, unet, nets


@pytest.fixture(scope="module")
def runs():
    return {case["id"]: run_case(case) for case in CASES}


def _want_calls(case):
    return [("cn", e["name"], e["t"], e["rows"]) if e["net"] == "cn" else ("unet", e["t"], e["rows"], e["control"])
            for e in case["calls"] if e["net"] != "adapter"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_calls_match_comfyui(case, runs):
    """Which steps each ControlNet ran at (its window in sigma space), chaining order, batching.

    T2I-Adapter features depend on the hint only: ComfyUI computes them once (again at every call when the
    hint was rounded up to the unshuffle size, which changes nothing); the runtime once per row count."""
    _, log, _, _ = runs[case["id"]]
    assert [e for e in log if e[0] != "adapter"] == _want_calls(case)
    adapter_rows = [e[2] for e in log if e[0] == "adapter"]
    assert sorted(adapter_rows) == sorted({e["rows"] for e in case["calls"] if e["net"] == "adapter"})


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_latents_match_comfyui(case, runs):
    got = runs[case["id"]][0]
    want = DATA["out/" + case["id"]]
    assert got.shape == want.shape
    assert rel_l2(got, want) <= REL_L2


CONTROLLED = [c for c in CASES if any(e["net"] == "unet" and e["control"] for e in c["calls"])]


@pytest.mark.parametrize("case", CONTROLLED, ids=[c["id"] for c in CONTROLLED])
def test_residuals_match_comfyui(case, runs):
    """Summed, strength-scaled residuals at the first controlled UNet call (two chained ControlNets with
    different strengths in the chain/ cases)."""
    got = runs[case["id"]][2].controls[0]
    prefix = f"control/{case['id']}/"
    want_keys = sorted(k[len(prefix):] for k in DATA.files if k.startswith(prefix))
    got_keys = [f"down{i}" for i in range(len(got.get("down", [])))] + (["mid"] if "mid" in got else [])
    got_keys += [f"adapter{i}" for i, a in enumerate(got.get("adapter", [])) if a is not None]
    assert sorted(got_keys) == want_keys
    for key in want_keys:
        kind, index = key.rstrip("0123456789"), key[len(key.rstrip("0123456789")):]
        array = got[kind] if kind == "mid" else got[kind][int(index)]
        assert rel_l2(array, DATA[prefix + key]) <= REL_L2, key


HINT_KEYS = [k for k in DATA.files if k.startswith("hint/")]


@pytest.mark.parametrize("key", HINT_KEYS)
def test_hint_resize_matches_comfyui(key, runs):
    _, cid, name = key.rsplit("/", 2)[0], key.split("/", 1)[1].rsplit("/", 1)[0], key.rsplit("/", 1)[1]
    got = runs[cid][3][name].hints[0]
    want = DATA[key]
    if want.ndim == 4:
        np.testing.assert_array_equal(got, want)
    else:  # a batched hint: per-row sums say which image row each call row got
        np.testing.assert_allclose(got.sum(axis=(1, 2, 3), dtype=np.float64), want, rtol=1e-6)


def test_golden_covers_the_contract():
    ids = {c["id"] for c in CASES}
    assert {"chain/euler", "apply_positive_only/euler", "resize_odd/euler", "sdxl/euler"} <= ids
    window = next(c for c in CASES if c["id"] == "window/euler")
    controlled = [e["control"] for e in window["calls"] if e["net"] == "unet"]
    assert controlled != [True] * len(controlled) and any(controlled)  # the window skips some steps


# -- by hand ------------------------------------------------------------------------------------------
class ConstNet:
    """Residuals that are constants: down = [v, 2v] at the latent size, mid = 3v."""

    kind = "controlnet"

    def __init__(self, value, family="sd15"):
        self.value, self.family, self.calls = np.float32(value), family, []

    def __call__(self, x, timestep, context, hint, y=None):
        self.calls.append((float(np.asarray(timestep).reshape(-1)[0]), x.shape[0], hint.shape))
        full = np.full(x.shape, self.value, np.float32)
        return {"down": [full, 2 * full], "mid": 3 * full[:, :, :1, :1]}


class RecordingUNet:
    def __init__(self):
        self.kwargs = []

    def __call__(self, x, timestep, context, **kwargs):
        self.kwargs.append(kwargs)
        return np.zeros_like(x)


HINT = np.linspace(0, 1, 3 * 16 * 16, dtype=np.float32).reshape(1, 3, 16, 16)
CTX = np.ones((1, 4, 8), np.float32)


def _sample(unet, pos, neg=None, cfg=8.0, steps=4, family="sd15"):
    neg = [[CTX * 0, {}]] if neg is None else neg
    latent = {"samples": np.zeros((1, 4, 2, 2), np.float32)}
    return ksampler(Model(unet, family=family), 1, steps, cfg, "euler", "normal", pos, neg, latent, 1.0)


def test_chain_sums_strength_scaled_residuals_previous_first():
    a, b = ConstNet(1.0), ConstNet(10.0)
    first = ControlNet(a, HINT, strength=0.5)
    second = ControlNet(b, HINT, strength=0.25, previous=first)
    unet = RecordingUNet()
    _sample(unet, [[CTX, {"control": second}]], steps=1)
    # the negative has no control: cond and uncond cannot share a call (can_concat_cond), cond goes first
    assert len(unet.kwargs) == 2 and unet.kwargs[1] == {}
    control = unet.kwargs[0]["control"]
    want = np.float32(0.5) * 1 + np.float32(0.25) * 10  # 3.0
    np.testing.assert_array_equal(control["down"][0], np.full((1, 4, 2, 2), want, np.float32))
    np.testing.assert_array_equal(control["down"][1], np.full((1, 4, 2, 2), 2 * want, np.float32))
    np.testing.assert_array_equal(control["mid"], np.full((1, 4, 1, 1), 3 * want, np.float32))
    assert [c[1] for c in a.calls] == [1] and [c[1] for c in b.calls] == [1]


def test_same_control_on_cond_and_uncond_shares_one_call():
    net = ConstNet(1.0)
    control = ControlNet(net, HINT)
    unet = RecordingUNet()
    _sample(unet, [[CTX, {"control": control}]], [[CTX * 0, {"control": control}]], steps=1)
    assert len(unet.kwargs) == 1 and net.calls[0][1] == 2


def test_window_runs_controlnet_on_the_steps_inside_only_and_unet_gets_no_kwarg_outside():
    net = ConstNet(1.0)
    unet = RecordingUNet()
    steps = 10
    control = ControlNet(net, HINT, 1.0, 0.25, 0.55)
    _sample(unet, [[CTX, {"control": control}]], [[CTX * 0, {"control": control}]], steps=steps)
    got = ["control" in k for k in unet.kwargs]
    # by hand: percent p is the sigma of (continuous) timestep (1 - p) * 999, and the normal schedule's
    # steps sit at timesteps linspace(999, 0, steps) (its last sigma is ~0, so it takes `steps` points
    # and appends no zero); sigma grows with t, so the window is 449.55 <= t <= 749.25
    timesteps = [999 * (1 - i / (steps - 1)) for i in range(steps)]
    want = [(1 - 0.55) * 999 <= t <= (1 - 0.25) * 999 for t in timesteps]
    assert want == [False] * 3 + [True] * 2 + [False] * 5
    assert got == want and any(got) and not all(got)
    assert all(k == {} for k, on in zip(unet.kwargs, got) if not on)


def test_without_controlnet_the_unet_is_called_as_before():
    unet = RecordingUNet()
    _sample(unet, [[CTX, {}]], steps=2)
    assert unet.kwargs == [{}, {}]


def test_family_mismatch_refused_at_sampling():
    control = ControlNet(ConstNet(1.0, family="sdxl"), HINT)
    with pytest.raises(ValueError, match="received a ControlNet for family 'sdxl', expected one for the model's "
                                         "family 'sd15'"):
        _sample(RecordingUNet(), [[CTX, {"control": control}]])


def test_sd2_controlnet_fits_sd2_v():
    unet = RecordingUNet()
    _sample(unet, [[np.ones((1, 4, 8), np.float32), {"control": ControlNet(ConstNet(1.0, "sd2"), HINT)}]],
            steps=1, family="sd2-v")
    assert "control" in unet.kwargs[0]


def test_bad_controlnet_output_names_the_step():
    def bad(x, timestep, context, hint, y=None):
        return {"down": [np.zeros((1,) + x.shape[1:], np.float32)], "mid": np.zeros_like(x)}
    control = ControlNet(bad, HINT)
    with pytest.raises(UNetOutputError, match=r"step 1 of 4 .*down\[0\] of shape \(1, 4, 2, 2\), expected \[2,"):
        _sample(RecordingUNet(), [[CTX, {"control": control}]], [[CTX * 0, {"control": control}]])
    assert issubclass(ControlOutputError, UNetOutputError)


def test_hint_of_wrong_size_without_resize_is_refused():
    control = ControlNet(ConstNet(1.0), np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"hint: received 5x5 pixels, expected 16x16"):
        _sample(RecordingUNet(), [[CTX, {"control": control}]])


def test_hint_resized_with_the_injected_resize():
    control = ControlNet(ConstNet(1.0), np.zeros((1, 3, 37, 21), np.float32), resize=resize_hint)
    net = control.network
    _sample(RecordingUNet(), [[CTX, {"control": control}]], steps=1)
    assert net.calls[0][2] == (1, 3, 16, 16)


@pytest.mark.parametrize("bad, match", [
    ({"strength": -1.0}, "strength: received -1.0, expected a finite number >= 0"),
    ({"start_percent": 1.5}, r"start_percent: received 1.5, expected a finite number in \[0.0, 1.0\]"),
    ({"hint": np.zeros((3, 4, 4))}, r"hint: received an array of shape \(3, 4, 4\)"),
])
def test_bad_arguments_name_the_parameter(bad, match):
    kwargs = {"hint": HINT, **bad}
    with pytest.raises(ValueError, match=match):
        ControlNet(ConstNet(1.0), **kwargs)


def test_controls_for_uncond_as_comfyui():
    a, b = ControlNet(ConstNet(1.0), HINT), ControlNet(ConstNet(2.0), HINT)
    pos = [[CTX, {"control": a, "control_apply_to_uncond": True}],
           [CTX, {"control": b, "control_apply_to_uncond": True}]]
    neg = [[CTX, {}]]
    got = controls_for_uncond(pos, neg)
    assert got[0][1]["control"] is b and "control" not in neg[0][1]  # one entry: the last control wins
    assert controls_for_uncond(pos, [[CTX, {"control": a}]])[0][1]["control"] is a  # negative had one: kept
    advanced = [[CTX, {"control": a, "control_apply_to_uncond": False}]]
    assert controls_for_uncond(advanced, neg) is neg


def test_broadcast_image_to_as_comfyui():
    hint = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    assert broadcast_image_to(hint[:1], 4, 2).shape[0] == 1  # one image: left to broadcasting
    # latent batch 2, 2 row groups: first 2 images, repeated per group
    np.testing.assert_array_equal(broadcast_image_to(hint, 4, 2).ravel(), [0, 1, 0, 1])
    # latent batch 5 with 3 images: 0 1 2 0 1 (ComfyUI's partial repeat)
    np.testing.assert_array_equal(broadcast_image_to(hint, 5, 1).ravel(), [0, 1, 2, 0, 1])


def test_merge_appends_extra_outputs():
    one = np.ones((1, 1, 1, 1), np.float32)
    got = merge({"down": [one.copy()], "mid": one.copy()}, {"down": [2 * one, 5 * one], "mid": 3 * one})
    assert [float(a.ravel()[0]) for a in got["down"]] == [3.0, 5.0] and float(got["mid"].ravel()[0]) == 4.0


class ReusingNet:
    """Writes every result into the same buffers (as an engine's output bindings may)."""

    kind = "controlnet"
    family = "sd15"

    def __init__(self):
        self.buf = None

    def __call__(self, x, timestep, context, hint, y=None):
        if self.buf is None:
            self.buf = np.empty(x.shape, np.float32)
        self.buf[...] = hint.mean()
        return {"down": [self.buf], "mid": self.buf}


def test_a_network_reusing_its_buffers_in_one_chain_is_summed_right():
    net = ReusingNet()
    first = ControlNet(net, np.full_like(HINT, 0.25))
    second = ControlNet(net, np.full_like(HINT, 0.5), previous=first)
    unet = RecordingUNet()
    _sample(unet, [[CTX, {"control": second}]], [[CTX * 0, {"control": second}]], steps=1)
    np.testing.assert_array_equal(unet.kwargs[0]["control"]["down"][0], np.full((2, 4, 2, 2), 0.75, np.float32))
