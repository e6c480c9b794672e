"""SD3.5 all-in-one and FLUX.1 split files (Black Forest Labs' keys, clip_l / t5xxl_fp16 / ae files): written
from the tiny diffusers models, read back through the export's loader (diffusers' converters where they apply),
compared weight by weight and output by output with the diffusers modules; the export of those files."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from ksampler_rt.export import flow_single_file as fsf  # noqa: E402
from ksampler_rt.export.errors import ExportError  # noqa: E402
from ksampler_rt.export.manifest import read_manifest  # noqa: E402
from ksampler_rt.export.onnx_export import export_model  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_flow_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = fsf.write_flow_single_files(str(tiny_flow_dir(family)),
                                                       str(tmp_path_factory.mktemp(f"sf-{family}")))
        return cache[family]
    return get


def _reference(family, root):
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    kw = dict(local_files_only=True)
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    mods = {"transformer": cls.from_pretrained(root, subfolder="transformer", **kw),
            "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", **kw),
            "clip_l": CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw),
            "t5xxl": T5EncoderModel.from_pretrained(root, subfolder="text_encoder_3" if family == "sd3"
                                                    else "text_encoder_2", **kw)}
    if family == "sd3":
        mods["clip_g"] = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **kw)
    return {k: m.eval() for k, m in mods.items()}


@pytest.mark.parametrize("family", ["sd3", "flux", "flux-schnell"])
def test_single_file_round_trip(files, tiny_flow_dir, family):
    f = files(family)
    assert fsf.single_file_flow_family(f["checkpoint"]) == family
    if family == "sd3":
        src = fsf.load_flow_single_file(f["checkpoint"], family)
    else:
        src = fsf.load_flow_single_file(f["checkpoint"], family, clip_l=f["clip_l"], t5=f["t5"], vae=f["vae"])
        # the BFL file holds what the documented layout names
        keys = fsf._keys(f["checkpoint"])
        for k in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                  "double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight",
                  "final_layer.adaLN_modulation.1.weight"):
            assert k in keys
        assert ("guidance_in.in_layer.weight" in keys) is (family == "flux")
    ref = _reference(family, str(tiny_flow_dir(family)))
    assert sorted(src.modules) == sorted(ref)
    for name, module in ref.items():
        got = src.modules[name].state_dict()
        want = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        if name == "clip_l":
            want = {k: v for k, v in want.items() if not k.startswith("text_projection")}
        if name == "t5xxl" and family != "sd3":  # t5xxl_fp16.safetensors: fp16 weights, as distributed
            want = {k: v.half().float() for k, v in want.items()}
        assert sorted(k for k in got if not k.endswith("position_ids")) == sorted(want), name
        for k, v in want.items():
            assert torch.equal(got[k], v), (name, k)
    # the configs inferred from the weights behave like the folder's (heads, activations, RoPE axes...)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 900, (1, 77), generator=g)
    with torch.no_grad():
        for name in [n for n in ("clip_l", "clip_g") if n in ref]:
            a = src.modules[name](input_ids=ids, output_hidden_states=True)
            b = ref[name](input_ids=ids, output_hidden_states=True)
            torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2])
        t5_ids = torch.randint(3, 200, (1, 20), generator=g)
        if family != "sd3":  # compare with the fp16-rounded weights the file holds
            for p in ref["t5xxl"].parameters():
                p.copy_(p.half().float())
        torch.testing.assert_close(src.modules["t5xxl"](input_ids=t5_ids).last_hidden_state,
                                   ref["t5xxl"](input_ids=t5_ids).last_hidden_state)
        tr, tref = src.modules["transformer"], ref["transformer"]
        for key in ("axes_dims_rope", "num_attention_heads", "attention_head_dim", "guidance_embeds",
                    "pos_embed_max_size", "qk_norm", "patch_size"):
            assert tr.config.get(key) == tref.config.get(key) or tuple(tr.config.get(key) or ()) == \
                tuple(tref.config.get(key) or ()), key
        img = torch.randn(1, 3, 32, 32, generator=g)
        torch.testing.assert_close(src.modules["vae"].encode(img).latent_dist.mean,
                                   ref["vae"].encode(img).latent_dist.mean)
    assert (src.latent_scale, src.latent_shift) == ((1.5305, 0.0609) if family == "sd3" else (0.3611, 0.1159))


def test_bfl_reader_matches_diffusers_converter_at_flux_width():
    """bfl_to_diffusers (any width) == diffusers' convert_flux_transformer_checkpoint_to_diffusers (FLUX.1's
    3072 only) on a FLUX.1-wide checkpoint of one double and one single block. Each weight row holds its own
    id (an expanded column, so the 3072-wide tensors take no memory), so equal ids = the same mapping."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    d, mlp, ctx, pooled = 3072, 12288, 4096, 768
    shapes = {"img_in": (d, 64), "txt_in": (d, ctx), "time_in.in_layer": (d, 256), "time_in.out_layer": (d, d),
              "vector_in.in_layer": (d, pooled), "vector_in.out_layer": (d, d), "guidance_in.in_layer": (d, 256),
              "guidance_in.out_layer": (d, d), "final_layer.linear": (64, d), "final_layer.adaLN_modulation.1": (2 * d, d)}
    b, s = "double_blocks.0.", "single_blocks.0."
    shapes.update({b + "img_mod.lin": (6 * d, d), b + "txt_mod.lin": (6 * d, d), b + "img_attn.qkv": (3 * d, d),
                   b + "txt_attn.qkv": (3 * d, d), b + "img_attn.proj": (d, d), b + "txt_attn.proj": (d, d),
                   b + "img_mlp.0": (mlp, d), b + "img_mlp.2": (d, mlp), b + "txt_mlp.0": (mlp, d),
                   b + "txt_mlp.2": (d, mlp), s + "modulation.lin": (3 * d, d), s + "linear1": (3 * d + mlp, d),
                   s + "linear2": (d, d + mlp)})
    sd, next_id = {}, 0
    for name, (rows, cols) in shapes.items():
        sd[f"{name}.weight"] = torch.arange(next_id, next_id + rows, dtype=torch.float64)[:, None].expand(rows, cols)
        sd[f"{name}.bias"] = torch.arange(next_id, next_id + rows, dtype=torch.float64) + 0.5
        next_id += rows
    for n in ("img_attn", "txt_attn"):
        for q in ("query_norm", "key_norm"):
            sd[f"{b}{n}.norm.{q}.scale"] = torch.arange(next_id, next_id + 128, dtype=torch.float64)
            next_id += 128
    for q in ("query_norm", "key_norm"):
        sd[f"{s}norm.{q}.scale"] = torch.arange(next_id, next_id + 128, dtype=torch.float64)
        next_id += 128
    ours = fsf.bfl_to_diffusers(dict(sd))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        a = ours[k][:, 0] if ours[k].ndim == 2 else ours[k]
        c = theirs[k][:, 0] if theirs[k].ndim == 2 else theirs[k]
        assert torch.equal(a, c), k
    # and flux_to_bfl inverts it
    back = fsf.flux_to_bfl(ours)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_export_sd3_all_in_one_and_flux_split_files(tmp_path, files, tiny_flow_dir):
    import onnxruntime as ort

    f = files("sd3")
    out = tmp_path / "sd3"
    m = export_model(f["checkpoint"], str(out), tokenizer=str(tiny_flow_dir("sd3")))
    assert m["family"] == "sd3" and m["source_kind"] == "single_file" and m["complete"] is True
    assert list(m["models"]) == ["transformer", "clip_l", "clip_g", "t5xxl", "vae_decoder", "vae_encoder"]
    assert all(t["tokenizer"] for t in m["text_encoders"])
    # the transformer file on its own: a partial export (ComfyUI's UNETLoader file)
    f = files("flux")
    part = export_model(f["checkpoint"], str(tmp_path / "flux-tr"))
    assert list(part["models"]) == ["transformer"] and part["complete"] is False and part["guidance"] is True
    full = export_model(f["checkpoint"], str(tmp_path / "flux"), clip_l=f["clip_l"], t5=f["t5"], vae=f["vae"],
                        tokenizer=str(tiny_flow_dir("flux")))
    assert list(full["models"]) == ["transformer", "clip_l", "t5xxl", "vae_decoder", "vae_encoder"]
    assert read_manifest(str(tmp_path / "flux"))["complete"] is True
    # same network as the diffusers-folder export: same output for the same input
    folder = export_model(str(tiny_flow_dir("flux")), str(tmp_path / "flux-folder"), models=["transformer"])
    assert folder["models"]["transformer"]["inputs"] == full["models"]["transformer"]["inputs"]
    g = np.random.default_rng(0)
    feeds = {"x": g.standard_normal((1, 16, 8, 8), dtype=np.float32), "timestep": np.array([0.7], np.float32),
             "context": g.standard_normal((1, 12, 256), dtype=np.float32),
             "y": g.standard_normal((1, 64), dtype=np.float32), "guidance": np.array([3.5], np.float32)}
    a = ort.InferenceSession(str(tmp_path / "flux" / "transformer.onnx")).run(None, feeds)[0]
    b = ort.InferenceSession(str(tmp_path / "flux-folder" / "transformer.onnx")).run(None, feeds)[0]
    np.testing.assert_array_equal(a, b)


def test_single_file_errors(tmp_path, files, tiny_sd15_dir):
    f = files("flux")
    with pytest.raises(ExportError, match="--family: received sd3"):
        export_model(f["checkpoint"], str(tmp_path / "a"), family="sd3")
    with pytest.raises(ExportError, match="--t5: received .*no such file"):
        export_model(f["checkpoint"], str(tmp_path / "b"), t5=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ExportError, match="t5xxl from .*received weights"):  # a CLIP file given as T5
        export_model(f["checkpoint"], str(tmp_path / "c"), t5=f["clip_l"])
    with pytest.raises(ExportError, match="--clip-l / --clip-g / --t5: received"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "d"), clip_l=f["clip_l"])
    assert not [n for n in os.listdir(tmp_path) if not n.endswith(".export.log")]


def test_sd3_separate_text_encoder_files_and_comfyui_tokenizers(tmp_path, files, tiny_flow_dir):
    """sd3.5_large.safetensors without text encoders + clip_l / clip_g / t5xxl files, inside a ComfyUI tree:
    the tokenizers come from comfy/sd1_tokenizer and comfy/text_encoders/t5_tokenizer."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path / "ComfyUI"
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "clip").mkdir(parents=True)
    tiny_dir = tiny_flow_dir("sd3")
    shutil.copytree(tiny_dir / "tokenizer", root / "comfy" / "sd1_tokenizer")  # vocab.json + merges.txt (+ configs)
    shutil.copytree(tiny_dir / "tokenizer_3", root / "comfy" / "text_encoders" / "t5_tokenizer")
    sd = load_file(files("sd3")["checkpoint"])
    ckpt = root / "models" / "checkpoints" / "sd3.5_large.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("text_encoders.")}, str(ckpt))
    te = {}
    for name in ("clip_l", "clip_g", "t5xxl"):
        te[name] = root / "models" / "clip" / f"{name}.safetensors"
        save_file(fsf._strip(sd, fsf.TE_PREFIX[name]), str(te[name]))
    part = export_model(str(ckpt), str(tmp_path / "no-te"), models=["transformer"])
    assert list(part["models"]) == ["transformer"]
    m = export_model(str(ckpt), str(tmp_path / "out"), clip_l=str(te["clip_l"]), clip_g=str(te["clip_g"]),
                     t5=str(te["t5xxl"]))
    assert m["complete"] is True
    tes = {t["name"]: t for t in m["text_encoders"]}
    for name, t in tes.items():
        assert t["tokenizer_source"].startswith("ComfyUI installation"), t
    # ComfyUI's padding per tower: clip_l pads with <|endoftext|>, clip_g with id 0; T5 with <pad> = 0
    assert tes["clip_l"]["pad_token_id"] == tes["clip_l"]["eos_token_id"]
    assert tes["clip_g"]["pad_token_id"] == 0
    assert (tes["t5xxl"]["pad_token_id"], tes["t5xxl"]["eos_token_id"]) == (0, 1)
    assert os.path.isfile(tmp_path / "out" / tes["t5xxl"]["tokenizer"] / "tokenizer.json")


def test_scaled_fp8_t5_file_reads_as_weight_times_scale(tmp_path, files):
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled.safetensors layout: fp8 weights, a float32 ``scale_weight`` each, a
    ``scaled_fp8`` marker. The loaded weight is what ComfyUI's scaled-fp8 linear computes with: fp8 * scale."""
    import torch
    from safetensors.torch import load_file, save_file

    plain = load_file(files("flux")["t5"])
    scaled, expected = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in plain.items():
        if key.endswith(".weight") and value.ndim == 2 and "shared" not in key:
            scale = value.abs().max().float() / 448.0  # e4m3fn's largest value
            q = (value.float() / scale).to(torch.float8_e4m3fn)
            scaled[key], scaled[key[:-6] + "scale_weight"] = q, scale.reshape(())
            scaled[key[:-6] + "scale_input"] = torch.ones(())
            expected[key] = q.float() * scale
        else:
            scaled[key] = value
            expected[key] = value.float()
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(scaled, str(path))
    got = fsf._load(str(path), "--t5")
    assert set(got) == set(expected)  # markers and scales dropped
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    assert fsf.unscale_fp8(dict(plain)).keys() == plain.keys()  # no marker: unchanged
