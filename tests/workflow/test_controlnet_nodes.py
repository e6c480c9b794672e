"""ControlNet and image nodes (workflow/controlnet_nodes.py) against ComfyUI 0.3.64.

The image nodes are compared with outputs of ComfyUI's own ImageScale / ImageScaleBy / ImageInvert stored by
tests/runtime/golden/make_comfyui_controlnet_golden.py; the ControlNet nodes' sampling behaviour is checked
against ComfyUI in tests/runtime/test_control.py (which builds its graphs with these nodes). Here: the node
table, loaders, the application structure (which entries share an application) and a whole prompt graph.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ksampler_rt.runtime import Model
from ksampler_rt.runtime.control import ControlNet
from ksampler_rt.workflow.controlnet_nodes import (controlnet_apply, controlnet_apply_advanced, diff_controlnet_loader,
                                                   image_invert, image_scale, image_scale_by)
from ksampler_rt.workflow.executor import ExecutionContext, execute
from ksampler_rt.workflow.graph import validate
from ksampler_rt.workflow.nodes import build_node_specs

GOLDEN = Path(__file__).resolve().parents[1] / "runtime" / "golden"
META = json.loads((GOLDEN / "controlnet.json").read_text())
DATA = np.load(GOLDEN / "controlnet.npz")


from tests.runtime import analytic_control as AC  # noqa: E402


# -- image nodes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", META["image_cases"], ids=[c["id"] for c in META["image_cases"]])
def test_image_nodes_match_comfyui(case):
    args = case["args"]
    image = DATA["image/" + args[0]]
    if case["node"] == "ImageScale":
        (got,) = image_scale(None, "1", image, *args[1:])
    elif case["node"] == "ImageScaleBy":
        (got,) = image_scale_by(None, "1", image, *args[1:])
    else:
        (got,) = image_invert(None, "1", image)
    want = DATA["image_out/" + case["id"]]
    assert got.shape == want.shape and got.dtype == np.float32
    method = args[1] if len(args) > 1 else None
    if method in ("nearest-exact", "lanczos") or case["node"] == "ImageInvert":
        # picked pixels / PIL's 8-bit result: the same values
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    else:  # interpolation weights: latent_ops rounds them from float64, torch computes in float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # measured: worst 4e-6 (bicubic)


def test_image_scale_zero_size_returns_the_input():
    image = DATA["image/odd"]
    assert image_scale(None, "1", image, "bilinear", 0, 0, "disabled")[0] is image


# -- node table ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def specs():
    return build_node_specs(lambda: ["ckpt"], lambda: ["hint.png"], controlnet_names=lambda: ["cn-a", "cn-b"])


def test_nodes_are_registered_as_comfyui_lists_them(specs):
    info = {name: specs[name].object_info() for name in
            ("ControlNetLoader", "DiffControlNetLoader", "ControlNetApply", "ControlNetApplyAdvanced",
             "ImageScale", "ImageScaleBy", "ImageInvert")}
    assert all(specs[name].unsupported is None for name in info)
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"] == [["cn-a", "cn-b"], {}]
    assert info["ControlNetLoader"]["display_name"] == "Load ControlNet Model"
    assert info["DiffControlNetLoader"]["input_order"]["required"] == ["model", "control_net_name"]
    adv = info["ControlNetApplyAdvanced"]
    assert adv["input_order"] == {"required": ["positive", "negative", "control_net", "image", "strength",
                                               "start_percent", "end_percent"], "optional": ["vae"]}
    assert adv["input"]["required"]["strength"] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}]
    assert adv["input"]["required"]["end_percent"] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0,
                                                                 "step": 0.001}]
    assert adv["output"] == ["CONDITIONING", "CONDITIONING"] and adv["output_name"] == ["positive", "negative"]
    assert info["ControlNetApply"]["deprecated"] is True
    assert info["ControlNetApply"]["display_name"] == "Apply ControlNet (OLD)"
    assert info["ImageScale"]["input"]["required"]["upscale_method"][0] == ["nearest-exact", "bilinear", "area",
                                                                           "bicubic", "lanczos"]
    assert info["ImageScaleBy"]["input"]["required"]["scale_by"] == ["FLOAT", {"default": 1.0, "min": 0.01,
                                                                              "max": 8.0, "step": 0.01}]


def test_controlnet_choices_default_to_none_without_a_lister():
    specs = build_node_specs(lambda: [], lambda: [])
    assert specs["ControlNetLoader"].inputs["control_net_name"].combo_values() == []


# -- loaders and application structure -------------------------------------------------------------------
HINT_IMAGE = np.full((1, 16, 16, 3), 0.5, np.float32)
CTX = np.ones((1, 4, 8), np.float32)


def test_loader_without_a_runner_loader_names_the_parameter(specs):
    with pytest.raises(ValueError, match="control_net_name: received 'cn-a', but this runner has no ControlNet"):
        specs["ControlNetLoader"].run(SimpleNamespace(), "1", control_net_name="cn-a")


def test_loader_returns_the_runner_network(specs):
    net = AC.AnalyticControlNet("A")
    ctx = SimpleNamespace(load_controlnet=lambda name: net if name == "cn-a" else None)
    assert specs["ControlNetLoader"].run(ctx, "1", control_net_name="cn-a") == (net,)


def test_diff_loader_refuses_another_family():
    ctx = SimpleNamespace(load_controlnet=lambda name: AC.AnalyticControlNet("A", family="sdxl"))
    model = Model(AC.AnalyticControlledUNet(), family="sd15")
    with pytest.raises(ValueError, match="received a ControlNet for family 'sdxl', expected one for the model's "
                                         "family 'sd15'"):
        diff_controlnet_loader(ctx, "1", model, "cn-a")


def test_advanced_shares_one_application_per_previous_control():
    net = AC.AnalyticControlNet("A")
    pos, neg = [[CTX, {}], [CTX, {}]], [[CTX, {}]]
    pos1, neg1 = controlnet_apply_advanced(None, "1", pos, neg, net, HINT_IMAGE, 0.5, 0.1, 0.9)
    controls = {id(o["control"]) for _, o in pos1 + neg1}
    assert len(controls) == 1  # all had no previous control: one application, cond and uncond batchable
    c = pos1[0][1]["control"]
    assert isinstance(c, ControlNet)
    assert (c.strength, c.start_percent, c.end_percent, c.previous) == (0.5, 0.1, 0.9, None)
    assert c.hint.shape == (1, 3, 16, 16) and pos[0][1] == {}  # inputs untouched
    (pos2,) = controlnet_apply(None, "1", pos1, net, HINT_IMAGE, 0.7)
    assert pos2[0][1]["control"] is not pos2[1][1]["control"]  # ControlNetApply: one copy per entry
    assert all(o["control"].previous is c and o["control_apply_to_uncond"] is True for _, o in pos2)
    pos3, neg3 = controlnet_apply_advanced(None, "1", pos2, neg1, net, HINT_IMAGE, 1.0, 0.0, 1.0)
    assert pos3[0][1]["control"] is not neg3[0][1]["control"]  # different previous controls
    assert neg3[0][1]["control"].previous is c


def test_strength_zero_returns_the_inputs():
    net = AC.AnalyticControlNet("A")
    pos, neg = [[CTX, {}]], [[CTX, {}]]
    assert controlnet_apply(None, "1", pos, net, HINT_IMAGE, 0.0) == (pos,)
    out = controlnet_apply_advanced(None, "1", pos, neg, net, HINT_IMAGE, 0.0, 0.0, 1.0)
    assert out[0] is pos and out[1] is neg


# -- a whole prompt ---------------------------------------------------------------------------------------
class FakeClip:
    def encode(self, text):
        return [[np.full((1, 4, 8), len(text) / 10, np.float32), {}]]


class FakeVae:
    def decode(self, latent):
        return np.clip(np.repeat(np.repeat(np.moveaxis(latent[:, :3], 1, -1), 8, 1), 8, 2) * 0.1 + 0.5, 0, 1)


def test_controlnet_prompt_runs_and_the_unet_gets_residuals(specs, tmp_path):
    Image.fromarray(np.full((40, 24, 3), 200, np.uint8)).save(tmp_path / "hint.png")
    log: list = []
    unet = AC.AnalyticControlledUNet(log)
    checkpoint = SimpleNamespace(model=Model(unet, family="sd15"), clip=FakeClip(), vae=FakeVae())
    nets = {"cn-a": AC.AnalyticControlNet("A", log=log)}
    ctx = ExecutionContext(load_checkpoint=lambda name: checkpoint, output_dir=tmp_path, input_dir=tmp_path,
                           temp_dir=tmp_path)
    ctx.load_controlnet = nets.__getitem__
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "ckpt"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "cn-a"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "6": {"class_type": "ImageInvert", "inputs": {"image": ["5", 0]}},
        "7": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["4", 0], "image": ["6", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 0.5}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["7", 0], "negative": ["7", 1], "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }
    result = execute(validate(prompt, specs), specs, ctx)
    assert result.ui["11"]["images"]
    unet_calls = [e for e in log if e[0] == "unet"]
    assert [e[2] for e in unet_calls] == [2] * 4  # cond and uncond share the application: one call a step
    assert [e[3] for e in unet_calls] == [True, True, False, False]  # end_percent 0.5 of a 4-step schedule
    hint = nets["cn-a"].hints[0]
    # the inverted 8-bit image (1 - 200/255), resized to the latent's 64x48 pixels
    assert hint.shape == (1, 3, 48, 64)
    np.testing.assert_allclose(hint, 1 - np.float32(200 / 255), rtol=0, atol=1e-6)


def test_ui_format_widgets_map_to_comfyuis_input_names(specs):
    """The frontend saves ControlNetApplyAdvanced as widgets [strength, start, end] and the optional vae as an
    unlinked input; ImageScale as [method, width, height, crop]."""
    from ksampler_rt.workflow.graph import ui_to_api

    workflow = {
        "nodes": [
            {"id": 1, "type": "LoadImage", "inputs": [], "widgets_values": ["hint.png", "image"]},
            {"id": 2, "type": "ImageScale", "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
             "widgets_values": ["nearest-exact", 512, 384, "center"]},
            {"id": 3, "type": "ControlNetLoader", "inputs": [], "widgets_values": ["cn-a"]},
            {"id": 4, "type": "ControlNetApplyAdvanced",
             "inputs": [{"name": "positive", "type": "CONDITIONING", "link": 3},
                        {"name": "negative", "type": "CONDITIONING", "link": 4},
                        {"name": "control_net", "type": "CONTROL_NET", "link": 5},
                        {"name": "image", "type": "IMAGE", "link": 2},
                        {"name": "vae", "type": "VAE", "link": None}],
             "widgets_values": [0.8, 0.1, 0.9]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 4, 3, "IMAGE"], [3, 9, 0, 4, 0, "CONDITIONING"],
                  [4, 10, 0, 4, 1, "CONDITIONING"], [5, 3, 0, 4, 2, "CONTROL_NET"]],
    }
    api = ui_to_api(workflow, specs)
    assert api["2"]["inputs"] == {"image": ["1", 0], "upscale_method": "nearest-exact", "width": 512, "height": 384,
                                  "crop": "center"}
    assert api["3"]["inputs"] == {"control_net_name": "cn-a"}
    assert api["4"]["inputs"] == {"positive": ["9", 0], "negative": ["10", 0], "control_net": ["3", 0],
                                  "image": ["2", 0], "strength": 0.8, "start_percent": 0.1, "end_percent": 0.9}
