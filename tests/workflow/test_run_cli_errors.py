"""``ksampler-rt run`` on malformed UI workflows: a clear message naming the node and field, exit 2, no
traceback; a failure at run time names the node and, through the message, its input."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ksampler_rt.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"
UI = json.loads((EXAMPLES / "txt2img.ui.json").read_text())


def _ui(change) -> dict:
    workflow = copy.deepcopy(UI)
    change(workflow)
    return workflow


def _node(workflow, type_):
    return next(n for n in workflow["nodes"] if n["type"] == type_)


@pytest.mark.parametrize("change, expected", [
    (lambda w: w["links"].__setitem__(0, [1]), "links[0]: received [1], expected [id, from_node, from_slot"),
    (lambda w: _node(w, "KSampler").pop("id"), "nodes[4] (KSampler): id: received None, expected a node id"),
    (lambda w: _node(w, "VAEDecode")["inputs"][0].pop("name"),
     "node 8 (VAEDecode) inputs[0]: received {'type': 'LATENT', 'link': 7}, expected an object with a 'name'"),
    (lambda w: w.__setitem__("nodes", {"4": w["nodes"][0]}), "nodes: received a JSON dict, expected a list"),
    (lambda w: _node(w, "SaveImage")["inputs"][0].__setitem__("link", 99),
     "node 9 (SaveImage) input 'images': link: received 99, expected the id of one of the workflow's links"),
    (lambda w: _node(w, "KSampler").__setitem__("widgets_values", 7),
     "node 3 (KSampler) widgets_values: received a JSON int, expected a list"),
])
def test_malformed_ui_workflows_exit_2_with_the_field(tmp_path, capsys, change, expected):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(_ui(change)))
    rc = main(["run", str(path), "--out", str(tmp_path / "out"), "--models", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and "Traceback" not in err


def test_a_folder_as_the_workflow_exits_2(tmp_path, capsys):
    rc = main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--models", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert rc == 2 and "a folder; expected a workflow JSON file" in err


@pytest.mark.parametrize("prefix, problem", [("../x", "'..'"), ("a\x00b", "NUL"), ("/tmp/abs", "absolute"),
                                             ("..", "'..'"), (".hidden/x", "hidden"), ("sub/", "no file name")])
def test_filename_prefix_is_refused_before_anything_runs(tmp_path, capsys, prefix, problem):
    prompt = json.loads((EXAMPLES / "txt2img.json").read_text())
    prompt["9"]["inputs"]["filename_prefix"] = prefix
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(prompt))
    rc = main(["run", str(path), "--out", str(tmp_path / "out"), "--models", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert rc == 2 and "node 9 (SaveImage) input filename_prefix: received" in err and problem in err


def test_a_later_output_node_that_fails_is_named(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "linked").symlink_to(tmp_path / "elsewhere")   # passes the lexical check, leaves the folder when resolved
    prompt = json.loads((EXAMPLES / "txt2img.json").read_text())
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"]["steps"] = 1
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "linked/x"}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(prompt))
    rc = main(["run", str(path), "--out", str(out), "--models", str(tiny_sd15.models_dir),
               "--backend", "onnxruntime-cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "node 10 (SaveImage) failed: filename_prefix: received 'linked/x'" in err and "Traceback" not in err
    assert not any((tmp_path / "elsewhere").iterdir())
