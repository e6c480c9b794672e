"""SD3.5 / FLUX.1: tiny models (deterministic, loadable by diffusers' pipelines), their ONNX export, and Euler
through ksampler-rt's runtime on the exported transformer against diffusers' StableDiffusion3Pipeline /
FluxPipeline on the same weights and sigmas (the independent reference for packing, position ids, timestep
and guidance scales, pooled vectors)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from ksampler_rt.export import tiny  # noqa: E402
from ksampler_rt.export.errors import ExportError  # noqa: E402
from ksampler_rt.workflow.flow_text import sd3_conditioning  # noqa: E402
from ksampler_rt.export.manifest import REQUIRED_KEYS, read_manifest  # noqa: E402
from ksampler_rt.export.onnx_export import export_model  # noqa: E402

FAMILIES = ("sd3", "flux", "flux-schnell")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_flow_dir):
    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp("flow-exp") / family
            export_model(str(tiny_flow_dir(family)), str(out))
            cache[family] = str(out)
        return cache[family]
    return get


def _pipeline(family, path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_flow_model_deterministic_and_runs_in_diffusers(tmp_path, tiny_flow_dir, family):
    first = tiny_flow_dir(family)
    again = tiny.make_tiny_model(tmp_path / "again", family, seed=0)
    a, b = _tree(first), _tree(again)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    other = tiny.make_tiny_model(tmp_path / "seed1", family, seed=1)
    assert _tree(other)["transformer/diffusion_pytorch_model.safetensors"] != \
        a["transformer/diffusion_pytorch_model.safetensors"]
    info = json.loads(a["tiny_fixture.json"])
    vae = json.loads(a["vae/config.json"])
    assert vae["latent_channels"] == 16
    assert (vae["scaling_factor"], vae["shift_factor"]) == ((1.5305, 0.0609) if family == "sd3" else (0.3611, 0.1159))
    assert info["family"] == family

    pipe = _pipeline(family, str(first))
    kw = {"guidance_scale": 0.0} if family == "flux-schnell" else {"guidance_scale": 3.5}
    img = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    assert img.std() > 0.01  # not a constant image
    # the locally built T5 tokenizer: T5's ids (</s> = 1 closes the text, <pad> = 0 pads) and no <unk> for
    # plain English
    tok = pipe.tokenizer_3 if family == "sd3" else pipe.tokenizer_2
    ids = tok("a red apple on a wooden table", padding="max_length", max_length=16).input_ids
    assert 2 not in ids and ids[ids.index(1) + 1:] == [0] * (16 - ids.index(1) - 1)
    assert tok.decode(ids, skip_special_tokens=True) == "a red apple on a wooden table"


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_export_manifest_and_validation(exported, tiny_flow_dir, family):
    out = exported(family)
    m = read_manifest(out)
    for k in REQUIRED_KEYS:
        assert k in m
    names = {"sd3": ["transformer", "clip_l", "clip_g", "t5xxl", "vae_decoder", "vae_encoder"]}.get(
        family, ["transformer", "clip_l", "t5xxl", "vae_decoder", "vae_encoder"])
    assert list(m["models"]) == names
    assert m["family"] == family and m["prediction"] == "const" and m["latent_channels"] == 16
    assert (m["latent_scale"], m["latent_shift"]) == ((1.5305, 0.0609) if family == "sd3" else (0.3611, 0.1159))
    assert m["guidance"] is (family == "flux")
    for name, info in m["models"].items():
        v = info["validation"]
        assert v["max_rel_err"] < 1e-4, (name, v)
        assert len(v["shapes"]) == 2 and v["shapes"][0] != v["shapes"][1]
        sess = ort.InferenceSession(os.path.join(out, info["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [i["name"] for i in info["inputs"]]
    # the transformer's inputs are exactly the runtime unet callable's arguments
    tin = [i["name"] for i in m["models"]["transformer"]["inputs"]]
    assert tin == ["x", "timestep", "context", "y"] + (["guidance"] if family == "flux" else [])
    tes = {t["name"]: t for t in m["text_encoders"]}
    assert tes["t5xxl"]["max_length"] == {"sd3": 256, "flux": 512, "flux-schnell": 256}[family]
    for t in tes.values():
        assert os.path.isdir(os.path.join(out, t["tokenizer"]))
    assert os.path.isfile(os.path.join(out, tes["t5xxl"]["tokenizer"], "tokenizer.json"))
    assert tes["clip_l"]["pooled_projected"] is False  # ComfyUI: return_projected_pooled=False
    if family == "sd3":
        assert tes["clip_g"]["pooled_projected"] is True
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n]


def test_flow_export_family_mismatch(tmp_path, tiny_flow_dir, tiny_sd15_dir):
    with pytest.raises(ExportError, match="--family: received flux"):
        export_model(str(tiny_flow_dir("sd3")), str(tmp_path / "x"), family="flux")
    with pytest.raises(ExportError, match="--family: received sd3"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "y"), family="sd3")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


class _OrtTransformer:
    """The runtime's unet callable over transformer.onnx (inputs named as the runtime's arguments)."""

    def __init__(self, path):
        self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, x, timestep, context, **kwargs):
        feeds = {"x": x, "timestep": timestep, "context": context, **kwargs}
        return self.sess.run(None, {k: np.ascontiguousarray(feeds[k], dtype=np.float32) for k in self.names})[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_matches_diffusers_pipeline(exported, tiny_flow_dir, family):
    """Euler on the exported transformer through Model + CFGDenoiser (ComfyUI's conventions) vs the diffusers
    pipeline's own loop, same weights, same initial latents, same sigma list; fp32, rel L2 <= 1e-4."""
    from ksampler_rt.runtime.cfg import CFGDenoiser
    from ksampler_rt.runtime.model import Model
    from ksampler_rt.runtime.samplers.classic import sample_euler

    pipe = _pipeline(family, str(tiny_flow_dir(family)))
    tcfg = pipe.transformer.config
    g = torch.Generator().manual_seed(7)
    height, width, steps, b = 64, 96, 4, 1
    h, w = height // 8, width // 8
    ctx = torch.randn(b, 40, tcfg.joint_attention_dim, generator=g)
    pooled = torch.randn(b, tcfg.pooled_projection_dim, generator=g)
    noise = torch.randn(b, 16, h, w, generator=g)
    if family == "sd3":
        cfg = 2.5
        nctx = torch.randn(b, 40, tcfg.joint_attention_dim, generator=g)
        npooled = torch.randn(b, tcfg.pooled_projection_dim, generator=g)
        res = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=nctx,
                   negative_pooled_prompt_embeds=npooled, guidance_scale=cfg, num_inference_steps=steps,
                   height=height, width=width, latents=noise, output_type="latent")
        ref = res.images
        positive = [(ctx.numpy(), {"pooled_output": pooled.numpy()})]
        negative = [(nctx.numpy(), {"pooled_output": npooled.numpy()})]
    else:
        cfg = 1.0  # FLUX: no classifier-free guidance; dev takes the distilled guidance value instead
        packed = pipe._pack_latents(noise, b, 16, h, w)
        kw = {"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 0.0}
        res = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, num_inference_steps=steps, height=height,
                   width=width, latents=packed, output_type="latent", **kw)
        ref = pipe._unpack_latents(res.images, height, width, pipe.vae_scale_factor)
        opts = {"pooled_output": pooled.numpy()}
        if family == "flux":
            opts["guidance"] = 3.5
        positive, negative = [(ctx.numpy(), opts)], []
    sigmas = pipe.scheduler.sigmas.numpy().astype(np.float32)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0.0 and sigmas[0] > 0.5
    model = Model(_OrtTransformer(os.path.join(exported(family), "transformer.onnx")), family=family)
    den = CFGDenoiser(model, positive, negative, cfg, b, (h, w), sigmas=sigmas)
    x = sample_euler(den, noise.numpy().copy(), sigmas, None)
    ref = ref.detach().numpy()
    rel = float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
    moved = float(np.linalg.norm(ref - noise.numpy()) / np.linalg.norm(noise.numpy()))
    assert moved > 0.05  # the sampler did something the comparison can see
    assert rel <= 1e-4, rel


def test_sd3_conditioning_matches_diffusers_encode_prompt(exported, tiny_flow_dir):
    """flow_text.sd3_conditioning over the exported CLIP-L / CLIP-G / T5 ONNX outputs == diffusers'
    StableDiffusion3Pipeline.encode_prompt (penultimate CLIP layers, pad to T5 width, T5 on the token axis)."""
    out = exported("sd3")
    pipe = _pipeline("sd3", str(tiny_flow_dir("sd3")))
    prompt = "a castle on a hill near the sea"
    with torch.no_grad():
        ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                       max_sequence_length=64)
    ids = {}
    for name, tok in (("clip_l", pipe.tokenizer), ("clip_g", pipe.tokenizer_2)):
        ids[name] = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    ids["t5xxl"] = pipe.tokenizer_3(prompt, padding="max_length", max_length=64, truncation=True,
                                    return_tensors="np").input_ids
    outs = {}
    for name in ids:
        sess = ort.InferenceSession(os.path.join(out, f"{name}.onnx"), providers=["CPUExecutionProvider"])
        outs[name] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": ids[name]})))
    ctx, pooled = sd3_conditioning(outs["clip_l"]["penultimate_hidden_state"], outs["clip_l"]["pooled_output"],
                                   outs["clip_g"]["penultimate_hidden_state"], outs["clip_g"]["pooled_output"],
                                   outs["t5xxl"]["last_hidden_state"])
    assert ctx.shape == tuple(ref_ctx.shape) == (1, 77 + 64, 256)
    np.testing.assert_allclose(ctx, ref_ctx.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled, ref_pooled.numpy(), rtol=1e-4, atol=1e-5)


def test_flux_fp16_export_precisions(tmp_path, tiny_flow_dir):
    """--precision fp16: the transformer in fp16 (timestep / guidance embedded from float32, as ComfyUI does, so
    it stays within 5e-3 of torch fp32 here), T5 and the FLUX VAE kept in fp32."""
    m = export_model(str(tiny_flow_dir("flux")), str(tmp_path / "fp16"), precision="fp16",
                     models=["transformer", "t5xxl", "vae_decoder"])
    assert {n: e["precision"] for n, e in m["models"].items()} == {"transformer": "fp16", "t5xxl": "fp32",
                                                                 "vae_decoder": "fp32"}
    assert m["models"]["transformer"]["validation"]["max_rel_err"] < 5e-3
    assert "fp32" in m["models"]["t5xxl"]["notes"]
    assert m["complete"] is False
