"""Conditioning nodes, and per-step prompt scheduling in one KSampler (the chain it replaces)."""
import copy
import json
from pathlib import Path

import numpy as np

from ksampler_rt.workflow.conditioning_nodes import (conditioning_combine, conditioning_set_step_range,
                                                     conditioning_set_timestep_range, prompt_schedule)

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"


def entry(value):
    return [np.full((1, 77, 32), value, np.float32), {"pooled_output": None}]


def test_nodes_copy_options_and_combine_lists():
    a, b = [entry(1.0)], [entry(2.0)]
    (ranged,) = conditioning_set_timestep_range(None, "1", a, 0.2, 0.8)
    assert ranged[0][1] == {"pooled_output": None, "start_percent": 0.2, "end_percent": 0.8}
    assert a[0][1] == {"pooled_output": None}  # the input is not modified
    (stepped,) = conditioning_set_step_range(None, "2", b, 3, 10)
    assert stepped[0][1]["start_step"] == 3 and stepped[0][1]["end_step"] == 10
    (both,) = conditioning_combine(None, "3", ranged, stepped)
    assert [float(c[0][0, 0, 0]) for c in both] == [1.0, 2.0]


class FakeClip:
    def encode(self, text):
        return [entry(len(text))]


def test_prompt_schedule_is_from_then_to():
    cond = prompt_schedule(FakeClip(), "red apple", "red rabbit", 10)
    assert [(float(c[0][0, 0, 0]), c[1].get("start_step"), c[1].get("end_step")) for c in cond] == [
        (9.0, None, 10), (10.0, 10, None)]


def test_one_ksampler_with_a_step_schedule_equals_the_prompt_switch_chain(pipeline):
    """The seed's prompt-switch workflow (red apple for 0-10, red rabbit for 10-20, two KSamplerAdvanced)
    as one KSampler with ConditioningSetStepRange + ConditioningCombine."""
    chain = json.loads((EXAMPLES / "prompt-switch.json").read_text())
    for node in chain.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
    advanced = [k for k, v in chain.items() if v["class_type"] == "KSamplerAdvanced"]
    first, second = sorted(advanced, key=lambda k: chain[k]["inputs"]["start_at_step"])
    exact = copy.deepcopy(chain)
    for k in advanced:
        exact[k]["inputs"]["continuation"] = "exact"
    single = copy.deepcopy(chain)
    switch = chain[first]["inputs"]["end_at_step"]
    single["90"] = {"class_type": "ConditioningSetStepRange",
                    "inputs": {"conditioning": chain[first]["inputs"]["positive"], "start_step": 0, "end_step": switch}}
    single["91"] = {"class_type": "ConditioningSetStepRange",
                    "inputs": {"conditioning": chain[second]["inputs"]["positive"], "start_step": switch,
                               "end_step": 10000}}
    single["92"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["90", 0], "conditioning_2": ["91", 0]}}
    ins = chain[first]["inputs"]
    single["93"] = {"class_type": "KSampler", "inputs": {
        "model": ins["model"], "seed": ins["noise_seed"], "steps": ins["steps"], "cfg": ins["cfg"],
        "sampler_name": ins["sampler_name"], "scheduler": ins["scheduler"], "positive": ["92", 0],
        "negative": ins["negative"], "latent_image": ins["latent_image"], "denoise": 1.0}}
    decode = next(k for k, v in chain.items() if v["class_type"] == "VAEDecode" and v["inputs"]["samples"][0] == second)
    single[decode]["inputs"]["samples"] = ["93", 0]
    del single[first], single[second]

    def latent(result, node):
        return result.outputs[node][0]["samples"]

    got = latent(pipeline.run_workflow(single), "93")
    np.testing.assert_array_equal(got, latent(pipeline.run_workflow(exact), second))
    np.testing.assert_allclose(got, latent(pipeline.run_workflow(chain), second), rtol=1e-5, atol=1e-4)
