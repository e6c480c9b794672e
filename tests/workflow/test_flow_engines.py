"""The FLUX.1 dev / schnell and SD3.5 example graphs on exported engines (issue: SD3.5 and FLUX.1 on engines).

Each graph runs unchanged (only the size and step count made small) on the tiny exported models, registered
under the names the graphs use, on ``onnxruntime-cpu`` and ``openvino-cpu``; the reference is the same graph
with the *torch* networks (the export's own wrappers around the diffusers modules, fp32) behind the same
ksampler-rt runtime, so what is compared is everything the engines do. The runtime's model plumbing itself is
checked against diffusers' pipelines in tests/export/test_flow.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from ksampler_rt.engines.loader import EngineSet  # noqa: E402
from ksampler_rt.engines.manifest import load_manifest  # noqa: E402
from ksampler_rt.engines.spec import TensorSpec  # noqa: E402
from ksampler_rt.workflow.pipeline import Pipeline  # noqa: E402
from ksampler_rt.workflow.registry import ModelRegistry  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"
# graph -> (family, sampler node, latent node, names the graph's loaders use: folder -> names)
GRAPHS = {
    "flux-dev.json": ("flux", "31", "27", {"diffusion_models": ["flux1-dev.safetensors"],
                                           "text_encoders": ["t5xxl_fp16.safetensors", "clip_l.safetensors"],
                                           "vae": ["ae.safetensors"]}),
    "flux-schnell.json": ("flux-schnell", "31", "27", {"diffusion_models": ["flux1-schnell.safetensors"],
                                                       "text_encoders": ["t5xxl_fp16.safetensors",
                                                                         "clip_l.safetensors"],
                                                       "vae": ["ae.safetensors"]}),
    "sd3.5.json": ("sd3", "3", "53", {"checkpoints": ["sd3.5_large.safetensors"],
                                      "text_encoders": ["clip_l.safetensors", "clip_g.safetensors",
                                                        "t5xxl_fp16.safetensors"]}),
}
BACKENDS = ["onnxruntime-cpu", "openvino-cpu"]


@pytest.fixture(scope="module")
def flow_exports(tmp_path_factory):
    """family -> (diffusers folder, export dir, models dir with the graph's names registered)."""
    from ksampler_rt.export.onnx_export import export_model
    from ksampler_rt.export.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("flow-engines")
    out = {}
    for example, (family, _, _, names) in GRAPHS.items():
        src = make_tiny_model(root / f"src-{family}", family, seed=0)
        exp = root / f"exp-{family}"
        export_model(str(src), str(exp))
        registry = ModelRegistry(root / f"models-{family}")
        for folder, entries in names.items():
            for name in entries:
                registry.register(name, exp, folder)
        out[example] = (Path(src), exp, registry.root)
    return out


def small_graph(example: str, steps: int = 3) -> dict:
    family, sampler, latent, _ = GRAPHS[example]
    prompt = json.loads((EXAMPLES / example).read_text())
    prompt[latent]["inputs"].update(width=64, height=48)
    prompt[sampler]["inputs"]["steps"] = steps
    return prompt


class TorchEngine:
    """An export's torch wrapper (what was exported, fp32) behind the Engine call convention."""

    def __init__(self, spec):
        self.module = spec.reference.eval()
        self.inputs = [TensorSpec.from_json(s) for s in spec.inputs]
        self.outputs = [TensorSpec.from_json(s) for s in spec.outputs]
        self.output_names = [s.name for s in self.outputs]
        self.calls = 0

    def __call__(self, **feeds):
        self.calls += 1
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.inputs]
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().numpy() for n, o in zip(self.output_names, out)}

    def load(self):
        return self

    def release(self):
        pass


def torch_engines(sources: dict):
    """A ``load_engines`` replacement serving the torch networks of the exports in ``sources``."""
    from ksampler_rt.export.flow_export import build_flow_specs, load_flow_source

    built = {}

    def load_engines(export_dir, backend="auto", options=None, *, models=None, log=None, **kw):
        export_dir = Path(export_dir).resolve()
        if export_dir not in built:
            manifest = load_manifest(export_dir)
            src = load_flow_source(str(sources[export_dir]), manifest.family)
            built[export_dir] = (manifest, {s.name: TorchEngine(s) for s in build_flow_specs(src, "fp32")})
        manifest, engines = built[export_dir]
        wanted = models if models is not None else list(engines)
        return EngineSet(manifest, "torch", **{n: engines[n] for n in wanted})
    return load_engines


def run_graph(models_dir: Path, backend: str, prompt: dict, out_dir: Path):
    pipe = Pipeline(models_dir, backend=backend, output_dir=out_dir, input_dir=out_dir, log=None)
    try:
        result = pipe.run_workflow(prompt)
        return result, pipe
    finally:
        pipe.release()


def latent_and_image(result, sampler: str, decode_node: str = "8"):
    return result.outputs[sampler][0]["samples"], result.outputs[decode_node][0]


@pytest.mark.parametrize("example", list(GRAPHS))
def test_example_graph_on_engines_matches_the_torch_networks(flow_exports, tmp_path, monkeypatch, example):
    src, exp, models_dir = flow_exports[example]
    family, sampler, _, _ = GRAPHS[example]
    prompt = small_graph(example)
    got = {}
    for backend in BACKENDS:
        result, _ = run_graph(models_dir, backend, prompt, tmp_path / backend)
        got[backend] = latent_and_image(result, sampler)
    import ksampler_rt.engines as engines_pkg

    monkeypatch.setattr(engines_pkg, "load_engines", torch_engines({exp.resolve(): src}))
    result, _ = run_graph(models_dir, "onnxruntime-cpu", prompt, tmp_path / "torch")
    ref_latent, ref_image = latent_and_image(result, sampler)
    assert ref_latent.shape == (1, 16, 6, 8)
    assert float(ref_latent.std()) > 0.1 and float(ref_image.std()) > 0.01  # not a degenerate picture
    for backend, (latent, image) in got.items():
        rel = np.linalg.norm(latent - ref_latent) / np.linalg.norm(ref_latent)
        assert rel <= 1e-4, f"{example} on {backend}: latent rel L2 {rel:.2e} against the torch networks"
        assert np.abs(image - ref_image).max() <= 1e-3, f"{example} on {backend}: decoded image differs"


def test_flux_prompt_weights_and_guidance_reach_the_engines(flow_exports, tmp_path):
    """A weighted T5 prompt changes the context (ComfyUI's weighting against the empty sequence), the
    FluxGuidance value reaches the transformer's guidance input."""
    _, _, models_dir = flow_exports["flux-dev.json"]
    prompt = small_graph("flux-dev.json", steps=1)
    pipe = Pipeline(models_dir, backend="onnxruntime-cpu", output_dir=tmp_path, input_dir=tmp_path, log=None)
    try:
        base = pipe.run_workflow(prompt).outputs["31"][0]["samples"]
        prompt["35"]["inputs"]["guidance"] = 9.0
        other = pipe.run_workflow(prompt).outputs["31"][0]["samples"]
        assert not np.allclose(base, other)
        clip = pipe.load_component("text_encoders", ("t5xxl_fp16.safetensors", "clip_l.safetensors"),
                                   {"type": "flux"}).value
        plain = clip.encode("a red apple")[0][0]
        weighted = clip.encode("a (red:1.5) apple")[0][0]
        assert plain.shape == weighted.shape == (1, 256, plain.shape[-1])  # T5 padded to 256 tokens, as ComfyUI
        assert not np.allclose(plain, weighted)
    finally:
        pipe.release()


def test_component_loaders_refuse_the_wrong_export(flow_exports, tmp_path):
    _, exp, models_dir = flow_exports["flux-dev.json"]
    registry = ModelRegistry(models_dir)
    registry.register("whole-export.safetensors", exp, "diffusion_models")
    pipe = Pipeline(models_dir, backend="onnxruntime-cpu", output_dir=tmp_path, input_dir=tmp_path, log=None)
    try:
        model = pipe.load_component("diffusion_models", ("whole-export.safetensors",), {}).value
        assert model.family.name == "flux"  # a whole export serves UNETLoader with its transformer
        with pytest.raises(ValueError, match="clip_name: received 'nothing'"):
            pipe.load_component("text_encoders", ("nothing",), {"type": "flux"})
    finally:
        pipe.release()


def test_register_puts_each_export_where_its_loader_looks(flow_exports, tmp_path):
    from ksampler_rt.workflow.registry import folder_for_export

    _, exp, _ = flow_exports["flux-dev.json"]
    manifest = json.loads((exp / "manifest.json").read_text())
    assert folder_for_export(manifest) == "checkpoints"
    assert folder_for_export({**manifest, "models": {"transformer": {}}}) == "diffusion_models"
    assert folder_for_export({**manifest, "models": {"clip_l": {}, "t5xxl": {}}}) == "text_encoders"
    assert folder_for_export({**manifest, "models": {"vae_decoder": {}, "vae_encoder": {}}}) == "vae"
    assert folder_for_export({"kind": "controlnet", "models": {"controlnet": {}}}) == "controlnet"
    with pytest.raises(ValueError, match="export_dir: received an export of"):
        folder_for_export({"models": {"clip_l": {}, "vae_decoder": {}}})


def test_flux_schnell_graph_through_ksampler_rt_run_on_exports(flow_exports, tmp_path, capsys):
    from PIL import Image

    from ksampler_rt.cli import main

    _, _, models_dir = flow_exports["flux-schnell.json"]
    args = ["run", str(EXAMPLES / "flux-schnell.json"), "--models", str(models_dir), "--backend", "openvino-cpu",
            "--out", str(tmp_path), "--input", str(tmp_path), "--set", "27.width=64", "--set", "27.height=48",
            "--set", "31.steps=2"]
    assert main(args) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert printed == [tmp_path / "flux_schnell_00001_.png"]
    assert Image.open(printed[0]).size == (64, 48)


def test_sd35_graph_through_the_servers_prompt_route_on_exports(flow_exports, tmp_path):
    pytest.importorskip("aiohttp")
    pytest.importorskip("prometheus_client")
    from tests.workflow.prompt_server import prompt_server

    _, _, models_dir = flow_exports["sd3.5.json"]
    pipe = Pipeline(models_dir, backend="onnxruntime-cpu", output_dir=tmp_path / "out", input_dir=tmp_path,
                    log=None)
    try:
        with prompt_server(pipe) as server:
            assert {"diffusion_models", "text_encoders", "vae", "controlnet"} <= set(server.call("/models"))
            assert server.call("/models/text_encoders") == ["clip_g.safetensors", "clip_l.safetensors",
                                                            "t5xxl_fp16.safetensors"]
            info = server.call("/object_info/TripleCLIPLoader")
            assert info["TripleCLIPLoader"]["input"]["required"]["clip_name1"][0] == [
                "clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"]
            entry = server.run(small_graph("sd3.5.json", steps=2))
        assert entry is not None and entry["status"]["status_str"] == "success", entry and entry["status"]
        images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
        assert len(images) == 1 and (tmp_path / "out" / images[0]["filename"]).is_file()
    finally:
        pipe.release()


def test_lora_on_components_loaded_by_unet_and_dual_clip_loaders(flow_exports, tmp_path):
    """LoraLoader on a MODEL from UNETLoader and a CLIP from DualCLIPLoader (separately registered exports)."""
    from ksampler_rt.export.tiny_flow import make_tiny_flow_lora
    from ksampler_rt.workflow.lora import load_lora

    _, _, models_dir = flow_exports["flux-dev.json"]
    lora_file = make_tiny_flow_lora(tmp_path / "flux-lora.safetensors", "flux", "kohya", 0)
    pipe = Pipeline(models_dir, backend="onnxruntime-cpu", output_dir=tmp_path, input_dir=tmp_path, log=None)
    try:
        model = pipe.load_component("diffusion_models", ("flux1-dev.safetensors",), {"weight_dtype": "default"}).value
        clip = pipe.load_component("text_encoders", ("t5xxl_fp16.safetensors", "clip_l.safetensors"),
                                   {"type": "flux"}).value
        same_model, same_clip = load_lora(model, clip, lora_file, 0.0, 0.0)
        assert same_model is model and same_clip is clip  # strength 0: the identity
        lora_model, lora_clip = load_lora(model, clip, lora_file, 1.0, 1.0)
        g = np.random.default_rng(0)
        x = g.standard_normal((1, 16, 6, 8), dtype=np.float32)
        ctx = g.standard_normal((1, 256, 256), dtype=np.float32)
        y = g.standard_normal((1, 64), dtype=np.float32)
        base = model.unet(x, np.float32(0.5), ctx, y=y, guidance=np.float32(3.5))
        patched = lora_model.unet(x, np.float32(0.5), ctx, y=y, guidance=np.float32(3.5))
        assert np.abs(patched - base).max() > 1e-3
        assert not np.allclose(lora_clip.encode("a red apple")[0][1]["pooled_output"],
                               clip.encode("a red apple")[0][1]["pooled_output"])
    finally:
        pipe.release()


def test_unet_loader_model_goes_through_the_batching_gate(flow_exports, tmp_path):
    """With step batching on, a MODEL from UNETLoader is gathered like a checkpoint's; the result is the same."""
    from ksampler_rt.runtime.batching import BatchingUNet

    _, _, models_dir = flow_exports["flux-schnell.json"]
    prompt = small_graph("flux-schnell.json", steps=2)
    solo, _ = run_graph(models_dir, "openvino-cpu", prompt, tmp_path / "solo")
    pipe = Pipeline(models_dir, backend="openvino-cpu", output_dir=tmp_path / "b", input_dir=tmp_path, log=None,
                    max_batch=2)
    try:
        batched = pipe.run_workflow(prompt)
        model = pipe.load_component("diffusion_models", ("flux1-schnell.safetensors",),
                                    {"weight_dtype": "default"}).value
        assert isinstance(model.unet, BatchingUNet)
        np.testing.assert_array_equal(batched.outputs["31"][0]["samples"], solo.outputs["31"][0]["samples"])
    finally:
        pipe.release()
