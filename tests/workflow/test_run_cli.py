"""``ksampler-rt run`` through ``ksampler_rt.cli.main``: outputs, PNG metadata, and bad input
rejected before any engine runs (node id and input name in the message, non-zero exit)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ksampler_rt.cli import main
from ksampler_rt.workflow.images import read_png_metadata

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"


def run(tiny, out, workflow, *extra, input_dir=EXAMPLES):
    return main(["run", str(workflow), "--out", str(out), "--input", str(input_dir), "--models", str(tiny.models_dir),
                 "--backend", "onnxruntime-cpu", *extra])


def test_run_api_workflow_prints_paths_and_embeds_the_prompt(tiny_sd15, tmp_path, capsys):
    rc = run(tiny_sd15, tmp_path, EXAMPLES / "txt2img.json", "--set", "5.width=64", "--set", "5.height=64",
             "--set", "3.steps=3", "--set", "3.seed=7", "--set", "3.sampler_name=dpmpp_2m")
    assert rc == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert printed == [tmp_path / "txt2img_00001_.png"] and printed[0].is_file()
    meta = read_png_metadata(printed[0])
    assert meta["prompt"]["3"]["inputs"]["seed"] == 7 and meta["prompt"]["3"]["inputs"]["sampler_name"] == "dpmpp_2m"
    assert meta["prompt"]["3"]["inputs"]["steps"] == 3
    # the counter continues after existing files, as ComfyUI's get_save_image_path
    assert run(tiny_sd15, tmp_path, EXAMPLES / "txt2img.json", "--set", "5.width=64", "--set", "5.height=64",
               "--set", "3.steps=1") == 0
    assert (tmp_path / "txt2img_00002_.png").is_file()


def test_run_ui_workflow_embeds_the_workflow(tiny_sd15, tmp_path, capsys):
    ui = json.loads((EXAMPLES / "advanced-split.ui.json").read_text())
    for node in ui["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [64, 64]
    path = tmp_path / "split.ui.json"
    path.write_text(json.dumps(ui))
    assert run(tiny_sd15, tmp_path / "out", path) == 0
    (png,) = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    meta = read_png_metadata(png)
    assert meta["workflow"] == ui
    assert meta["prompt"]["11"]["class_type"] == "KSamplerAdvanced"
    with Image.open(png) as img:
        assert img.text.keys() >= {"prompt", "workflow"}


def test_prompt_body_wrapper_runs(tiny_sd15, tmp_path, capsys):
    body = {"prompt": json.loads((EXAMPLES / "txt2img.json").read_text()), "client_id": "cli-test",
            "extra_data": {"extra_pnginfo": {"workflow": {"nodes": [], "links": []}}}}
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    assert run(tiny_sd15, tmp_path / "out", path, "--set", "5.width=64", "--set", "5.height=64",
               "--set", "3.steps=1") == 0
    (png,) = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert read_png_metadata(png)["workflow"] == {"nodes": [], "links": []}


@pytest.fixture
def no_engines(monkeypatch):
    """Fail the test if anything tries to load engines."""
    import ksampler_rt.workflow.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("an engine was loaded for a workflow that should have been rejected")

    monkeypatch.setattr(checkpoint, "load_checkpoint", refuse)


def _bad(tiny, tmp_path, capsys, workflow, *extra, input_dir=EXAMPLES):
    rc = run(tiny, tmp_path / "out", workflow, *extra, input_dir=input_dir)
    err = capsys.readouterr().err
    assert rc != 0
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return err


def test_not_json(tiny_sd15, tmp_path, capsys, no_engines):
    path = tmp_path / "broken.json"
    path.write_text('{"3": {"class_type": "KSampler",')
    assert "not valid JSON" in _bad(tiny_sd15, tmp_path, capsys, path)


def test_missing_workflow_file(tiny_sd15, tmp_path, capsys, no_engines):
    assert "nope.json" in _bad(tiny_sd15, tmp_path, capsys, tmp_path / "nope.json")


@pytest.mark.parametrize("setting, expected", [
    ('3.positive=["99", 0]', "node 3 (KSampler) input positive: linked to node 99, which is not in the workflow"),
    ('3.negative=["7", 3]', "node 3 (KSampler) input negative: linked to output 3 of node 7 (CLIPTextEncode)"),
    ('3.model=["4", 1]', "node 3 (KSampler) input model: received CLIP from node 4 output 1, expected MODEL"),
    ('3.steps="many"', "node 3 (KSampler) input steps: received 'many' (str), expected an integer"),
    ("3.steps=2.5", "node 3 (KSampler) input steps: received 2.5 (float), expected an integer"),
    ("3.cfg=101", "node 3 (KSampler) input cfg: received 101.0, expected at most 100.0"),
    ("3.denoise=-0.5", "node 3 (KSampler) input denoise: received -0.5, expected at least 0.0"),
    ("5.width=0", "node 5 (EmptyLatentImage) input width: received 0, expected at least 16"),
    ("3.sampler_name=euler_magic", "node 3 (KSampler) input sampler_name: received 'euler_magic', expected one of"),
    ("4.ckpt_name=sd_xl_base_1.0.safetensors",
     "node 4 (CheckpointLoaderSimple) input ckpt_name: received 'sd_xl_base_1.0.safetensors', expected one of: "
     "'tiny-sd15'"),
])
def test_bad_values_and_links(tiny_sd15, tmp_path, capsys, no_engines, setting, expected):
    err = _bad(tiny_sd15, tmp_path, capsys, EXAMPLES / "txt2img.json", "--set", setting)
    assert expected in err


def test_unknown_node_type(tiny_sd15, tmp_path, capsys, no_engines):
    prompt = json.loads((EXAMPLES / "txt2img.json").read_text())
    prompt["50"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["4", 0], "image": ["8", 0]}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(prompt))
    err = _bad(tiny_sd15, tmp_path, capsys, path)
    assert "node 50: class_type: received 'ImageUpscaleWithModel', expected one of:" in err and "KSamplerAdvanced" in err


def test_unreadable_image(tiny_sd15, tmp_path, capsys, no_engines):
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "apple-256.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    err = _bad(tiny_sd15, tmp_path, capsys, EXAMPLES / "img2img.json", input_dir=inputs)
    assert "node 30 (LoadImage) input image: cannot read apple-256.png as an image" in err


def test_missing_image(tiny_sd15, tmp_path, capsys, no_engines):
    err = _bad(tiny_sd15, tmp_path, capsys, EXAMPLES / "img2img.json", "--set", "30.image=pear.png")
    assert "node 30 (LoadImage) input image: received 'pear.png', expected one of: 'apple-256.png'" in err


def test_clip_layers_the_export_lacks_are_refused_before_anything_runs():
    """Exports from before every hidden layer was exported serve only -1/-2; SD2's -1 (the OpenCLIP-H
    layer diffusers drops) never exists."""
    from ksampler_rt.workflow.pipeline import clip_layer_problem

    old_sd15 = {"family": "sd15", "text_encoders": [{"name": "clip", "num_layers": 12}]}
    assert clip_layer_problem(old_sd15, -2) is None and clip_layer_problem(old_sd15, -1) is None
    assert "received -3, expected one of the layers this export provides for clip: [-2, -1]" in \
        clip_layer_problem(old_sd15, -3)
    assert clip_layer_problem(old_sd15, -13) is None  # beyond the model: ComfyUI uses the last layer
    new_sd15 = {"family": "sd15", "text_encoders": [{"name": "clip", "num_layers": 12, "all_hidden_states": True}]}
    assert all(clip_layer_problem(new_sd15, layer) is None for layer in range(-12, 0))
    sd2 = {"family": "sd2-v", "text_encoders": [{"name": "clip", "num_layers": 23, "all_hidden_states": True}]}
    assert "received -1" in clip_layer_problem(sd2, -1)
    assert all(clip_layer_problem(sd2, layer) is None for layer in range(-24, -1))


def test_any_clip_layer_runs_on_a_current_export(tiny_sd15, tmp_path, capsys):
    prompt = json.loads((EXAMPLES / "txt2img.json").read_text())
    prompt["40"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -3}}
    prompt["6"]["inputs"]["clip"] = ["40", 0]
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"]["steps"] = 2
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(prompt))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--input", str(tmp_path),
                 "--models", str(tiny_sd15.models_dir)]) == 0


def test_bad_set_syntax(tiny_sd15, tmp_path, capsys, no_engines):
    assert "NODE_ID.INPUT=VALUE" in _bad(tiny_sd15, tmp_path, capsys, EXAMPLES / "txt2img.json", "--set", "seed7")
    assert "node id of the workflow" in _bad(tiny_sd15, tmp_path, capsys, EXAMPLES / "txt2img.json",
                                             "--set", "77.seed=1")
