"""The engine pipeline against the same computation on the tiny model's diffusers / transformers
torch modules: CLIP conditioning with ComfyUI's layer and weighting rules written out in torch,
the KSampler driven by the torch UNet, and the VAE."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ksampler_rt.runtime import Model, ksampler

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"


@pytest.fixture(scope="module")
def torch_sd15(tiny_sd15):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = tiny_sd15.source
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny modules run 30x slower with every core fighting over them
    yield SimpleNamespace(unet=UNet2DConditionModel.from_pretrained(src / "unet").eval(),
                          vae=AutoencoderKL.from_pretrained(src / "vae").eval(),
                          text=CLIPTextModel.from_pretrained(src / "text_encoder").eval())
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engines(pipeline):
    return pipeline.load_checkpoint("tiny-sd15")


def torch_conditioning(text_model, tokenizer, text: str, layer: int | None = None):
    """ComfyUI's ClipTokenWeightEncoder.encode_token_weights + SDClipModel, on transformers' CLIPTextModel."""
    chunks = tokenizer.tokenize_with_weights(text)
    ids = [[t.id for t in chunk] for chunk in chunks]
    weighted = any(t.weight != 1.0 for chunk in chunks for t in chunk)
    if weighted:  # gen_empty_tokens: [start, end, pad...]
        ids.append([tokenizer.start_token, tokenizer.end_token] + [tokenizer.pad_token] * 75)
    with torch.no_grad():
        out = text_model(torch.tensor(ids), output_hidden_states=True)
        if layer is None or abs(layer) > text_model.config.num_hidden_layers:
            z = out.last_hidden_state.clone()
        else:  # layer="hidden": that layer's output, then the final layer norm (SD1.x layer_norm_hidden_state)
            final_norm = getattr(text_model, "text_model", text_model).final_layer_norm
            z = final_norm(out.hidden_states[layer]).clone()
        if weighted:
            z_empty = z[-1]
            for k, chunk in enumerate(chunks):
                for j, t in enumerate(chunk):
                    if t.weight != 1.0:
                        z[k, j] = (z[k, j] - z_empty[j]) * t.weight + z_empty[j]
    cond = torch.cat([z[k:k + 1] for k in range(len(chunks))], dim=-2)
    return [[cond.numpy(), {"pooled_output": out.pooler_output[0:1].numpy()}]]


def torch_unet(unet):
    def call(x, timestep, context, **kwargs):
        with torch.no_grad():
            return unet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(timestep, np.float32)),
                        encoder_hidden_states=torch.from_numpy(np.ascontiguousarray(context))).sample.numpy()
    return call


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("text", [
    "a red apple on a wooden table, studio light",
    "a (red:1.4) apple on a ((wooden)) table, (studio light:0.6)",
    "(masterpiece:1.2), best quality, " * 10 + "a red apple",   # three 77-token chunks, weighted
    "",
])
@pytest.mark.parametrize("layer", [None, -2])
def test_conditioning_matches_transformers(engines, torch_sd15, text, layer):
    clip = engines.clip if layer is None else engines.clip.clip_layer(layer)
    ours = clip.encode(text)
    ref = torch_conditioning(torch_sd15.text, engines.clip.towers[0].tokenizer, text, layer)
    assert ours[0][0].shape == ref[0][0].shape and ours[0][0].shape[1] % 77 == 0
    np.testing.assert_allclose(ours[0][0], ref[0][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours[0][1]["pooled_output"], ref[0][1]["pooled_output"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [-1, -3 + 1, -5])  # last, penultimate, beyond the 3 layers (ComfyUI: last)
def test_clip_set_last_layer_matches_transformers(engines, torch_sd15, layer):
    text = "a (red:1.4) apple"
    ours = engines.clip.clip_layer(layer).encode(text)
    ref = torch_conditioning(torch_sd15.text, engines.clip.towers[0].tokenizer, text, layer)
    np.testing.assert_allclose(ours[0][0], ref[0][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler_name, scheduler, steps", [("euler", "normal", 20), ("dpmpp_2m", "karras", 8),
                                                              ("euler_ancestral", "normal", 6)])
def test_pipeline_latents_match_the_torch_unet(pipeline, torch_sd15, sampler_name, scheduler, steps):
    wf = json.loads((EXAMPLES / "txt2img.json").read_text())
    overrides = {"5.width": 64, "5.height": 64, "3.steps": steps, "3.sampler_name": sampler_name,
                 "3.scheduler": scheduler}
    result = pipeline.run_workflow(wf, overrides=overrides)
    ours = result.outputs["3"][0]["samples"]

    tok = pipeline.load_checkpoint("tiny-sd15").clip.towers[0].tokenizer
    positive = torch_conditioning(torch_sd15.text, tok, wf["6"]["inputs"]["text"])
    negative = torch_conditioning(torch_sd15.text, tok, wf["7"]["inputs"]["text"])
    model = Model(torch_unet(torch_sd15.unet), "sd15")
    latent = {"samples": np.zeros((1, 4, 8, 8), np.float32)}
    ref = ksampler(model, 42, steps, 8.0, sampler_name, scheduler, positive, negative, latent, 1.0)["samples"]
    assert rel_diff(ours, ref) < 1e-4

    with torch.no_grad():
        image = torch_sd15.vae.decode(torch.from_numpy(ref)).sample
    ref_image = torch.clamp((image + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(result.outputs["8"][0], ref_image, rtol=0, atol=2e-4)


def test_vae_matches_autoencoderkl(engines, torch_sd15):
    from PIL import Image

    pixels = np.asarray(Image.open(EXAMPLES / "apple-256.png").convert("RGB"), np.float32)[None] / 255.0
    pixels = pixels[:, :100, :84]  # cropped to 96x80 around the centre, as ComfyUI's VAEEncode
    latent = engines.vae.encode(pixels)
    with torch.no_grad():
        x = torch.from_numpy(pixels[:, 2:98, 2:82].transpose(0, 3, 1, 2).copy()) * 2.0 - 1.0
        ref = torch_sd15.vae.encode(x).latent_dist.mode().numpy()
    assert latent.shape == (1, 4, 12, 10)
    np.testing.assert_allclose(latent, ref, rtol=1e-4, atol=1e-4)

    decoded = engines.vae.decode(ref)
    with torch.no_grad():
        image = torch_sd15.vae.decode(torch.from_numpy(ref)).sample
    np.testing.assert_allclose(decoded, torch.clamp((image + 1) / 2, 0, 1).permute(0, 2, 3, 1).numpy(),
                               rtol=0, atol=2e-4)
