"""ControlNet on exported engines (issue: ControlNet and T2I-Adapter on engines).

* Latents against diffusers' ``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline`` on
  the same tiny weights (the diffusers folders the exports were made from) with the same sigmas: one
  ControlNet, ``controlnet_conditioning_scale`` with ``control_guidance_start/end``, two stacked. Our side is
  the checkpoint's engines (the UNet switching to ``unet_control`` while the ControlNet is active) and the
  ControlNet engine behind the runtime's ControlNet path. Tolerance rel L2 <= 1e-4 (fp32).
* The ControlNet example graph (API and UI format) through ``ksampler-rt run`` and ``/prompt`` on
  onnxruntime-cpu and openvino-cpu; LoRA on the UNet with the ControlNet on; the T2I-Adapter on engines.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from ksampler_rt.runtime import ksampler_advanced  # noqa: E402
from ksampler_rt.workflow.checkpoint import load_checkpoint  # noqa: E402
from ksampler_rt.workflow.control_engines import load_controlnet  # noqa: E402
from ksampler_rt.workflow.controlnet_nodes import controlnet_apply_advanced  # noqa: E402
from ksampler_rt.workflow.pipeline import Pipeline  # noqa: E402
from ksampler_rt.workflow.registry import ModelRegistry  # noqa: E402
from tests.export.controlnet_fixtures import tiny_controlnet_export, tiny_t2i_adapter_export  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"
STEPS, CFG = 4, 7.5
TIMESTEPS = [999, 749, 499, 249]  # ComfyUI's "simple" schedule of 4 steps on the SD / SDXL table
SCALE = {"sd15": 0.18215, "sdxl": 0.13025}
CKPT, CN = "sd15-control", "control_v11p_sd15_canny.safetensors"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``exports(family)``: (SD export, ControlNet export, diffusers folder), built once per session by
    ``tiny_controlnet_export`` (which caches them itself)."""
    root = tmp_path_factory.mktemp("cn-engines")
    return lambda family: tiny_controlnet_export(family, root)


@pytest.fixture(scope="module")
def models_dir(exports, tmp_path_factory):
    sd, cn, _ = exports("sd15")
    registry = ModelRegistry(tmp_path_factory.mktemp("cn-models"))
    registry.register(CKPT, sd)
    registry.register(CN, cn)
    return registry.root


def _inputs(family: str):
    rng = np.random.RandomState(7)
    width = {"sd15": 32, "sdxl": 96}[family]
    out = {"pos": rng.standard_normal((1, 6, width)).astype(np.float32),
           "neg": rng.standard_normal((1, 6, width)).astype(np.float32),
           "noise": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
           "image": (rng.randint(0, 256, (1, 64, 64, 3)) / 255.0).astype(np.float32)}
    if family == "sdxl":
        out["pos_pooled"] = rng.standard_normal((1, 64)).astype(np.float32)
        out["neg_pooled"] = rng.standard_normal((1, 64)).astype(np.float32)
    return out


def diffusers_latents(family, src: Path, inputs, applied):
    from diffusers import (ControlNetModel, EulerDiscreteScheduler, MultiControlNetModel,
                           StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline,
                           UNet2DConditionModel)

    unet = UNet2DConditionModel.from_pretrained(src / "unet", local_files_only=True).eval()
    net = ControlNetModel.from_pretrained(src / "controlnet", local_files_only=True).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="linspace")
    nets = [net] * len(applied)
    controlnet = MultiControlNetModel(nets) if len(nets) > 1 else nets[0]
    scheduler.set_timesteps(timesteps=TIMESTEPS)
    x0 = inputs["noise"] * np.float32(scheduler.sigmas[0])
    image = torch.from_numpy(np.moveaxis(inputs["image"], -1, 1).copy())
    one = len(applied) == 1
    kwargs = dict(prompt_embeds=torch.from_numpy(inputs["pos"]), negative_prompt_embeds=torch.from_numpy(inputs["neg"]),
                  image=image if one else [image] * len(applied), height=64, width=64, timesteps=TIMESTEPS,
                  guidance_scale=CFG, latents=torch.from_numpy(x0) / scheduler.init_noise_sigma, output_type="latent",
                  controlnet_conditioning_scale=applied[0][0] if one else [a[0] for a in applied],
                  control_guidance_start=[a[1] for a in applied], control_guidance_end=[a[2] for a in applied])
    if family == "sdxl":
        pipe = StableDiffusionXLControlNetPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=unet, controlnet=controlnet,
                                                   scheduler=scheduler, add_watermarker=False)
        kwargs.update(pooled_prompt_embeds=torch.from_numpy(inputs["pos_pooled"]),
                      negative_pooled_prompt_embeds=torch.from_numpy(inputs["neg_pooled"]))
    else:
        pipe = StableDiffusionControlNetPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                                 scheduler=scheduler, controlnet=controlnet, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(**kwargs)
    return out.images.numpy(), x0


def engine_latents(family, model, net, inputs, applied, x0):
    extra = lambda which: {"pooled_output": inputs[f"{which}_pooled"]} if family == "sdxl" else {}  # noqa: E731
    pos, neg = [[inputs["pos"], extra("pos")]], [[inputs["neg"], extra("neg")]]
    for strength, start, end in applied:
        pos, neg = controlnet_apply_advanced(None, "1", pos, neg, net, inputs["image"], strength, start, end)
    # the noised latent given to a no-noise KSamplerAdvanced (LATENT space: / scale)
    out = ksampler_advanced(model, "disable", 0, STEPS, CFG, "euler", "simple", pos, neg,
                            {"samples": x0 / np.float32(SCALE[family])}, 0, 10000, "disable")
    return out["samples"] * np.float32(SCALE[family])


def rel_l2(a, b):
    return float(np.linalg.norm(np.float64(a) - b) / np.linalg.norm(np.float64(b)))


def _registry_for(export_dir: Path, name: str, tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "models")
    registry.register(name, export_dir)
    return registry


@pytest.mark.parametrize("family, backend, applied", [
    ("sd15", "onnxruntime-cpu", [(1.0, 0.0, 1.0)]),
    ("sd15", "onnxruntime-cpu", [(0.6, 0.25, 0.75)]),                   # the window keeps steps 1 and 2 in both
    ("sd15", "openvino-cpu", [(0.6, 0.0, 1.0), (1.3, 0.25, 0.75)]),     # stacked: outputs summed
    ("sdxl", "onnxruntime-cpu", [(0.6, 0.25, 0.75)]),
    ("sdxl", "onnxruntime-cpu", [(0.6, 0.0, 1.0), (1.3, 0.25, 0.75)]),
], ids=["sd15-one", "sd15-scale-window", "sd15-stacked-openvino", "sdxl-scale-window", "sdxl-stacked"])
def test_controlnet_on_engines_matches_diffusers_pipeline(exports, tmp_path, family, backend, applied):
    sd, cn, src = exports(family)
    inputs = _inputs(family)
    want, x0 = diffusers_latents(family, src, inputs, applied)
    checkpoint = load_checkpoint(sd, backend, log=None)
    net = load_controlnet(_registry_for(cn, "cn", tmp_path), "cn", backend=backend, log=None)
    try:
        assert net.kind == "controlnet" and net.family == family
        got = engine_latents(family, checkpoint.model, net, inputs, applied, x0)
        plain = engine_latents(family, checkpoint.model, net, inputs, [(0.0, 0.0, 1.0)], x0)  # strength 0: none
        assert rel_l2(plain, want) > 1e-2  # the ControlNet matters at this scale
        assert rel_l2(got, want) <= 1e-4, f"rel L2 {rel_l2(got, want):.2e}"
        assert checkpoint.model.control_unet._engines is not None  # unet_control was loaded for the ControlNet
    finally:
        net.release()
        checkpoint.release()


def test_controlnet_for_another_family_is_refused(exports, tmp_path):
    sd, _, _ = exports("sd15")
    _, cn_xl, _ = exports("sdxl")
    checkpoint = load_checkpoint(sd, "onnxruntime-cpu", log=None)
    net = load_controlnet(_registry_for(cn_xl, "xl", tmp_path), "xl", backend="onnxruntime-cpu", log=None)
    try:
        with pytest.raises(ValueError, match="received a ControlNet for family 'sdxl', expected one for the model's "
                                             "family 'sd15'"):
            engine_latents("sd15", checkpoint.model, net, _inputs("sd15"), [(1.0, 0.0, 1.0)],
                           _inputs("sd15")["noise"])
    finally:
        net.release()
        checkpoint.release()


def test_controlnet_with_a_checkpoint_exported_without_control_inputs_names_the_fix(exports, tmp_path):
    from ksampler_rt.export.onnx_export import export_model

    _, cn, src = exports("sd15")
    plain_export = tmp_path / "plain"
    export_model(str(src), str(plain_export), models=["unet", "clip", "vae_decoder", "vae_encoder"])
    checkpoint = load_checkpoint(plain_export, "onnxruntime-cpu", log=None)
    net = load_controlnet(_registry_for(cn, "cn", tmp_path), "cn", backend="onnxruntime-cpu", log=None)
    try:
        with pytest.raises(ValueError, match="--control-inputs"):
            engine_latents("sd15", checkpoint.model, net, _inputs("sd15"), [(1.0, 0.0, 1.0)], _inputs("sd15")["noise"])
    finally:
        net.release()
        checkpoint.release()


def test_lora_keeps_working_with_the_controlnet_on(exports, tmp_path):
    """LoraLoader's MODEL runs its merged weights on the residual-taking UNet too: with the ControlNet at
    strength 0 the LoRA MODEL gives what it gives without any ControlNet, and the LoRA changes the result."""
    from ksampler_rt.export.tiny import make_tiny_lora
    from ksampler_rt.workflow.lora import load_lora

    sd, cn, _ = exports("sd15")
    checkpoint = load_checkpoint(sd, "onnxruntime-cpu", log=None)
    net = load_controlnet(_registry_for(cn, "cn", tmp_path), "cn", backend="onnxruntime-cpu", log=None)
    try:
        inputs = _inputs("sd15")
        lora_model, _ = load_lora(checkpoint.model, None, make_tiny_lora(tmp_path / "l.safetensors"), 1.0, 0.0)
        x0 = inputs["noise"] * np.float32(14.6)
        base_cn = engine_latents("sd15", checkpoint.model, net, inputs, [(1.0, 0.0, 1.0)], x0)
        lora_cn = engine_latents("sd15", lora_model, net, inputs, [(1.0, 0.0, 1.0)], x0)
        lora_zero = engine_latents("sd15", lora_model, net, inputs, [(1e-30, 0.0, 1.0)], x0)
        lora_plain = engine_latents("sd15", lora_model, net, inputs, [(0.0, 0.0, 1.0)], x0)
        assert rel_l2(lora_cn, base_cn) > 1e-3  # the LoRA acts on the residual-taking UNet
        assert rel_l2(lora_zero, lora_plain) < 1e-5  # same merged weights on both UNet engines
    finally:
        net.release()
        checkpoint.release()


def _graph_dirs(tmp_path: Path) -> tuple[Path, Path]:
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    shutil.copy(EXAMPLES / "apple-256.png", inp / "apple-256.png")
    return inp, out


@pytest.mark.parametrize("example, backend", [("controlnet.json", "onnxruntime-cpu"),
                                              ("controlnet.ui.json", "openvino-cpu"),
                                              ("controlnet.ui.json", "onnxruntime-cpu")])
def test_controlnet_graph_through_ksampler_rt_run(models_dir, tmp_path, capsys, example, backend):
    from PIL import Image

    from ksampler_rt.cli import main

    inp, out = _graph_dirs(tmp_path)
    args = ["run", str(EXAMPLES / example), "--models", str(models_dir), "--backend", backend, "--out", str(out),
            "--input", str(inp), "--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=3"]
    assert main(args) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert printed == [out / "controlnet_00001_.png"]
    assert Image.open(printed[0]).size == (64, 64)


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "openvino-cpu"])
def test_controlnet_graph_changes_the_image_and_runs_over_prompt(models_dir, tmp_path, backend):
    pytest.importorskip("aiohttp")
    pytest.importorskip("prometheus_client")
    from tests.workflow.prompt_server import prompt_server

    inp, out = _graph_dirs(tmp_path)
    prompt = json.loads((EXAMPLES / "controlnet.json").read_text())
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"]["steps"] = 3
    pipe = Pipeline(models_dir, backend=backend, output_dir=out, input_dir=inp, log=None)
    try:
        with prompt_server(pipe) as server:
            assert server.call("/models/controlnet") == [CN]
            info = server.call("/object_info/ControlNetLoader")["ControlNetLoader"]
            assert info["input"]["required"]["control_net_name"][0] == [CN]
            entry = server.run(prompt)
        assert entry is not None and entry["status"]["status_str"] == "success", entry and entry["status"]
        with_cn = pipe.run_workflow(prompt).outputs["3"][0]["samples"]
        prompt["12"]["inputs"]["strength"] = 0.0
        without = pipe.run_workflow(prompt).outputs["3"][0]["samples"]
        assert rel_l2(with_cn, without) > 1e-3
    finally:
        pipe.release()


def test_t2i_adapter_on_engines_changes_the_result_and_is_deterministic(exports, tmp_path):
    sd, _, _ = exports("sd15")
    adapter_export = tiny_t2i_adapter_export("sd15", tmp_path)
    checkpoint = load_checkpoint(sd, "onnxruntime-cpu", log=None)
    adapter = load_controlnet(_registry_for(adapter_export, "ad", tmp_path), "ad", backend="onnxruntime-cpu",
                              log=None)
    try:
        assert adapter.kind == "t2i_adapter" and adapter.family == "sd15"
        inputs = _inputs("sd15")
        x0 = inputs["noise"] * np.float32(14.6)
        with_ad = engine_latents("sd15", checkpoint.model, adapter, inputs, [(1.0, 0.0, 1.0)], x0)
        again = engine_latents("sd15", checkpoint.model, adapter, inputs, [(1.0, 0.0, 1.0)], x0)
        without = engine_latents("sd15", checkpoint.model, adapter, inputs, [(0.0, 0.0, 1.0)], x0)
        np.testing.assert_array_equal(with_ad, again)
        assert rel_l2(with_ad, without) > 1e-3
    finally:
        adapter.release()
        checkpoint.release()


def test_engine_control_attributes_follow_comfyui(exports, tmp_path):
    """ComfyUI's load_controlnet: *_shuffle files pool globally; T2I-Adapters unshuffle by 8 (16 for SDXL's)
    and take the image's channels."""
    _, cn, _ = exports("sd15")
    registry = ModelRegistry(tmp_path / "models")
    registry.register("control_v11e_sd15_shuffle.safetensors", cn)
    registry.register("control_v11p_sd15_canny.safetensors", cn)
    shuffle = load_controlnet(registry, "control_v11e_sd15_shuffle.safetensors", backend="onnxruntime-cpu", log=None)
    canny = load_controlnet(registry, "control_v11p_sd15_canny.safetensors", backend="onnxruntime-cpu", log=None)
    adapter = load_controlnet(_registry_for(tiny_t2i_adapter_export("sd15", tmp_path), "ad", tmp_path / "a"), "ad",
                              backend="onnxruntime-cpu", log=None)
    try:
        assert shuffle.global_average_pooling and not canny.global_average_pooling
        assert (adapter.unshuffle_amount, adapter.channels_in) == (8, 3)
    finally:
        for n in (shuffle, canny, adapter):
            n.release()


def test_a_controlnet_for_another_family_fails_validation_before_any_engine(exports, tmp_path):
    from ksampler_rt.workflow.graph import WorkflowError

    sd, _, _ = exports("sd15")
    _, cn_xl, _ = exports("sdxl")
    registry = ModelRegistry(tmp_path / "models")
    registry.register(CKPT, sd)
    registry.register("xl-canny.safetensors", cn_xl)
    prompt = json.loads((EXAMPLES / "controlnet.json").read_text())
    prompt["11"]["inputs"]["control_net_name"] = "xl-canny.safetensors"
    inp, out = _graph_dirs(tmp_path)
    pipe = Pipeline(registry.root, backend="onnxruntime-cpu", output_dir=out, input_dir=inp, log=None)
    with pytest.raises(WorkflowError, match="received a ControlNet for family 'sdxl', expected one for the model's "
                                            "family 'sd15'"):
        pipe.prepare(prompt)
    assert not pipe._checkpoints  # nothing was loaded
    registry.register("sd15-canny.safetensors", exports("sd15")[1])
    prompt["11"]["inputs"]["control_net_name"] = "sd15-canny.safetensors"
    pipe.prepare(prompt)  # the matching one validates
