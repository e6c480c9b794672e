"""The seed workflows end to end on the tiny SD1.5 export with the ONNX Runtime CPU backend.

Latents are 64x64 px (8x8) where the workflow starts from EmptyLatentImage, to keep the suite fast;
img2img runs on the real 256 px apple with fewer steps.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ksampler_rt.workflow.images import read_png_metadata

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"

SMALL = {"5.width": 64, "5.height": 64}


def workflow(name):
    return json.loads((EXAMPLES / name).read_text())


def saved(pipe, result, node_id):
    return [pipe.output_dir / img["subfolder"] / img["filename"] for img in result.ui[node_id]["images"]]


def samples(result, node_id):
    return result.outputs[node_id][0]["samples"]


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_txt2img_writes_a_png_with_the_prompt(pipeline):
    events = []
    result = pipeline.run_workflow(workflow("txt2img.json"), overrides=SMALL,
                                   on_event=lambda kind, data: events.append((kind, data)))
    (path,) = saved(pipeline, result, "9")
    assert path.name.startswith("txt2img_") and path.name.endswith("_.png")
    with Image.open(path) as img:
        assert img.size == (64, 64) and img.mode == "RGB"
    meta = read_png_metadata(path)
    assert meta["prompt"]["3"]["inputs"]["seed"] == 42 and meta["prompt"]["5"]["inputs"]["width"] == 64
    assert "workflow" not in meta  # API-format runs carry no UI workflow, as in ComfyUI
    latent = samples(result, "3")
    assert latent.shape == (1, 4, 8, 8) and np.isfinite(latent).all()
    steps = [d["value"] for kind, d in events if kind == "progress" and d["node"] == "3"]
    assert steps == list(range(1, 21))
    executed = [d["node"] for kind, d in events if kind == "executing" and d["node"] is not None]
    assert sorted(executed) == sorted(workflow("txt2img.json")) and len(executed) == len(set(executed))


def test_split_equals_unsplit(pipeline):
    result = pipeline.run_workflow(workflow("advanced-split.json"), overrides=SMALL)
    split, unsplit = samples(result, "11"), samples(result, "12")
    # the only difference is ComfyUI's latent scale round trip between the two nodes
    assert rel_diff(split, unsplit) < 1e-5
    exact = workflow("advanced-split.json")
    for node_id in ("10", "11"):
        exact[node_id]["inputs"]["continuation"] = "exact"
    result_exact = pipeline.run_workflow(exact, overrides=SMALL)
    assert rel_diff(samples(result_exact, "11"), unsplit) < 1e-6
    assert len(saved(pipeline, result, "9")) == len(saved(pipeline, result, "14")) == 1


def test_ui_and_api_formats_give_identical_outputs(pipeline):
    ui = workflow("advanced-split.ui.json")
    for node in ui["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [64, 64]
    api = workflow("advanced-split.json")
    from_ui = pipeline.run_workflow(ui, extra_pnginfo={"workflow": ui})
    from_api = pipeline.run_workflow(api, overrides=SMALL)
    np.testing.assert_array_equal(samples(from_ui, "11"), samples(from_api, "11"))
    (ui_png,), (api_png,) = saved(pipeline, from_ui, "9"), saved(pipeline, from_api, "9")
    with Image.open(ui_png) as a, Image.open(api_png) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = read_png_metadata(ui_png)
    assert meta["workflow"] == ui  # the UI workflow drags back into ComfyUI
    assert meta["prompt"]["10"]["inputs"]["noise_seed"] == 42


def test_add_noise_disabled_denoises_the_input_latent_without_noise(pipeline):
    """ComfyUI: with add_noise disabled the sampler starts from the input latent itself (all zeros
    here) at sigma_max, so the result is the same for every noise_seed and differs from a noised run."""
    wf = workflow("advanced-add-noise-disabled.json")
    a = samples(pipeline.run_workflow(wf, overrides=SMALL), "10")
    b = samples(pipeline.run_workflow(wf, overrides={**SMALL, "10.noise_seed": 1234}), "10")
    np.testing.assert_array_equal(a, b)
    noised = samples(pipeline.run_workflow(wf, overrides={**SMALL, "10.add_noise": "enable"}), "10")
    assert np.isfinite(a).all() and rel_diff(a, noised) > 1e-2


def test_prompt_switch(pipeline):
    wf = workflow("prompt-switch.json")
    switched = samples(pipeline.run_workflow(wf, overrides=SMALL), "11")
    # the same prompt on both halves is the unsplit KSampler run
    same = samples(pipeline.run_workflow(wf, overrides={**SMALL, "16.text": "red apple"}), "11")
    unsplit = copy.deepcopy(wf)
    unsplit["11"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 7, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    reference = samples(pipeline.run_workflow(unsplit, overrides=SMALL), "11")
    assert rel_diff(same, reference) < 1e-5
    assert rel_diff(switched, reference) > 1e-3  # the rabbit half changed the result


def test_img2img_denoise(pipeline):
    wf = workflow("img2img.json")
    result = pipeline.run_workflow(wf, overrides={"3.steps": 5})
    encoded, out = samples(result, "31"), samples(result, "3")
    assert encoded.shape == out.shape == (1, 4, 32, 32)
    (path,) = saved(pipeline, result, "9")
    with Image.open(path) as img:
        assert img.size == (256, 256)
    # denoise 0.6 keeps the input's structure: the output stays closer to the input than a full denoise
    full = samples(pipeline.run_workflow(wf, overrides={"3.steps": 5, "3.denoise": 1.0}), "3")
    corr = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    assert corr(out, encoded) > corr(full, encoded)


def test_python_api_reuses_engines_and_matches_the_workflow(pipeline):
    loaded = pipeline.load_checkpoint("tiny-sd15")
    image = pipeline.txt2img("tiny-sd15", "a red apple on a wooden table, studio light", "blurry, low quality",
                             seed=42, steps=20, cfg=8.0, width=64, height=64)
    assert pipeline.load_checkpoint("tiny-sd15") is loaded and list(pipeline._checkpoints) == ["tiny-sd15"]
    result = pipeline.run_workflow(workflow("txt2img.json"), overrides=SMALL)
    np.testing.assert_allclose(image, result.outputs["8"][0], rtol=0, atol=1e-6)
    src = np.asarray(Image.open(EXAMPLES / "apple-256.png").convert("RGB"), np.float32)[None] / 255.0
    out = pipeline.img2img("tiny-sd15", src, "a watercolor painting of a red apple", steps=3)
    assert out.shape == (1, 256, 256, 3) and 0.0 <= out.min() and out.max() <= 1.0


def test_batch_and_upscale_nodes_and_clip_skip(pipeline):
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "40": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["40", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["40", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "41": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": 3}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": 4, "cfg": 5.0, "sampler_name": "dpmpp_2m",
            "scheduler": "karras", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["41", 0],
            "denoise": 1.0}},
        "42": {"class_type": "LatentFromBatch", "inputs": {"samples": ["3", 0], "batch_index": 1, "length": 2}},
        "43": {"class_type": "LatentUpscale", "inputs": {"samples": ["42", 0], "upscale_method": "bilinear",
                                                          "width": 96, "height": 80, "crop": "disabled"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["43", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    result = pipeline.run_workflow(prompt)
    batch = samples(result, "3")
    assert batch.shape == (3, 4, 8, 8)
    assert not np.array_equal(batch[0], batch[1])  # every batch item gets its own noise
    picked = samples(result, "42")
    np.testing.assert_array_equal(picked, batch[1:3])
    assert result.outputs["42"][0]["batch_index"] == [1, 2]
    assert samples(result, "43").shape == (2, 4, 10, 12)
    images = result.ui["9"]["images"]
    assert len(images) == 2 and all(i["type"] == "temp" for i in images)
    assert all((pipeline.temp_dir / i["subfolder"] / i["filename"]).is_file() for i in images)
    # clip skip -2 changes the conditioning; -1 is the default (last layer)
    cond_skip = result.outputs["6"][0][0][0]
    last = pipeline.run_workflow({**prompt, "40": {"class_type": "CLIPSetLastLayer", "inputs": {
        "clip": ["4", 1], "stop_at_clip_layer": -1}}})
    plain = pipeline.load_checkpoint("tiny-sd15").clip.encode("a red apple")[0][0]
    np.testing.assert_array_equal(last.outputs["6"][0][0][0], plain)
    assert not np.allclose(cond_skip, plain)


def test_cache_eviction_during_a_run_does_not_lose_cached_outputs(pipeline):
    """Outputs found in the cache are taken when the run starts: puts made later in the same run may
    evict them before a node that needs them runs (here the unsplit branch, ordered after the split)."""
    import json as _json

    from ksampler_rt.workflow.executor import OutputCache

    prompt = _json.loads((EXAMPLES / "advanced-split.json").read_text())
    prompt["5"]["inputs"].update(width=64, height=64)
    for node in ("10", "11", "12"):
        prompt[node]["inputs"]["steps"] = 4
    prompt["10"]["inputs"]["end_at_step"] = prompt["11"]["inputs"]["start_at_step"] = 2
    prompt["11"]["inputs"]["end_at_step"] = 4
    cache = OutputCache(max_entries=64)
    first = pipeline.run_workflow(prompt, cache=cache)
    cache.max_entries = 1  # every put from now on evicts all older entries
    prompt["10"]["inputs"]["cfg"] = 5.0  # the split branch runs again; the unsplit one is cached
    result = pipeline.run_workflow(prompt, cache=cache)
    assert {"12", "13"} <= set(result.cached)
    np.testing.assert_array_equal(result.outputs["12"][0]["samples"], first.outputs["12"][0]["samples"])
