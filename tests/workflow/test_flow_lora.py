"""LoRA on the flow families (FLUX.1, SD3): diffusers / PEFT, kohya (BFL / MMDiT keys, fused qkv and linear1)
and ComfyUI layouts merged into the exported transformer and text encoders, against diffusers'
``load_lora_weights`` + ``fuse_lora`` on the same tiny weights.

The LoRA is :mod:`ksampler_rt.export.tiny_flow_lora`'s (one update written in the three layouts): its diffusers
file is compared with diffusers directly, the kohya / ComfyUI files with that (exact) merge, and the kohya
writer with diffusers' own kohya-FLUX reader where that reader applies."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ksampler_rt.export.tiny_flow_lora import TINY_FLOW_LORA_RANK as RANK  # noqa: E402
from ksampler_rt.export.tiny_flow_lora import flow_lora_tensors, tiny_flow_lora_pairs  # noqa: E402
from ksampler_rt.workflow.lora import (EngineForward, LoraContext, LoraError, attach, load_lora,  # noqa: E402
                                       load_lora_file, read_safetensors, resolve_lora)


@dataclass
class Flow:
    family: str
    src: Path
    export: Path
    manifest: dict
    engines: object
    ctx: LoraContext
    model: object
    clip: object
    loras: dict          # component -> {module: (A, B)} of the random PEFT LoRA
    peft: Path           # that LoRA in diffusers / PEFT layout


@dataclass(frozen=True)
class Tower:  # the fields of ClipTower that LoRA reaches
    name: str
    forward: object


@dataclass(frozen=True)
class FakeClip:
    towers: tuple


# ------------------------------------------------------------------------------------------ fixtures

def _save(tensors: dict, path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    from ksampler_rt.engines import load_engines
    from ksampler_rt.export.onnx_export import export_model
    from ksampler_rt.export.tiny import make_tiny_model
    from ksampler_rt.runtime import Model

    cache = {}

    def get(family):
        if family in cache:
            return cache[family]
        root = tmp_path_factory.mktemp(f"flow-lora-{family}")
        src = make_tiny_model(root / "model", family, seed=0)
        export = root / "export"
        if family == "flux":  # the whole checkpoint, through the workflow's own loader (FlowClip towers)
            from ksampler_rt.workflow.flow_checkpoint import load_flow_checkpoint

            export_model(str(src), str(export))
            ckpt = load_flow_checkpoint(export, "onnxruntime-cpu", log=None)
            engines, model, clip, manifest = ckpt.engines, ckpt.model, ckpt.clip, ckpt.manifest
            ctx = model.lora.target.context
        else:  # the transformer and CLIPs only, attached by hand (SD-style tuple of towers)
            towers = ["clip_l", "clip_g"]
            export_model(str(src), str(export), models=["transformer"] + towers)
            manifest = json.loads((export / "manifest.json").read_text())
            engines = load_engines(export, "onnxruntime-cpu", log=None)
            model = Model(engines.unet_callable(), family)
            clip = FakeClip(tuple(Tower(n, EngineForward(getattr(engines, n))) for n in towers))
            ctx = attach(model, clip.towers, engines, manifest, export, family)

        loras = tiny_flow_lora_pairs(family, seed=1)
        peft = _save(flow_lora_tensors(loras, family, "diffusers"), root / "peft.safetensors")
        cache[family] = Flow(family, src, export, manifest, engines, ctx, model, clip, loras, peft)
        return cache[family]
    return get


def _pipeline(family, src):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(src, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fused_pipeline(family, src, lora_file, scale):
    """diffusers' load_lora_weights + fuse_lora(lora_scale) + unload_lora_weights (the fused weights stay)."""
    pipe = _pipeline(family, src)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=scale, components=["transformer", "text_encoder"]
                   + (["text_encoder_2"] if family == "sd3" else []))
    pipe.unload_lora_weights()
    return pipe


def _diffusers_fused(family, src, lora_file, scale):
    """{component: state dict} of the fused pipeline."""
    pipe = _fused_pipeline(family, src, lora_file, scale)
    comps = {"transformer": pipe.transformer, "clip_l": pipe.text_encoder}
    if family == "sd3":
        comps["clip_g"] = pipe.text_encoder_2
    return {c: {k: v.detach().numpy() for k, v in m.state_dict().items()} for c, m in comps.items()}


# ----------------------------------------------------------------------------------- other layouts

def write_kohya(flow: Flow, path: Path) -> Path:
    return _save(flow_lora_tensors(flow.loras, flow.family, "kohya"), path)


def write_comfyui(flow: Flow, path: Path) -> Path:
    return _save(flow_lora_tensors(flow.loras, flow.family, "comfyui"), path)


# ------------------------------------------------------------------------------------------- helpers

def _merged(flow: Flow, path, strength=1.0):
    """{component: {torch name: merged weight}} of the weights the LoRA patches."""
    patch = flow.ctx.patch(load_lora_file(path))
    out = {}
    for comp, target in flow.ctx.targets.items():
        by_init = {v: k for k, v in target.init_map.items()}
        out[comp] = {by_init[k]: v for k, v in target.merge([(patch, strength)]).items()}
    return out, patch


def _assert_merged_equal(ours, ref, rtol=1e-5):
    for comp, weights in ours.items():
        for name, w in weights.items():
            r = ref[comp][name] if name in ref[comp] else ref[comp]["text_model." + name]
            np.testing.assert_allclose(w, r, rtol=rtol, atol=1e-6, err_msg=f"{comp} {name}")


def _clip_towers(clip) -> list:
    """The CLIP-L (, CLIP-G) ClipTowers of a FlowClip (towers "l", "g" wrapping them) or a tuple of towers."""
    towers = clip.towers
    return [towers[k].tower for k in ("l", "g") if k in towers] if isinstance(towers, dict) else list(towers)


def _n_layers(flow):
    return {c: len(m) for c, m in flow.loras.items()}


# ------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_peft_layout_equals_diffusers_fuse(flow, family):
    f = flow(family)
    ours, patch = _merged(f, f.peft, 0.8)
    assert not patch.unmatched
    assert {c: len(w) for c, w in ours.items()} == _n_layers(f)  # every LoRA layer, each once
    ref = _diffusers_fused(family, f.src, f.peft, 0.8)
    _assert_merged_equal(ours, ref)
    tr = _pipeline(family, f.src).transformer  # the tiny LoRA covers every Linear / Conv2d of the transformer
    assert sorted(f.loras["transformer"]) == sorted(
        n for n, m in tr.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    base = f.ctx.targets["transformer"]
    changed = max(np.abs(w - base.base_weight(n)).max() for n, w in ours["transformer"].items())
    assert changed > 1e-2  # the LoRA does something


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_kohya_and_comfyui_layouts_equal_peft(flow, family, tmp_path):
    f = flow(family)
    peft, _ = _merged(f, f.peft, 1.0)
    for writer in (write_kohya, write_comfyui):
        path = writer(f, tmp_path / f"{writer.__name__}.safetensors")
        ours, patch = _merged(f, path, 1.0)
        assert not patch.unmatched, patch.unmatched
        assert ours.keys() == peft.keys() and all(ours[c].keys() == peft[c].keys() for c in ours)
        _assert_merged_equal(ours, peft, rtol=1e-5)
    if family != "sd3":
        # diffusers reads kohya FLUX LoRAs itself (_convert_kohya_flux_lora_to_diffusers): the fused qkv of the
        # double blocks, the other block layers, the text encoder. It hard-codes the real single-block widths
        # (linear1 = 3 x 3072 + 12288 rows), and writes the embedders' and the final layer's keys without the
        # "transformer." prefix, so it does not apply those: they are left out of this file, and the final
        # adaLN's (shift, scale) -> (scale, shift) swap is checked with diffusers' own swap_scale_shift.
        from diffusers.loaders.lora_conversion_utils import swap_scale_shift

        tensors, _ = read_safetensors(tmp_path / "write_kohya.safetensors")
        bfl_up = tensors["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] / 2  # _put doubled it
        np.testing.assert_array_equal(swap_scale_shift(torch.from_numpy(bfl_up)).numpy(),
                                      f.loras["transformer"]["norm_out.linear"][1])
        subset = {k: v for k, v in tensors.items()
                  if re.match(r"lora_te1_|lora_unet_double_blocks_|lora_unet_single_blocks_\d+_(linear2|modulation)", k)}
        subset = _save(subset, tmp_path / "kohya_subset.safetensors")
        ours, _ = _merged(f, subset, 1.3)
        assert "single_transformer_blocks.0.attn.to_q.weight" not in ours["transformer"]
        assert "norm_out.linear.weight" not in ours["transformer"] and "x_embedder.weight" not in ours["transformer"]
        _assert_merged_equal(ours, _diffusers_fused(family, f.src, subset, 1.3))


def test_strength_scaling_and_zero_identity(flow):
    f = flow("flux")
    model, clip = load_lora(f.model, f.clip, f.peft, 0.0, 0.0, log=None)
    assert model is f.model and clip is f.clip
    m1, _ = load_lora(f.model, None, f.peft, 1.0, log=None)
    m0, _ = load_lora(m1, None, f.peft, 0.0, log=None)
    assert m0 is m1
    target = f.ctx.targets["transformer"]
    patch = f.ctx.patch(load_lora_file(f.peft))
    one, two, neg = (target.merge([(patch, s)]) for s in (1.0, 2.0, -0.5))
    for k in one:
        base = target.base_weight(next(n for n, v in target.init_map.items() if v == k))
        np.testing.assert_allclose(two[k] - base, 2 * (one[k] - base), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(neg[k] - base, -0.5 * (one[k] - base), rtol=1e-4, atol=1e-6)
    # a stack adds the deltas
    both = target.merge([(patch, 1.0), (patch, -0.5)])
    for k in one:
        base = target.base_weight(next(n for n, v in target.init_map.items() if v == k))
        np.testing.assert_allclose(both[k] - base, (one[k] - base) + (neg[k] - base), rtol=1e-4, atol=1e-6)


def _inputs(f: Flow):
    g = np.random.default_rng(5)
    dim = f.manifest["context_dim"]
    x = g.standard_normal((2, 16, 8, 8), dtype=np.float32)
    ctx_ = g.standard_normal((2, 24, dim), dtype=np.float32)
    y = g.standard_normal((2, f.manifest["pooled_dim"]), dtype=np.float32)
    t = np.array([0.7, 0.3], np.float32) * (1000.0 if f.family == "sd3" else 1.0)
    return x, ctx_, y, t


def _torch_velocity(family, transformer, x, ctx_, y, t):
    from ksampler_rt.export.flow_wrappers import FluxTransformerWrapper, SD3TransformerWrapper

    wrap = (SD3TransformerWrapper if family == "sd3" else FluxTransformerWrapper)(transformer.eval())
    args = [torch.from_numpy(a) for a in (x, t, ctx_, y)]
    if family == "flux":
        args.append(torch.full((x.shape[0],), 3.5))
    with torch.no_grad():
        return wrap(*args).numpy()


def _close(a, b, tol=2e-4):
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err < tol, err


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_engine_output_matches_fused_torch_transformer(flow, family, tmp_path):
    """One transformer call through ONNX Runtime with the merged weights (kohya layout, via LoraLoader's
    Python API) against diffusers' fused transformer; the text encoders' hidden states likewise."""
    f = flow(family)
    x, ctx_, y, t = _inputs(f)
    kw = {"guidance": np.full((2,), 3.5, np.float32)} if family == "flux" else {}
    model, clip = load_lora(f.model, f.clip, write_kohya(f, tmp_path / "k.safetensors"), 0.6, 1.2, log=None)
    ours = model.unet(x, t, ctx_, y=y, **kw)
    lora_pipe = _fused_pipeline(family, f.src, f.peft, 0.6)
    _close(ours, _torch_velocity(family, lora_pipe.transformer, x, ctx_, y, t))
    base = f.model.unet(x, t, ctx_, y=y, **kw)
    _close(base, _torch_velocity(family, _pipeline(family, f.src).transformer, x, ctx_, y, t))
    assert np.abs(ours - base).max() > 1e-2 * max(1.0, np.abs(base).max())  # the LoRA does something
    np.testing.assert_array_equal(f.model.unet(x, t, ctx_, y=y, **kw), base)  # the base MODEL is untouched

    te_pipe = _fused_pipeline(family, f.src, f.peft, 1.2)
    ids = np.random.default_rng(3).integers(1, 200, size=(1, 77)).astype(np.int64)
    for tower, te in zip(_clip_towers(clip), (te_pipe.text_encoder, getattr(te_pipe, "text_encoder_2", None))):
        with torch.no_grad():
            ref = te.eval()(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2].numpy()
        _close(tower.forward(ids)["penultimate_hidden_state"], ref)
    if family == "flux":  # FlowClip: CLIP-L's pooled vector changes, T5 (no LoRA reaches it) is the same tower
        assert clip.towers["t5xxl"] is f.clip.towers["t5xxl"]
        (ctx_a, extra_a), = f.clip.encode("a red apple")
        (ctx_b, extra_b), = clip.encode("a red apple")
        np.testing.assert_array_equal(ctx_a, ctx_b)
        assert np.abs(extra_a["pooled_output"] - extra_b["pooled_output"]).max() > 1e-2


def _sd15_manifest():
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "conv_in.weight"]
    return {"family": "sd15", "initializer_map": {"unet": {n: "unet." + n for n in names}}}


def test_foreign_family_refused(flow, tmp_path):
    from ksampler_rt.export.tiny import make_tiny_lora

    flux, sd3 = flow("flux"), flow("sd3")
    flux_kohya = write_kohya(flux, tmp_path / "flux.safetensors")
    with pytest.raises(LoraError, match=r"made for FLUX.1 \(its keys address FLUX.1's double.*this checkpoint is SD3"):
        load_lora(sd3.model, sd3.clip, flux_kohya, log=None)
    with pytest.raises(LoraError, match=r"made for SD3 \(its keys address SD3's MMDiT.*this checkpoint is FLUX.1"):
        load_lora(flux.model, flux.clip, write_kohya(sd3, tmp_path / "sd3.safetensors"), log=None)
    # the diffusers layout: told apart by the joint attention's width
    with pytest.raises(LoraError, match=r"made for SD3 \(its joint-attention keys are 32 wide"):
        load_lora(flux.model, None, sd3.peft, log=None)
    with pytest.raises(LoraError, match="made for FLUX.1.*this checkpoint is SD1.x"):
        resolve_lora(load_lora_file(flux_kohya), _sd15_manifest(), lambda m, p: (32, 32))
    sd15 = make_tiny_lora(tmp_path / "sd15.safetensors")
    with pytest.raises(LoraError, match="made for SD1.x.*this checkpoint is FLUX.1"):
        load_lora(flux.model, flux.clip, sd15, log=None)
    # a FLUX.1 dev LoRA applies to schnell: the family label is the same (guidance_in keys stay unmatched)
    from ksampler_rt.workflow.lora_keys import _same_family

    assert _same_family("flux", "flux-schnell") and not _same_family("flux", "sd3")


def test_fused_shape_mismatch_names_every_part(flow, tmp_path):
    f = flow("flux")
    tensors, _ = read_safetensors(write_kohya(f, tmp_path / "k.safetensors"))
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors[f"{stem}.lora_up.weight"] = tensors[f"{stem}.lora_up.weight"][:-8]  # 184 rows where 3 x 64 are
    with pytest.raises(LoraError, match=re.escape(
            f"{stem}: lora_up [184, 12] @ lora_down [12, 64] does not fit transformer weights "
            "'transformer_blocks.0.attn.to_q.weight', 'transformer_blocks.0.attn.to_k.weight', "
            "'transformer_blocks.0.attn.to_v.weight' stacked on their rows (shapes [64, 64], [64, 64], [64, 64])")):
        load_lora(f.model, f.clip, _save(tensors, tmp_path / "bad.safetensors"), log=None)


def test_unmatched_keys_reported(flow, tmp_path):
    f = flow("flux")
    tensors, _ = read_safetensors(f.peft)
    tensors["transformer.not_a_layer.lora_A.weight"] = np.zeros((4, 8), np.float32)
    tensors["transformer.not_a_layer.lora_B.weight"] = np.zeros((8, 4), np.float32)
    tensors["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = np.zeros((4, 8), np.float32)
    tensors["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = np.zeros((8, 4), np.float32)
    logged = []
    load_lora(f.model, f.clip, _save(tensors, tmp_path / "extra.safetensors"), 0.5, 0.5, log=logged.append)
    assert len(logged) == 1 and "2 key(s)" in logged[0]
    assert "transformer.not_a_layer" in logged[0] and "lora_te2_encoder_block_0" in logged[0]  # FLUX's te2 = T5


def test_model_and_clip_from_separate_exports(flow):
    """UNETLoader + TripleCLIPLoader: the transformer, CLIP-L and CLIP-G from three exports (three contexts)."""
    f = flow("sd3")
    from ksampler_rt.runtime import Model

    def part(models):
        manifest = dict(f.manifest, initializer_map={m: f.manifest["initializer_map"][m] for m in models})
        engines = SimpleNamespace(**{m: getattr(f.engines, m) for m in models},
                                  unet_callable=f.engines.unet_callable)
        return engines, manifest

    model = Model(f.engines.unet_callable(), "sd3")
    attach(model, (), *part(["transformer"]), f.export, "sd3")
    clip = FakeClip(tuple(Tower(n, EngineForward(getattr(f.engines, n))) for n in ("clip_l", "clip_g")))
    for tower in clip.towers:
        attach(None, (tower,), *part([tower.name]), f.export, "sd3")
    logged = []
    m2, c2 = load_lora(model, clip, f.peft, 0.7, 0.9, log=logged.append)
    assert logged == []  # every key found a home in one of the exports
    m1, c1 = load_lora(f.model, f.clip, f.peft, 0.7, 0.9, log=None)
    x, ctx_, y, t = _inputs(f)
    np.testing.assert_array_equal(m2.unet(x, t, ctx_, y=y), m1.unet(x, t, ctx_, y=y))
    ids = np.full((1, 77), 7, np.int64)
    for a, b, base in zip(c2.towers, c1.towers, clip.towers):
        out = a.forward(ids)["last_hidden_state"]
        np.testing.assert_array_equal(out, b.forward(ids)["last_hidden_state"])
        assert np.abs(out - base.forward(ids)["last_hidden_state"]).max() > 1e-3
    # keys no export takes are reported once
    extra = _save(dict(read_safetensors(f.peft)[0], **{"transformer.nope.lora_A.weight": np.zeros((4, 8)),
                                                       "transformer.nope.lora_B.weight": np.zeros((8, 4))}),
                  f.export.parent / "extra.safetensors")
    load_lora(model, clip, extra, 1.0, 1.0, log=logged.append)
    assert len(logged) == 1 and "1 key(s)" in logged[0] and "transformer.nope" in logged[0]


def test_diffusers_adapter_metadata_scale(flow, tmp_path):
    """diffusers' save_lora_weights keeps lora_alpha / alpha_pattern in the file's metadata, and
    load_lora_weights scales by them: so does this loader."""
    from diffusers import FluxPipeline
    from peft import LoraConfig

    f = flow("flux")
    mods = {k: v for k, v in f.loras["transformer"].items() if k.startswith(("transformer_blocks.0.", "proj_out"))}
    layers = {}
    for name, (a, b) in mods.items():
        layers[f"{name}.lora_A.weight"], layers[f"{name}.lora_B.weight"] = torch.from_numpy(a), torch.from_numpy(b)
    targets = "|".join(re.escape(m) for m in sorted(mods))  # a string: a full match, not a suffix
    config = LoraConfig(r=RANK, lora_alpha=8, alpha_pattern={"proj_out": 2}, target_modules=targets).to_dict()
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=config)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lf = load_lora_file(path)
    assert lf.modules["transformer.transformer_blocks.0.attn.to_q"].scale == 2.0
    assert lf.modules["transformer.proj_out"].scale == 0.5
    ours, patch = _merged(f, path, 0.7)
    assert not patch.unmatched and len(ours["transformer"]) == len(mods)
    _assert_merged_equal(ours, _diffusers_fused("flux", f.src, path, 0.7))


@pytest.mark.parametrize("family", ["flux-schnell", "sd3"])
def test_make_tiny_flow_lora_deterministic(tmp_path, family):
    from ksampler_rt.export.tiny_flow import make_tiny_flow_lora

    for layout in ("kohya", "comfyui", "diffusers"):
        a = make_tiny_flow_lora(tmp_path / f"a-{layout}.safetensors", family, layout, seed=0)
        b = make_tiny_flow_lora(tmp_path / f"b-{layout}.safetensors", family, layout, seed=0)
        assert a.read_bytes() == b.read_bytes()
        assert make_tiny_flow_lora(tmp_path / "c.safetensors", family, layout, seed=1).read_bytes() != a.read_bytes()
    keys = list(read_safetensors(tmp_path / "a-kohya.safetensors")[0])
    fused = "lora_unet_joint_blocks_0_x_block_attn_qkv" if family == "sd3" else "lora_unet_double_blocks_0_img_attn_qkv"
    assert f"{fused}.lora_up.weight" in keys and not any(k.startswith("transformer.") for k in keys)
    with pytest.raises(ValueError, match="layout: received 'peft'"):
        make_tiny_flow_lora(tmp_path / "d.safetensors", family, "peft")


def test_openvino_merged_transformer_matches_onnxruntime(flow):
    """OpenVINO's with_weights (Constants replaced before compiling) on the flow transformer, LoRA'd the same."""
    pytest.importorskip("openvino")
    from ksampler_rt.engines import load_engines
    from ksampler_rt.runtime import Model

    f = flow("flux")
    engines = load_engines(f.export, "openvino-cpu", log=None, models=["transformer"])
    model = Model(engines.unet_callable(), "flux")
    attach(model, (), engines, f.manifest, f.export, "flux")
    x, ctx_, y, t = _inputs(f)
    g = np.full((2,), 3.5, np.float32)
    ov, _ = load_lora(model, None, f.peft, 0.8, log=None)
    ort, _ = load_lora(f.model, None, f.peft, 0.8, log=None)
    _close(ov.unet(x, t, ctx_, y=y, guidance=g), ort.unet(x, t, ctx_, y=y, guidance=g), 1e-4)
