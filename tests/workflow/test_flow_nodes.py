"""The SD3 / SD3.5 and FLUX.1 nodes (ComfyUI 0.3.64 nodes.py, comfy_extras/nodes_sd3.py, nodes_flux.py,
nodes_model_advanced.py) on the analytic stand-ins: their specs as ComfyUI lists them, their behaviour node by
node (checked against the runtime called directly and against ComfyUI's formulas written out here), and the
example graphs through ``ksampler-rt run`` and the server's ``/prompt``."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ksampler_rt.cli import main
from ksampler_rt.runtime import Model, ksampler
from ksampler_rt.runtime.model_sampling import flux_shift
from ksampler_rt.serve.preview import latent_rgb_factors, latent_to_rgb
from ksampler_rt.serve.testing import FakeFlowNet, FakeTextTower, fake_flow_clip, fake_pipeline
from ksampler_rt.workflow.graph import WorkflowError

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"
SD35_CKPT = "sd3.5_large.safetensors"


def load(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text())


@pytest.fixture
def pipe(tmp_path):
    return fake_pipeline(("tiny-sd15", SD35_CKPT), output_dir=tmp_path / "out", input_dir=tmp_path / "in",
                         temp_dir=tmp_path / "temp")


def small(prompt: dict, sampler_node: str, latent_node: str, steps: int | None = None) -> dict:
    prompt[latent_node]["inputs"].update(width=64, height=48)
    if steps is not None:
        prompt[sampler_node]["inputs"]["steps"] = steps
    return prompt


# -- specs as ComfyUI lists them ------------------------------------------------------------------
COMFYUI_SPECS = {
    # class: (display name, category, python module, required inputs in order, optional inputs, outputs)
    "UNETLoader": ("Load Diffusion Model", "advanced/loaders", "nodes", ["unet_name", "weight_dtype"], [],
                   ["MODEL"]),
    "DualCLIPLoader": ("DualCLIPLoader", "advanced/loaders", "nodes", ["clip_name1", "clip_name2", "type"],
                       ["device"], ["CLIP"]),
    "TripleCLIPLoader": ("TripleCLIPLoader", "advanced/loaders", "comfy_extras.nodes_sd3",
                         ["clip_name1", "clip_name2", "clip_name3"], [], ["CLIP"]),
    "VAELoader": ("Load VAE", "loaders", "nodes", ["vae_name"], [], ["VAE"]),
    "CLIPTextEncodeFlux": ("CLIPTextEncodeFlux", "advanced/conditioning/flux", "comfy_extras.nodes_flux",
                           ["clip", "clip_l", "t5xxl", "guidance"], [], ["CONDITIONING"]),
    "CLIPTextEncodeSD3": ("CLIPTextEncodeSD3", "advanced/conditioning", "comfy_extras.nodes_sd3",
                          ["clip", "clip_l", "clip_g", "t5xxl", "empty_padding"], [], ["CONDITIONING"]),
    "FluxGuidance": ("FluxGuidance", "advanced/conditioning/flux", "comfy_extras.nodes_flux",
                     ["conditioning", "guidance"], [], ["CONDITIONING"]),
    "ModelSamplingSD3": ("ModelSamplingSD3", "advanced/model", "comfy_extras.nodes_model_advanced",
                         ["model", "shift"], [], ["MODEL"]),
    "ModelSamplingFlux": ("ModelSamplingFlux", "advanced/model", "comfy_extras.nodes_model_advanced",
                          ["model", "max_shift", "base_shift", "width", "height"], [], ["MODEL"]),
    "EmptySD3LatentImage": ("EmptySD3LatentImage", "latent/sd3", "comfy_extras.nodes_sd3",
                            ["width", "height", "batch_size"], [], ["LATENT"]),
    "ConditioningZeroOut": ("ConditioningZeroOut", "advanced/conditioning", "nodes", ["conditioning"], [],
                            ["CONDITIONING"]),
    "ConditioningSetTimestepRange": ("ConditioningSetTimestepRange", "advanced/conditioning", "nodes",
                                     ["conditioning", "start", "end"], [], ["CONDITIONING"]),
}


@pytest.mark.parametrize("name", sorted(COMFYUI_SPECS))
def test_object_info_lists_the_node_like_comfyui(pipe, name):
    display, category, module, required, optional, outputs = COMFYUI_SPECS[name]
    spec = pipe.specs[name]
    assert spec.unsupported is None, name
    info = spec.object_info()
    assert (info["display_name"], info["category"], info["python_module"]) == (display, category, module)
    assert info["input_order"]["required"] == required
    assert info["input_order"].get("optional", []) == optional
    assert info["output"] == outputs


def test_widget_defaults_and_ranges_are_comfyuis(pipe):
    req = {name: pipe.specs[name].object_info()["input"]["required"] for name in COMFYUI_SPECS}
    assert req["FluxGuidance"]["guidance"] == ["FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}]
    assert req["ModelSamplingSD3"]["shift"] == ["FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01}]
    assert req["ModelSamplingFlux"]["max_shift"][1]["default"] == 1.15
    assert req["ModelSamplingFlux"]["base_shift"][1]["default"] == 0.5
    assert req["ModelSamplingFlux"]["width"] == ["INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}]
    assert req["EmptySD3LatentImage"]["width"] == ["INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}]
    assert req["DualCLIPLoader"]["type"][0] == ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]
    assert req["UNETLoader"]["weight_dtype"][0] == ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    assert req["CLIPTextEncodeSD3"]["empty_padding"][0] == ["none", "empty_prompt"]
    assert "flux1-dev.safetensors" in req["UNETLoader"]["unet_name"][0]
    assert req["VAELoader"]["vae_name"][0] == ["ae.safetensors", "sd3.5_vae.safetensors"]


def test_the_default_registry_lists_component_folders(tmp_path):
    from ksampler_rt.workflow.pipeline import Pipeline

    (tmp_path / "diffusion_models" / "flux-dev-export").mkdir(parents=True)
    (tmp_path / "diffusion_models" / "flux-dev-export" / "manifest.json").write_text('{"family": "flux"}')
    (tmp_path / "diffusion_models" / "not-an-export").mkdir()
    pipe = Pipeline(tmp_path, log=None)
    assert pipe.specs["UNETLoader"].inputs["unet_name"].combo_values() == ["flux-dev-export"]
    assert pipe.specs["VAELoader"].inputs["vae_name"].combo_values() == []
    with pytest.raises(ValueError, match=r"unet_name: received 'nope', expected one of the exports in .*"
                                         r"diffusion_models: flux-dev-export"):
        pipe.registry.component("diffusion_models", "nope")


# -- node behaviour --------------------------------------------------------------------------------
def spec_run(pipe, name, **inputs):
    return pipe.specs[name].run(None, "1", **inputs)


def test_model_sampling_flux_sets_comfyuis_shift_on_a_copy(pipe):
    model = Model(FakeFlowNet("flux"), "flux")
    patched, = spec_run(pipe, "ModelSamplingFlux", model=model, max_shift=1.15, base_shift=0.5, width=1024,
                        height=768)
    # (w*h/256) * (max - base) / 3840 + base - 256 * (max - base) / 3840, by hand: 3072 * 0.65/3840 + 0.5 - 0.65/15
    assert patched.model_sampling.shift == pytest.approx(3072 * 0.65 / 3840 + 0.5 - 256 * 0.65 / 3840, rel=1e-12)
    assert patched.model_sampling.shift == pytest.approx(0.97667, abs=1e-5)
    assert model.model_sampling.shift == pytest.approx(1.15)  # the input MODEL is not changed
    assert patched.unet is model.unet
    reference = Model(model.unet, "flux", shift=flux_shift(1024, 768, 1.15, 0.5))
    np.testing.assert_array_equal(patched.model_sampling.sigmas, reference.model_sampling.sigmas)


def test_model_sampling_sd3_shift_changes_the_schedule(pipe):
    from ksampler_rt.runtime import calculate_sigmas

    model = Model(FakeFlowNet("sd3"), "sd3")
    patched, = spec_run(pipe, "ModelSamplingSD3", model=model, shift=6.0)
    got = calculate_sigmas(patched, "simple", 4, "euler", 1.0)
    expected = calculate_sigmas(Model(model.unet, "sd3", shift=6.0), "simple", 4, "euler", 1.0)
    np.testing.assert_array_equal(got, expected)
    # ComfyUI's shifted table: shift*t / (1 + (shift - 1)*t) at t = 0.75 (simple's second sigma of 4 steps)
    assert got[1] == pytest.approx(6.0 * 0.75 / (1 + 5.0 * 0.75), rel=1e-5)
    assert not np.array_equal(got, calculate_sigmas(model, "simple", 4, "euler", 1.0))


@pytest.mark.parametrize("node, family, message", [
    ("ModelSamplingSD3", "sd15", r"model: received a sd15 model, expected a model of a flow family"),
    ("ModelSamplingFlux", "sdxl", r"model: received a sdxl model, expected a model of a flow family"),
])
def test_model_sampling_nodes_reject_sd_families(pipe, node, family, message):
    model = Model(FakeFlowNet("flux"), family)
    inputs = {"shift": 3.0} if node == "ModelSamplingSD3" else dict(max_shift=1.15, base_shift=0.5, width=64,
                                                                    height=64)
    with pytest.raises(ValueError, match=message):
        spec_run(pipe, node, model=model, **inputs)


def test_model_sampling_nodes_patch_the_other_flow_family_like_comfyui(pipe):
    """ComfyUI's nodes replace the model sampling whatever the model's own was: ModelSamplingSD3 on FLUX.1 dev
    gives SD3's table (multiplier 1000: the network then gets sigma * 1000), ModelSamplingFlux on SD3 / schnell
    FLUX.1 dev's."""
    flux = Model(FakeFlowNet("flux"), "flux")
    as_sd3, = spec_run(pipe, "ModelSamplingSD3", model=flux, shift=3.0)
    sd3 = Model(FakeFlowNet("sd3"), "sd3", shift=3.0)
    np.testing.assert_array_equal(as_sd3.model_sampling.sigmas, sd3.model_sampling.sigmas)
    sigma = np.array([0.5], np.float32)
    assert as_sd3.model_sampling.timestep(sigma)[0] == pytest.approx(500.0)  # sigma * 1000, as for SD3
    assert as_sd3.family.name == "flux" and as_sd3.unet is flux.unet  # network, latent format, guidance kept
    schnell = Model(FakeFlowNet("flux-schnell"), "flux-schnell")
    as_flux, = spec_run(pipe, "ModelSamplingFlux", model=schnell, max_shift=1.15, base_shift=0.5, width=1024,
                        height=1024)
    dev = Model(FakeFlowNet("flux"), "flux")
    np.testing.assert_array_equal(as_flux.model_sampling.sigmas, dev.model_sampling.sigmas)  # 1024²: shift 1.15


def test_flux_guidance_and_zero_out_follow_comfyui(pipe):
    clip = fake_flow_clip("flux")
    cond = clip.encode("a cat")
    guided, = spec_run(pipe, "FluxGuidance", conditioning=cond, guidance=2.5)
    assert guided[0][1]["guidance"] == 2.5 and "guidance" not in cond[0][1]  # a copy, as conditioning_set_values
    zero, = spec_run(pipe, "ConditioningZeroOut", conditioning=guided)
    assert zero[0][0].shape == cond[0][0].shape and not zero[0][0].any()
    assert zero[0][1]["pooled_output"].shape == (1, 768) and not zero[0][1]["pooled_output"].any()
    assert zero[0][1]["guidance"] == 2.5 and guided[0][0].any()


def test_clip_text_encode_flux_assembles_t5_context_and_clip_l_pooled(pipe):
    clip = fake_flow_clip("flux")
    cond, = spec_run(pipe, "CLIPTextEncodeFlux", clip=clip, clip_l="a cat", t5xxl="a cat on a mat", guidance=4.0)
    context, options = cond[0]
    t5, _ = FakeTextTower("t5xxl").encode("a cat on a mat")
    _, l_pooled = FakeTextTower("l").encode("a cat")
    np.testing.assert_array_equal(context, t5)
    assert context.shape == (1, 77, 4096)
    np.testing.assert_array_equal(options["pooled_output"], l_pooled)
    assert options["guidance"] == 4.0


def test_clip_text_encode_sd3_assembles_like_sd3_clip_model(pipe):
    clip = fake_flow_clip("sd3")
    cond, = spec_run(pipe, "CLIPTextEncodeSD3", clip=clip, clip_l="a", clip_g="b", t5xxl="c", empty_padding="none")
    context, options = cond[0]
    l_out, l_pooled = FakeTextTower("l").encode("a", 1)
    g_out, g_pooled = FakeTextTower("g").encode("b", 1)
    t5, _ = FakeTextTower("t5xxl").encode("c")
    # sd3_clip.SD3ClipModel: [l | g | zeros to 4096] over 77 tokens, then T5's tokens; pooled l ++ g
    assert context.shape == (1, 77 + 77, 4096)
    np.testing.assert_array_equal(context[:, :77, :768], l_out)
    np.testing.assert_array_equal(context[:, :77, 768:2048], g_out)
    assert not context[:, :77, 2048:].any()
    np.testing.assert_array_equal(context[:, 77:], t5)
    np.testing.assert_array_equal(options["pooled_output"], np.concatenate([l_pooled, g_pooled], axis=-1))


def test_clip_text_encode_sd3_empty_padding(pipe):
    clip = fake_flow_clip("sd3")
    none, = spec_run(pipe, "CLIPTextEncodeSD3", clip=clip, clip_l="", clip_g="", t5xxl="c", empty_padding="none")
    t5, _ = FakeTextTower("t5xxl").encode("c")
    np.testing.assert_array_equal(none[0][0], t5)  # no clip tokens at all: T5 alone, pooled zeros
    assert none[0][1]["pooled_output"].shape == (1, 2048) and not none[0][1]["pooled_output"].any()
    padded, = spec_run(pipe, "CLIPTextEncodeSD3", clip=clip, clip_l="", clip_g="", t5xxl="c",
                       empty_padding="empty_prompt")
    assert padded[0][0].shape == (1, 154, 4096)
    # one of clip_l / clip_g dropped while the other has text: refilled with the empty prompt
    one, = spec_run(pipe, "CLIPTextEncodeSD3", clip=clip, clip_l="", clip_g="b", t5xxl="c", empty_padding="none")
    l_empty, _ = FakeTextTower("l").encode("", 1)
    np.testing.assert_array_equal(one[0][0][:, :77, :768], l_empty)
    # a longer clip_g pads clip_l with empty-prompt chunks to the same count
    long_g = " ".join(["word"] * 100)
    two, = spec_run(pipe, "CLIPTextEncodeSD3", clip=clip, clip_l="a", clip_g=long_g, t5xxl="c", empty_padding="none")
    assert two[0][0].shape == (1, 154 + 77, 4096)


def test_clip_type_mismatch_is_named(pipe):
    with pytest.raises(ValueError, match=r"clip: received a sd3 CLIP, expected a FLUX CLIP"):
        spec_run(pipe, "CLIPTextEncodeFlux", clip=fake_flow_clip("sd3"), clip_l="a", t5xxl="a", guidance=3.5)
    with pytest.raises(ValueError, match=r"clip: received a flux CLIP, expected an SD3 CLIP"):
        spec_run(pipe, "CLIPTextEncodeSD3", clip=fake_flow_clip("flux"), clip_l="a", clip_g="a", t5xxl="a",
                 empty_padding="none")


def test_empty_sd3_latent_has_16_channels(pipe):
    latent, = spec_run(pipe, "EmptySD3LatentImage", width=1024, height=768, batch_size=2)
    assert latent["samples"].shape == (2, 16, 96, 128) and not latent["samples"].any()


def test_dual_clip_loader_type_outside_flux_and_sd3_is_refused_when_run(pipe):
    prompt = load("flux-dev.json")
    prompt["11"]["inputs"]["type"] = "hidream"
    with pytest.raises(ValueError, match=r"type: received 'hidream', expected one of \('sd3', 'flux'\)"):
        pipe.run_workflow(small(prompt, "31", "27", steps=1))


def test_flux_clip_needs_clip_l_and_t5(pipe):
    prompt = load("flux-dev.json")
    prompt["11"]["inputs"]["clip_name1"] = "clip_g.safetensors"
    with pytest.raises(ValueError, match=r"clip_name1 / clip_name2: received the text encoders \['g', 'l'\], "
                                         r"expected clip_l and t5xxl"):
        pipe.run_workflow(small(prompt, "31", "27", steps=1))


def test_unknown_component_fails_validation(pipe):
    prompt = load("flux-dev.json")
    prompt["12"]["inputs"]["unet_name"] = "flux2.safetensors"
    with pytest.raises(WorkflowError, match="unet_name"):
        pipe.prepare(prompt)


# -- the example graphs -----------------------------------------------------------------------------
def direct_flux(prompt: dict, family: str, guidance: float | None) -> np.ndarray:
    """What the Flux example graph computes, called on the runtime directly."""
    clip = fake_flow_clip("flux")
    k = prompt["31"]["inputs"]
    positive = clip.encode(prompt["6"]["inputs"]["text"])
    if guidance is not None:
        positive = [[c, {**o, "guidance": guidance}] for c, o in positive]
    negative = clip.encode(prompt["33"]["inputs"]["text"])
    w, h = prompt["27"]["inputs"]["width"], prompt["27"]["inputs"]["height"]
    latent = {"samples": np.zeros((1, 16, h // 8, w // 8), np.float32)}
    model = Model(FakeFlowNet(family), family)
    return ksampler(model, k["seed"], k["steps"], k["cfg"], k["sampler_name"], k["scheduler"], positive, negative,
                    latent, k["denoise"])["samples"]


def saved_image(result, out_dir: Path) -> np.ndarray:
    images = [image for ui in result.ui.values() for image in ui.get("images", [])]
    assert len(images) == 1
    return np.asarray(Image.open(out_dir / images[0]["subfolder"] / images[0]["filename"]))


@pytest.mark.parametrize("example, family, guidance, steps", [
    ("flux-dev.json", "flux", 3.5, 20), ("flux-schnell.json", "flux-schnell", None, 4)])
def test_flux_examples_compute_what_the_runtime_computes(pipe, tmp_path, example, family, guidance, steps):
    prompt = small(load(example), "31", "27")
    k = prompt["31"]["inputs"]
    assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"]) == (steps, 1.0, "euler", "simple")
    result = pipe.run_workflow(prompt)
    expected = direct_flux(prompt, family, guidance)
    vae = pipe.load_component("vae", ("ae.safetensors",), {})
    image = (np.clip(vae.decode(expected)[0], 0, 1) * 255.0 + 0.5).astype(np.uint8)
    got = saved_image(result, tmp_path / "out")
    assert got.shape == (48, 64, 3)
    assert np.abs(got.astype(int) - image.astype(int)).max() <= 1  # PNG rounding only
    unet = pipe.load_component("diffusion_models", (prompt["12"]["inputs"]["unet_name"],),
                               {"weight_dtype": "default"}).unet
    assert unet.calls == steps  # cfg 1.0: one network call per step, cond only
    assert unet.takes_guidance == (guidance is not None)


def test_flux_dev_guidance_reaches_the_network(pipe, monkeypatch):
    prompt = small(load("flux-dev.json"), "31", "27", steps=2)
    prompt["35"]["inputs"]["guidance"] = 7.0
    seen = []
    unet = pipe.load_component("diffusion_models", ("flux1-dev.safetensors",), {"weight_dtype": "default"}).unet
    original = type(unet).__call__

    def spy(self, x, timestep, context=None, y=None, guidance=None, **kwargs):
        seen.append((np.asarray(guidance).tolist(), np.asarray(y).shape, np.asarray(context).shape))
        return original(self, x, timestep, context, y=y, guidance=guidance, **kwargs)

    monkeypatch.setattr(type(unet), "__call__", spy)
    pipe.run_workflow(prompt)
    assert seen == [([7.0], (1, 768), (1, 77, 4096))] * 2


def test_sd35_example_runs_its_zeroed_negative_schedule(pipe, tmp_path):
    prompt = small(load("sd3.5.json"), "3", "53", steps=6)
    k = prompt["3"]["inputs"]
    assert (k["cfg"], prompt["13"]["inputs"]["shift"]) == (4.5, 3.0)
    result = pipe.run_workflow(prompt)
    # the same computation on the runtime: ConditioningZeroOut over 10%..100%, the empty prompt over 0..10%
    clip = fake_flow_clip("sd3")
    positive = clip.encode(prompt["16"]["inputs"]["text"])
    empty = clip.encode("")
    negative = [[np.zeros_like(empty[0][0]), {"pooled_output": np.zeros_like(empty[0][1]["pooled_output"]),
                                              "start_percent": 0.1, "end_percent": 1.0}],
                [empty[0][0], {**empty[0][1], "start_percent": 0.0, "end_percent": 0.1}]]
    model = Model(FakeFlowNet("sd3"), "sd3", shift=3.0)
    latent = {"samples": np.zeros((1, 16, 6, 8), np.float32)}
    samples = ksampler(model, k["seed"], 6, 4.5, k["sampler_name"], k["scheduler"], positive, negative, latent)
    vae = pipe.load_checkpoint(SD35_CKPT).vae
    image = (np.clip(vae.decode(samples["samples"])[0], 0, 1) * 255.0 + 0.5).astype(np.uint8)
    got = saved_image(result, tmp_path / "out")
    assert np.abs(got.astype(int) - image.astype(int)).max() <= 1
    assert pipe.load_checkpoint(SD35_CKPT).model.model_sampling.shift == 3.0


@pytest.mark.parametrize("example, ckpt", [("flux-dev.json", None), ("flux-schnell.json", None),
                                           ("sd3.5.json", SD35_CKPT)])
def test_examples_run_through_ksampler_rt_run(tmp_path, capsys, example, ckpt):
    workflow = load(example)
    sampler, latent = ("3", "53") if ckpt else ("31", "27")
    args = ["run", str(EXAMPLES / example), "--out", str(tmp_path), "--input", str(tmp_path),
            "--fake-checkpoint", ckpt or "tiny-sd15", "--set", f"{latent}.width=64", "--set", f"{latent}.height=64",
            "--set", f"{sampler}.steps=3"]
    assert main(args) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    prefix = next(n["inputs"]["filename_prefix"] for n in workflow.values() if n["class_type"] == "SaveImage")
    assert printed == [tmp_path / f"{prefix}_00001_.png"]
    assert Image.open(printed[0]).size == (64, 64)


def test_example_through_run_without_stand_ins_names_the_problem(tmp_path, capsys):
    rc = main(["run", str(EXAMPLES / "flux-dev.json"), "--out", str(tmp_path), "--models", str(tmp_path)])
    assert rc == 2
    assert "unet_name" in capsys.readouterr().err


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_examples_run_through_the_servers_prompt_route(tmp_path):
    pytest.importorskip("aiohttp")
    pytest.importorskip("prometheus_client")
    from ksampler_rt.serve.server import PromptServer, ServerConfig, ServerThread

    pipe = fake_pipeline(("tiny-sd15", SD35_CKPT), output_dir=tmp_path / "out", input_dir=tmp_path / "in",
                         temp_dir=tmp_path / "temp")
    thread = ServerThread(PromptServer(ServerConfig(host="127.0.0.1", port=0), pipeline=pipe)).start()
    try:
        info = _get(thread.url + "/object_info")
        assert info["UNETLoader"]["display_name"] == "Load Diffusion Model"
        assert info["FluxGuidance"]["category"] == "advanced/conditioning/flux"
        assert info["TripleCLIPLoader"]["input"]["required"]["clip_name3"][0] == [
            "clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"]
        ids = {}
        for example, (sampler, latent) in {"flux-dev.json": ("31", "27"), "flux-schnell.json": ("31", "27"),
                                           "sd3.5.json": ("3", "53")}.items():
            prompt = small(load(example), sampler, latent, steps=2)
            ids[example] = _post(thread.url + "/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.monotonic() + 60
        done = {}
        while len(done) < len(ids) and time.monotonic() < deadline:
            for example, prompt_id in ids.items():
                history = _get(thread.url + f"/history/{prompt_id}")
                if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                    done[example] = history[prompt_id]
            time.sleep(0.05)
        assert set(done) == set(ids)
        for example, entry in done.items():
            assert entry["status"]["status_str"] == "success", (example, entry["status"])
            images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
            assert len(images) == 1 and (tmp_path / "out" / images[0]["filename"]).is_file()
    finally:
        thread.stop()


# -- previews ---------------------------------------------------------------------------------------
def test_previews_use_the_16_channel_factors_of_each_latent_format():
    latent = np.zeros((1, 16, 2, 2), np.float32)
    latent[0, 0] = 1.0
    for family, first_row, bias in (("sd3", [-0.0922, -0.0175, 0.0749], [0.2394, 0.2135, 0.1925]),
                                    ("flux", [-0.0346, 0.0244, 0.0681], [-0.0329, -0.0718, -0.0851])):
        factors = latent_rgb_factors(family)
        assert factors[0].shape == (16, 3)
        expected = (np.clip((np.array(first_row) + np.array(bias) + 1.0) / 2.0, 0, 1) * 255.0).astype(np.uint8)
        np.testing.assert_array_equal(latent_to_rgb(latent, factors)[0, 0], expected)
    assert latent_rgb_factors("flux-schnell") is latent_rgb_factors("flux")
    # a 16-channel latent of unknown family (UNETLoader's MODEL names no checkpoint): FLUX.1's factors
    np.testing.assert_array_equal(latent_to_rgb(latent, latent_rgb_factors(None)),
                                  latent_to_rgb(latent, latent_rgb_factors("flux")))


def test_ui_format_flux_graph_maps_widgets_like_comfyuis_frontend(pipe):
    """The frontend's saved workflow (widgets_values in INPUT_TYPES order, seed's control widget after it,
    DualCLIPLoader's optional device widget last) becomes the API example's prompt."""
    from ksampler_rt.workflow.graph import load_workflow

    api = load("flux-dev.json")
    widgets = {"12": ["flux1-dev.safetensors", "default"],
               "11": ["t5xxl_fp16.safetensors", "clip_l.safetensors", "flux", "default"],
               "10": ["ae.safetensors"], "6": [api["6"]["inputs"]["text"]], "33": [""], "35": [3.5],
               "27": [1024, 1024, 1], "31": [972054013131368, "fixed", 20, 1, "euler", "simple", 1],
               "8": [], "9": ["flux_dev"]}
    links, nodes = [], []
    for node_id, node in api.items():
        spec = pipe.specs[node["class_type"]]
        inputs = []
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), len(inputs),
                              pipe.specs[api[value[0]]["class_type"]].outputs[value[1]]])
                inputs.append({"name": name, "type": spec.inputs[name].type, "link": len(links)})
        nodes.append({"id": int(node_id), "type": node["class_type"], "inputs": inputs, "mode": 0,
                      "outputs": [{"name": t, "type": t, "links": []} for t in spec.outputs],
                      "widgets_values": widgets[node_id]})
    ui = {"last_node_id": 35, "last_link_id": len(links), "nodes": nodes, "links": links, "version": 0.4}
    prompt = load_workflow(ui, pipe.specs)
    for node_id, node in api.items():
        got = dict(prompt[node_id]["inputs"])
        if node["class_type"] == "DualCLIPLoader":
            assert got.pop("device") == "default"
        assert got == node["inputs"], node_id
