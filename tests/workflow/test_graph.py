"""Workflow parsing and validation: API/UI formats, ComfyUI's node_errors, bad input."""
import json
from pathlib import Path

import pytest

from ksampler_rt.workflow.graph import WorkflowError, load_workflow, validate
from ksampler_rt.workflow.nodes import build_node_specs

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"
SPECS = build_node_specs(lambda: ["tiny-sd15"], lambda: ["apple-256.png"], lambda: ["tiny-pixel-lora.safetensors"])


def api(name):
    return json.loads((EXAMPLES / name).read_text())


def test_ui_format_converts_to_the_api_prompt():
    ui = load_workflow(EXAMPLES / "advanced-split.ui.json", SPECS)
    ref = api("advanced-split.json")
    for node_id, node in ui.items():
        assert node["class_type"] == ref[node_id]["class_type"]
        assert node["inputs"] == ref[node_id]["inputs"], node_id


def test_prompt_body_wrapper_is_accepted():
    prompt = api("txt2img.json")
    assert load_workflow({"prompt": prompt, "client_id": "x"}, SPECS) == prompt


@pytest.mark.parametrize("name", ["txt2img.json", "advanced-split.json", "advanced-add-noise-disabled.json",
                                  "prompt-switch.json", "img2img.json", "lora-switch.json"])
def test_seed_workflows_validate(name):
    plan = validate(load_workflow(EXAMPLES / name, SPECS), SPECS)
    assert plan.outputs and set(plan.outputs) <= set(plan.order)
    position = {n: i for i, n in enumerate(plan.order)}
    for node_id in plan.order:  # every link points to a node that runs before it
        for value in plan.prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                assert position[value[0]] < position[node_id]


def test_not_json_is_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(bad, SPECS)


def test_unknown_node_type_names_node_and_supported_types():
    prompt = api("txt2img.json")
    prompt["9"]["class_type"] = "ImageUpscaleWithModel"
    with pytest.raises(WorkflowError, match=r"node 9: class_type: received 'ImageUpscaleWithModel', expected one of: "
                                            r".*KSampler"):
        validate(prompt, SPECS)


def test_bad_values_and_links_are_all_reported_with_node_and_input():
    prompt = api("txt2img.json")
    ks = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    prompt[ks]["inputs"]["steps"] = 0
    prompt[ks]["inputs"]["cfg"] = "high"
    prompt[ks]["inputs"]["sampler_name"] = "euler_magic"
    prompt[ks]["inputs"]["positive"] = ["99", 0]
    prompt[ks]["inputs"]["negative"] = ["4", 7]
    with pytest.raises(WorkflowError) as info:
        validate(prompt, SPECS)
    errors = {e["extra_info"]["input_name"]: e["message"] for e in info.value.node_errors[ks]["errors"]}
    assert "expected at least 1" in errors["steps"]
    assert "expected a number" in errors["cfg"]
    assert "'euler_magic'" in errors["sampler_name"] and "dpmpp_2m" in errors["sampler_name"]
    assert "node 99" in errors["positive"]
    assert "output 7" in errors["negative"]
    body = info.value.comfy_error()
    assert body["error"]["type"] == "prompt_outputs_failed_validation" and ks in body["node_errors"]


def test_wrong_link_type_and_unknown_checkpoint():
    prompt = api("txt2img.json")
    ks = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    prompt[ks]["inputs"]["model"] = ["4", 1]  # CLIP, not MODEL
    prompt["4"]["inputs"]["ckpt_name"] = "sd_xl_base_1.0.safetensors"
    with pytest.raises(WorkflowError) as info:
        validate(prompt, SPECS)
    text = str(info.value)
    assert "received CLIP from node 4 output 1, expected MODEL" in text
    assert "'sd_xl_base_1.0.safetensors', expected one of: 'tiny-sd15'" in text


def test_no_output_node():
    prompt = {"5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    with pytest.raises(WorkflowError, match="no output node"):
        validate(prompt, SPECS)


def test_a_cycle_is_rejected():
    prompt = {
        "1": {"class_type": "LatentUpscale", "inputs": {"samples": ["2", 0], "upscale_method": "bilinear",
                                                         "width": 64, "height": 64, "crop": "disabled"}},
        "2": {"class_type": "LatentUpscale", "inputs": {"samples": ["1", 0], "upscale_method": "bilinear",
                                                         "width": 64, "height": 64, "crop": "disabled"}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["3", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    with pytest.raises(WorkflowError, match="cycle"):
        validate(prompt, SPECS)


def test_ui_primitive_node_values_come_from_the_target_widgets():
    ui = json.loads((EXAMPLES / "advanced-split.ui.json").read_text())
    ui["nodes"].append({"id": 50, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": [99]}], "widgets_values": [42, "fixed"]})
    ui["links"].append([99, 50, 0, 10, 4, "INT"])
    node10 = next(n for n in ui["nodes"] if n["id"] == 10)
    node10["inputs"].append({"name": "noise_seed", "type": "INT", "link": 99, "widget": {"name": "noise_seed"}})
    prompt = load_workflow(ui, SPECS)
    assert prompt["10"]["inputs"]["noise_seed"] == 42
    validate(prompt, SPECS)
