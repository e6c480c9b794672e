"""LoraLoader on engines: exact key mapping, merged weights vs torch, no rebuilds, the lora-switch workflow."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnx")

from ksampler_rt.export.tiny import TINY_LORA_NAME, ensure_tiny_model, make_tiny_lora  # noqa: E402
from ksampler_rt.workflow.lora import LoraError, load_lora, load_lora_file, read_safetensors  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def env(pipeline, tiny_sd15, session_cache, tmp_path_factory):
    """The session's tiny SD1.5 pipeline (conftest), with the tiny LoRA the demo code registered."""
    ckpt = pipeline.load_checkpoint("tiny-sd15")
    root = tmp_path_factory.mktemp("lora")
    lora2 = make_tiny_lora(root / "second.safetensors", seed=1)
    return {"pipe": pipeline, "ckpt": ckpt, "export_dir": tiny_sd15.export_dir, "root": root,
            "lora": tiny_sd15.models_dir / "loras" / TINY_LORA_NAME, "lora2": lora2,
            "engines_dir": Path(ckpt.engines.unet.path).parent.parent}


@pytest.fixture(scope="module")
def inputs():
    g = np.random.default_rng(0)
    return (g.standard_normal((2, 4, 16, 16), dtype=np.float32), np.array([500.0, 20.0], np.float32),
            g.standard_normal((2, 77, 32), dtype=np.float32))


def _ids(ckpt):
    tower = ckpt.clip.towers[0]
    return np.asarray([[t.id for t in chunk] for chunk in tower.tokenizer.tokenize_with_weights("pixel art, a red apple")],
                      np.int64)


# --------------------------------------------------------------------------------- torch reference

def _diffusers_lora(path):
    """The LoRA as diffusers converts it (kohya -> diffusers keys): {(component, module): (down, up, scale)}."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    sd, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(path)))
    te_proj = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
    out = {}
    for key, down in sd.items():
        m = re.match(r"(unet|text_encoder)\.(.*?)(\.lora|\.lora_linear_layer|_lora)\.down\.weight$", key)
        if not m:
            continue
        comp, name = m.group(1), m.group(2)
        head, last = name.replace(".processor.", ".").rsplit(".", 1)  # diffusers' attention-processor names
        if comp == "unet" and last == "to_out" and m.group(3) == "_lora":
            last = "to_out.0"
        elif comp == "text_encoder" and m.group(3) == "_lora":
            last = te_proj[last]
        name = f"{head}.{last}"
        up = sd[key.replace(".down.weight", ".up.weight")]
        alpha = alphas.get(key + ".alpha", alphas.get(f"{comp}.{m.group(2)}.alpha"))
        assert alpha is not None, key  # every module of the tiny LoRA has an alpha
        out[(comp, name)] = (down, up, float(alpha) / down.shape[0])
    assert len(out) == 90
    return out


def _merge_torch(module, lora, component, strength):
    with torch.no_grad():
        for (comp, name), (down, up, scale) in lora.items():
            if comp != component:
                continue
            if name.startswith("text_model.") and not hasattr(module, "text_model"):
                name = name[len("text_model."):]  # transformers 5 flattened CLIPTextModel
            w = module.get_submodule(name).weight
            w += strength * scale * (up.flatten(1).float() @ down.flatten(1).float()).reshape(w.shape)


def _torch_unet(loras):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_model("sd15") / "unet").eval()
    for path, s in loras:
        _merge_torch(unet, _diffusers_lora(path), "unet", s)
    return unet


def _torch_clip(loras):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(ensure_tiny_model("sd15") / "text_encoder").eval()
    for path, s in loras:
        _merge_torch(te, _diffusers_lora(path), "text_encoder", s)
    return te


def _run_torch_unet(unet, x, t, ctx):
    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()


def _close(a, b):
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err < 2e-4, err


# ------------------------------------------------------------------------------------------- tests

def test_tiny_lora_is_deterministic_kohya_layout(tmp_path):
    a = make_tiny_lora(tmp_path / "a.safetensors")
    b = make_tiny_lora(tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    keys = list(read_safetensors(a)[0])
    assert all(re.match(r"lora_(unet|te)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)$", k) for k in keys)
    lf = load_lora_file(a)
    assert any(m.down.ndim == 4 and m.down.shape[2] == 3 for m in lf.modules.values())  # LoCon 3x3 convs


def test_strength_zero_is_bit_identical(env, inputs):
    ckpt = env["ckpt"]
    model, clip = load_lora(ckpt.model, ckpt.clip, env["lora"], 0.0, 0.0)
    assert model is ckpt.model and clip is ckpt.clip
    # a zero-strength LoRA inside a stack contributes nothing either: the same engine runs
    m1, _ = load_lora(ckpt.model, None, env["lora"], 0.8)
    m2, _ = load_lora(m1, None, env["lora2"], 0.0)
    assert m2 is m1
    x, t, c = inputs
    np.testing.assert_array_equal(model.unet(x, t, c), ckpt.model.unet(x, t, c))


def test_unet_and_clip_match_torch_merge(env, inputs):
    ckpt = env["ckpt"]
    x, t, c = inputs
    model, clip = load_lora(ckpt.model, ckpt.clip, env["lora"], 0.7, 1.3)
    ours = model.unet(x, t, c)
    _close(ours, _run_torch_unet(_torch_unet([(env["lora"], 0.7)]), x, t, c))
    base = ckpt.model.unet(x, t, c)
    assert np.abs(ours - base).max() > 1e-2  # the LoRA does something
    _close(base, _run_torch_unet(_torch_unet([]), x, t, c))
    ids = _ids(ckpt)
    with torch.no_grad():
        ref = _torch_clip([(env["lora"], 1.3)])(torch.from_numpy(ids)).last_hidden_state.numpy()
    _close(clip.towers[0].forward(ids)["last_hidden_state"], ref)
    # the base objects still run their own weights
    np.testing.assert_array_equal(ckpt.model.unet(x, t, c), base)


def test_chaining_two_loras_matches_torch(env, inputs):
    ckpt = env["ckpt"]
    x, t, c = inputs
    m, cl = load_lora(ckpt.model, ckpt.clip, env["lora"], 0.5, 0.5)
    m, cl = load_lora(m, cl, env["lora2"], -0.3, 0.0)
    _close(m.unet(x, t, c), _run_torch_unet(_torch_unet([(env["lora"], 0.5), (env["lora2"], -0.3)]), x, t, c))


def _rewrite(src, dst, rename):
    from safetensors.numpy import save_file

    tensors, _ = read_safetensors(src)
    out = {}
    for k, v in tensors.items():
        nk = rename(k)
        if nk:
            out[nk] = np.ascontiguousarray(v)
    save_file(out, str(dst))
    return dst


def test_diffusers_and_peft_layouts_equal_kohya(env, tmp_path):
    ckpt = env["ckpt"]
    lora = _diffusers_lora(env["lora"])
    target = ckpt.model.lora.target
    kohya = target.merge([(target.context.patch(load_lora_file(env["lora"])), 0.9)])

    def write(fmt):
        tensors = {}
        for (comp, name), (down, up, scale) in lora.items():
            stem = f"{comp}.{name}"
            if fmt == "peft":
                tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = down.numpy(), up.numpy()
            else:
                tensors[f"{stem}.lora.down.weight"], tensors[f"{stem}.lora.up.weight"] = down.numpy(), up.numpy()
            tensors[f"{stem}.alpha"] = np.array(scale * down.shape[0], np.float32)
        from safetensors.numpy import save_file

        path = tmp_path / f"{fmt}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
        return path

    for fmt in ("peft", "diffusers"):
        patch = target.context.patch(load_lora_file(write(fmt)))
        assert not patch.unmatched and patch.n_patched() == 90
        merged = target.merge([(patch, 0.9)])
        assert merged.keys() == kohya.keys()
        for k in kohya:
            np.testing.assert_allclose(merged[k], kohya[k], rtol=1e-6, atol=1e-6)


def test_locon_tucker_mid():
    from ksampler_rt.workflow.lora import LoraModule

    g = np.random.default_rng(1)
    down, mid, up = (g.standard_normal(s).astype(np.float32) for s in ((3, 5, 1, 1), (3, 3, 3, 3), (7, 3, 1, 1)))
    m = LoraModule("x", down=down, up=up, alpha=1.5, mid=mid)
    # the composition is the conv stack down (1x1) -> mid (3x3) -> up (1x1)
    conv = torch.nn.functional.conv2d
    img = torch.from_numpy(g.standard_normal((1, 5, 8, 8)).astype(np.float32))
    stacked = conv(conv(conv(img, torch.from_numpy(down)), torch.from_numpy(mid), padding=1), torch.from_numpy(up))
    merged = conv(img, torch.from_numpy(m.delta((7, 5, 3, 3)) / np.float32(0.5)), padding=1)
    np.testing.assert_allclose(merged.numpy(), stacked.numpy(), rtol=1e-4, atol=1e-4)


def test_lora_switch_workflow_end_to_end_without_rebuild(env, monkeypatch):
    from ksampler_rt.engines import build as engines_build
    from ksampler_rt.export import onnx_export
    from ksampler_rt.runtime import ksampler_advanced

    pipe, ckpt = env["pipe"], env["ckpt"]
    engines_dir = env["engines_dir"]
    before = sorted(p.name for p in engines_dir.iterdir())

    def forbidden(*a, **k):
        raise AssertionError("a LoRA switch must not export or build anything")

    monkeypatch.setattr(onnx_export, "export_model", forbidden)
    monkeypatch.setattr(engines_build, "build_model", forbidden)
    monkeypatch.setattr("ksampler_rt.engines.loader.build_model", forbidden)

    workflow = json.loads((EXAMPLES / "lora-switch.json").read_text())
    mixed = pipe.run_workflow(workflow).outputs["11"][0]["samples"]  # as is
    small = copy.deepcopy(workflow)  # the comparisons at 128 px (same graph), to keep the test short
    small["5"]["inputs"].update(width=128, height=128)
    mixed_small = pipe.run_workflow(small).outputs["11"][0]["samples"]
    workflow = small
    all_base = copy.deepcopy(workflow)
    all_base["11"]["inputs"]["model"] = ["4", 0]
    for n in ("21", "22"):
        all_base[n]["inputs"]["clip"] = ["4", 1]
    all_lora = copy.deepcopy(workflow)
    all_lora["10"]["inputs"]["model"] = ["20", 0]
    for n in ("6", "7"):
        all_lora[n]["inputs"]["clip"] = ["20", 1]
    base_out = pipe.run_workflow(all_base).outputs["11"][0]["samples"]
    lora_out = pipe.run_workflow(all_lora).outputs["11"][0]["samples"]
    assert np.abs(mixed_small - base_out).max() > 1e-3 and np.abs(mixed_small - lora_out).max() > 1e-3

    # the two windows by hand, with the Python API
    model, clip = load_lora(ckpt.model, ckpt.clip, env["lora"], 1.0, 1.0)
    latent = {"samples": np.zeros((1, 4, 32, 32), np.float32)}
    pos, neg = ckpt.clip.encode("pixel art, a red apple"), ckpt.clip.encode("blurry, low quality")
    first = ksampler_advanced(ckpt.model, "enable", 3, 20, 7.0, "euler", "normal", pos, neg, latent, 0, 6, "enable")
    second = ksampler_advanced(model, "disable", 3, 20, 7.0, "euler", "normal", clip.encode("pixel art, a red apple"),
                               clip.encode("blurry, low quality"), first, 6, 10000, "disable")
    np.testing.assert_array_equal(second["samples"], mixed)
    assert sorted(p.name for p in engines_dir.iterdir()) == before  # nothing written to the engine cache
    # merged weights are cached per (LoRA set, strengths): switching back and forth merges nothing new
    target = ckpt.model.lora.target
    merges = target.merges
    pipe.run_workflow(workflow)
    load_lora(ckpt.model, ckpt.clip, env["lora"], 1.0, 1.0)
    assert target.merges == merges


def test_bad_input_errors_and_base_stays_usable(env, inputs, tmp_path):
    from ksampler_rt.workflow.graph import WorkflowError

    ckpt, pipe = env["ckpt"], env["pipe"]
    x, t, c = inputs
    before = ckpt.model.unet(x, t, c)

    with pytest.raises(FileNotFoundError, match=re.escape(TINY_LORA_NAME)):
        load_lora(ckpt.model, ckpt.clip, env["lora"].parent / "nope.safetensors")
    workflow = json.loads((EXAMPLES / "lora-switch.json").read_text())
    workflow["20"]["inputs"]["lora_name"] = "missing.safetensors"
    with pytest.raises(WorkflowError, match=re.escape(TINY_LORA_NAME)):
        pipe.run_workflow(workflow)

    xl = make_tiny_lora(tmp_path / "xl.safetensors", family="sdxl")
    with pytest.raises(LoraError, match="made for SDXL.*this checkpoint is SD1.x"):
        load_lora(ckpt.model, ckpt.clip, xl)
    sd2 = make_tiny_lora(tmp_path / "sd2.safetensors", family="sd2-v")
    with pytest.raises(LoraError, match="made for SD2.x"):
        load_lora(ckpt.model, ckpt.clip, sd2)

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    bad = _rewrite(env["lora"], tmp_path / "bad.safetensors", lambda k: k)
    tensors, _ = read_safetensors(bad)
    tensors[key] = np.zeros((4, 48), np.float32)
    from safetensors.numpy import save_file

    save_file(tensors, str(bad))
    with pytest.raises(LoraError, match=r"attn1_to_q: lora_up \[32, 4\] @ lora_down \[4, 48\] does not fit unet "
                                        r"weight .*to_q.weight' of shape \[32, 32\]"):
        load_lora(ckpt.model, ckpt.clip, bad)

    for s in (100.5, -101, float("nan")):
        with pytest.raises(LoraError, match=r"strength_model: .*\[-100, 100\]"):
            load_lora(ckpt.model, ckpt.clip, env["lora"], s, 1.0)
    workflow = json.loads((EXAMPLES / "lora-switch.json").read_text())
    workflow["20"]["inputs"]["strength_clip"] = 250.0
    with pytest.raises(WorkflowError, match="strength_clip"):
        pipe.run_workflow(workflow)

    junk = tmp_path / "junk.safetensors"
    save_file({"foo.lora_down.weight": np.zeros((4, 32), np.float32),
               "foo.lora_up.weight": np.zeros((32, 4), np.float32)}, str(junk))
    with pytest.raises(LoraError, match="none of its 1 modules match.*foo"):
        load_lora(ckpt.model, ckpt.clip, junk)

    # keys matching nothing next to good ones are reported by name, not dropped silently
    extra = tmp_path / "extra.safetensors"
    tensors, _ = read_safetensors(env["lora"])
    tensors["lora_unet_not_a_layer.lora_down.weight"] = np.zeros((4, 32), np.float32)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = np.zeros((32, 4), np.float32)
    tensors["lora_unet_x.hada_w1_a"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(extra))
    logged = []
    load_lora(ckpt.model, ckpt.clip, extra, 0.5, 0.5, log=logged.append)
    assert "lora_unet_not_a_layer" in logged[0] and "lora_unet_x.hada_w1_a" in logged[0]

    np.testing.assert_array_equal(ckpt.model.unet(x, t, c), before)


def test_tensorrt_refit_view_logic(env):
    """Refit bookkeeping without a GPU: only changed names are refitted, base values are restored."""
    from ksampler_rt.engines.spec import EngineError
    from ksampler_rt.engines.trt_backend import TensorRTEngine

    unet = env["ckpt"].engines.unet
    eng = TensorRTEngine("unet", unet.inputs, unet.outputs, path="/nonexistent.plan",
                         export_dir=str(env["export_dir"]))
    calls = []

    class FakePlan:
        refittable = True

    eng.engine, eng._loaded = FakePlan(), True
    eng.refit = lambda w: calls.append(dict(w))
    eng._run_bucket = lambda feeds, profile: {"out": sorted(eng._weights_names)}
    a = "unet.conv_in.weight"
    b = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    va, vb = eng.with_weights({a: np.ones((32, 4, 3, 3), np.float32)}), eng.with_weights({b: np.ones((32, 32), np.float32)})
    feeds = {"sample": np.zeros((1, 4, 8, 8), np.float32), "timestep": np.zeros((1,), np.float32),
             "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)}
    assert va._run(feeds, None) == {"out": [a]} and list(calls[-1]) == [a]
    va._run(feeds, None)
    assert len(calls) == 1  # already holds these weights: no refit
    vb._run(feeds, None)
    assert sorted(calls[-1]) == sorted([a, b]) and calls[-1][a].std() > 0.01  # a restored to the export's values
    eng._run(feeds, None)
    assert list(calls[-1]) == [b] and eng._weights_key is None
    FakePlan.refittable = False
    with pytest.raises(EngineError, match="--refit"):
        va._run(feeds, None)


def test_matches_diffusers_peft_load_lora_weights_and_fuse(env, inputs):
    """The independent reference the issue names: diffusers' load_lora_weights (PEFT) + fuse_lora."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    ckpt = env["ckpt"]
    x, t, c = inputs
    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("sd15"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(env["lora"]))
    pipe.fuse_lora(lora_scale=0.7, components=["unet", "text_encoder"])
    model, clip = load_lora(ckpt.model, ckpt.clip, env["lora"], 0.7, 0.7)
    _close(model.unet(x, t, c), _run_torch_unet(pipe.unet.eval(), x, t, c))
    ids = _ids(ckpt)
    with torch.no_grad():
        ref = pipe.text_encoder.eval()(torch.from_numpy(ids)).last_hidden_state.numpy()
    _close(clip.towers[0].forward(ids)["last_hidden_state"], ref)
