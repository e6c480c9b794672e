"""SDXL end to end on the tiny SDXL export: both text encoders with ComfyUI's rules (clip_l and
clip_g hidden layer -2 without the final norm, concatenated; pooled = clip_g's projection), checked
against transformers, then a txt2img workflow. Exports a second tiny model (~30-60 s)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"


@pytest.fixture(scope="module")
def sdxl(tiny_sd15, session_cache, tmp_path_factory):
    from ksampler_rt.demo import prepare_tiny_checkpoint
    from ksampler_rt.export.tiny import ensure_tiny_model
    from ksampler_rt.workflow.pipeline import Pipeline

    prepare_tiny_checkpoint(tiny_sd15.models_dir, family="sdxl", log=lambda *_: None)
    pipe = Pipeline(tiny_sd15.models_dir, backend="onnxruntime-cpu", output_dir=tmp_path_factory.mktemp("xl-out"),
                    input_dir=EXAMPLES, temp_dir=tmp_path_factory.mktemp("xl-temp"), log=None)
    yield pipe, Path(ensure_tiny_model("sdxl"))
    pipe.release()


def _hidden(model, tokenizer, text, weights_too=True):
    """One tower as ComfyUI: layer -2 output (no final norm), token weighting against the empty chunk."""
    chunks = tokenizer.tokenize_with_weights(text)
    ids = [[t.id for t in c] for c in chunks]
    weighted = any(t.weight != 1.0 for c in chunks for t in c)
    if weighted:
        ids.append([tokenizer.start_token, tokenizer.end_token] + [tokenizer.pad_token] * 75)
    with torch.no_grad():
        out = model(torch.tensor(ids), output_hidden_states=True)
    z = out.hidden_states[-2].clone()
    if weighted:
        for k, c in enumerate(chunks):
            for j, t in enumerate(c):
                if t.weight != 1.0:
                    z[k, j] = (z[k, j] - z[-1][j]) * t.weight + z[-1][j]
    pooled = getattr(out, "text_embeds", None)
    return torch.cat([z[k:k + 1] for k in range(len(chunks))], dim=-2).numpy(), pooled


@pytest.mark.parametrize("text", ["a red apple", "a (red:1.3) apple, " + "(studio light), " * 30])
def test_sdxl_conditioning_matches_transformers(sdxl, text):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe, source = sdxl
    clip = pipe.load_checkpoint("tiny-sdxl").clip
    clip_l, clip_g = clip.towers
    assert clip_g.tokenizer.pad_token == 0 and clip_l.tokenizer.pad_token == clip_l.tokenizer.end_token
    cond, extra = clip.encode(text)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster for tiny modules on a loaded machine
    try:
        l_ref, _ = _hidden(CLIPTextModel.from_pretrained(source / "text_encoder").eval(), clip_l.tokenizer, text)
        g_ref, pooled = _hidden(CLIPTextModelWithProjection.from_pretrained(source / "text_encoder_2").eval(),
                                clip_g.tokenizer, text)
    finally:
        torch.set_num_threads(threads)
    cut = min(l_ref.shape[1], g_ref.shape[1])
    ref = np.concatenate([l_ref[:, :cut], g_ref[:, :cut]], axis=-1)
    assert cond.shape == ref.shape == (1, cut, 96)
    np.testing.assert_allclose(cond, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(extra["pooled_output"], pooled[0:1].numpy(), rtol=1e-4, atol=1e-4)


def test_sdxl_txt2img_workflow(sdxl):
    pipe, _ = sdxl
    wf = json.loads((EXAMPLES / "txt2img.json").read_text())
    wf["4"]["inputs"]["ckpt_name"] = "tiny-sdxl"
    result = pipe.run_workflow(wf, overrides={"5.width": 64, "5.height": 96, "3.steps": 4})
    latent = result.outputs["3"][0]["samples"]
    assert latent.shape == (1, 4, 12, 8) and np.isfinite(latent).all()
    assert result.outputs["8"][0].shape == (1, 96, 64, 3)
    assert len(result.ui["9"]["images"]) == 1


def test_sdxl_clip_skip_minus_one_reads_the_raw_last_layer(sdxl):
    """SDXL's towers use hidden layers without the final norm; -1 is the raw last layer (exported)."""
    pipe, _ = sdxl
    wf = json.loads((EXAMPLES / "txt2img.json").read_text())
    wf["4"]["inputs"]["ckpt_name"] = "tiny-sdxl"
    wf["40"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -1}}
    wf["6"]["inputs"]["clip"] = ["40", 0]
    pipe.prepare(wf)
    clip = pipe.load_checkpoint("tiny-sdxl").clip
    default, last = clip.encode("a red apple")[0][0], clip.clip_layer(-1).encode("a red apple")[0][0]
    assert default.shape == last.shape and not np.allclose(default, last)
