"""ControlNet / T2I-Adapter export (issue #21): layouts, manifests, ONNX vs diffusers, the residual-taking UNet.

References are diffusers' own modules (``ControlNetModel``, ``T2IAdapter``, ``UNet2DConditionModel`` called with
``down_block_additional_residuals`` / ``down_intrablock_additional_residuals``), run in torch on the same weights.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

import torch  # noqa: E402

from tests.export.controlnet_fixtures import (tiny_control_source, tiny_controlnet_export,  # noqa: E402
                                              tiny_t2i_adapter_export)

SHAPES = [(1, 8, 8, 1), (2, 12, 16, 2)]  # (batch, h, w, context chunks of 77): two latent shapes


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("controlnet")


def _sess(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _case(family, i, ctx_dim):
    """Inputs for shape i: latent, timestep, context, hint in [0,1], SDXL pooled + y + diffusers time_ids."""
    from ksampler_rt.export.adm import sdxl_adm

    b, h, w, t = SHAPES[i]
    g = torch.Generator().manual_seed(100 + i)
    c = {"sample": torch.randn(b, 4, h, w, generator=g), "timestep": torch.rand(b, generator=g) * 999,
         "encoder_hidden_states": torch.randn(b, 77 * t, ctx_dim, generator=g),
         "controlnet_cond": torch.rand(b, 3, 8 * h, 8 * w, generator=g)}
    if family == "sdxl":
        pooled = torch.randn(b, 64, generator=g)
        c["pooled"] = pooled
        c["y"] = torch.from_numpy(sdxl_adm(pooled.numpy(), width=8 * w, height=8 * h))
        c["time_ids"] = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]] * b, dtype=torch.float32)
    return c


def _diffusers_kw(family, c):
    return {"added_cond_kwargs": {"text_embeds": c["pooled"], "time_ids": c["time_ids"]}} if family == "sdxl" else {}


def _feeds(sess, c):
    return {i.name: c[i.name].numpy() for i in sess.get_inputs() if i.name in c}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_and_unet_control_match_diffusers(family, root):
    from diffusers import ControlNetModel, UNet2DConditionModel

    sd_export, cn_export, src = tiny_controlnet_export(family, root)
    m = json.loads((cn_export / "manifest.json").read_text())
    assert m["kind"] == "controlnet" and m["family"] == family
    for key in ("initializer_map", "weights_hash", "control_outputs", "models"):
        assert key in m
    assert list(m["models"]) == ["controlnet"] and set(m["initializer_map"]) == {"controlnet"}
    sm = json.loads((sd_export / "manifest.json").read_text())
    assert sm["initializer_map"]["unet_control"] == sm["initializer_map"]["unet"]  # LoRA maps onto both
    assert sm["control_inputs"]["down"] == m["control_outputs"]["down"]

    cn = ControlNetModel.from_pretrained(src / "controlnet").eval()
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    cn_sess, u_sess, uc_sess = (_sess(cn_export / "controlnet.onnx"), _sess(sd_export / "unet.onnx"),
                                _sess(sd_export / "unet_control.onnx"))
    names = m["control_outputs"]["down"] + [m["control_outputs"]["mid"]]
    assert [o.name for o in cn_sess.get_outputs()] == names
    for i in range(2):
        c = _case(family, i, unet.config.cross_attention_dim)
        with torch.no_grad():
            down, mid = cn(c["sample"], c["timestep"], c["encoder_hidden_states"], c["controlnet_cond"],
                           return_dict=False, **_diffusers_kw(family, c))
            ref_plain = unet(c["sample"], c["timestep"], c["encoder_hidden_states"], return_dict=False,
                             **_diffusers_kw(family, c))[0]
            ref_ctrl = unet(c["sample"], c["timestep"], c["encoder_hidden_states"], return_dict=False,
                            down_block_additional_residuals=list(down), mid_block_additional_residual=mid,
                            **_diffusers_kw(family, c))[0]
        got = cn_sess.run(names, _feeds(cn_sess, c))
        for g, r in zip(got, list(down) + [mid]):
            assert _rel(g, r.numpy()) < 1e-4
        assert float(np.abs(got[0]).max()) > 0.1  # the tiny ControlNet's zero convs are not zero

        feeds = _feeds(uc_sess, c)
        zeros = dict(feeds, **{i.name: _zero(uc_sess, i.name, c["sample"].shape)
                               for i in uc_sess.get_inputs() if i.name not in feeds})
        plain = u_sess.run(None, _feeds(u_sess, c))[0]
        np.testing.assert_array_equal(uc_sess.run(None, zeros)[0], plain)  # zeros change nothing, bit for bit
        assert _rel(plain, ref_plain.numpy()) < 1e-4
        ctrl = dict(zeros, **{k: v for k, v in zip(names, got)})
        out = uc_sess.run(None, ctrl)[0]
        assert _rel(out, ref_ctrl.numpy()) < 1e-4
        assert _rel(out, plain) > 1e-2  # the residuals do reach the UNet


def _zero(sess, name, sample_shape):
    b, _, h, w = sample_shape
    inp = next(i for i in sess.get_inputs() if i.name == name)
    s = 1 if inp.shape[2] == "h" else int(inp.shape[2].split("_")[1])
    return np.zeros((b, inp.shape[1], -(-h // s), -(-w // s)), np.float32)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_t2i_adapter_export_and_unet_intrablock(family, root):
    from diffusers import T2IAdapter, UNet2DConditionModel

    sd_export, _, src = tiny_controlnet_export(family, root)
    ad_export = tiny_t2i_adapter_export(family, root)
    m = json.loads((ad_export / "manifest.json").read_text())
    assert m["kind"] == "t2i_adapter" and m["family"] == family
    feats_names = m["control_outputs"]["features"]
    ad = T2IAdapter.from_pretrained(src / "t2i_adapter").eval()
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    ad_sess, uc_sess = _sess(ad_export / "t2i_adapter.onnx"), _sess(sd_export / "unet_control.onnx")
    for i in range(2):
        c = _case(family, i, unet.config.cross_attention_dim)
        with torch.no_grad():
            feats = ad(c["controlnet_cond"])
            ref = unet(c["sample"], c["timestep"], c["encoder_hidden_states"], return_dict=False,
                       down_intrablock_additional_residuals=list(feats), **_diffusers_kw(family, c))[0]
        got = ad_sess.run(feats_names, {"controlnet_cond": c["controlnet_cond"].numpy()})
        for g, r in zip(got, feats):
            assert _rel(g, r.numpy()) < 1e-4
        feeds = _feeds(uc_sess, c)
        for inp in uc_sess.get_inputs():
            if inp.name.startswith(("down_", "mid", "adapter")):
                feeds[inp.name] = _zero(uc_sess, inp.name, c["sample"].shape)
        for k, g in enumerate(got):
            assert feeds[f"adapter_{k}"].shape == g.shape
            feeds[f"adapter_{k}"] = g
        assert _rel(uc_sess.run(None, feeds)[0], ref.numpy()) < 1e-4


LAYOUTS = [("sd15", "controlnet", "ldm"), ("sd15", "controlnet", "ldm_prefixed"),
           ("sd15", "controlnet", "diffusers_file"), ("sdxl", "controlnet", "ldm"),
           ("sdxl", "controlnet", "diffusers_file"), ("sd15", "t2i_adapter", "diffusers_file"),
           ("sd15", "t2i_adapter", "original"), ("sdxl", "t2i_adapter", "original")]


@pytest.mark.parametrize("family,kind,layout", LAYOUTS)
def test_single_file_layouts_round_trip(family, kind, layout, root):
    """Each layout written from the tiny diffusers module loads back to exactly its weights."""
    from safetensors.torch import load_file

    from ksampler_rt.export.controlnet_single_file import (control_layout, load_controlnet, load_t2i_adapter,
                                                           write_control_file)
    src = tiny_control_source(family, root)
    f = write_control_file(src / kind, root / f"{family}-{kind}-{layout}.safetensors", layout)
    want = (kind, "ldm" if layout.startswith("ldm") else layout)
    assert control_layout(f) == want
    ref = load_file(src / kind / "diffusion_pytorch_model.safetensors")
    ref_cfg = json.loads((src / kind / "config.json").read_text())
    if kind == "controlnet":
        module, fam, _ = load_controlnet(f, want[1], None, None)  # structure from the weights alone
        for key in ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
                    "transformer_layers_per_block", "use_linear_projection", "conditioning_embedding_out_channels",
                    "addition_embed_type", "projection_class_embeddings_input_dim"):
            assert json.loads(json.dumps(module.config[key])) == ref_cfg[key], key
    else:
        module, fam, _ = load_t2i_adapter(f, want[1], None)
        for key in ("channels", "adapter_type", "downscale_factor", "in_channels", "num_res_blocks"):
            assert json.loads(json.dumps(module.config[key])) == ref_cfg[key], key
    assert fam == family
    got = module.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_whole_cldm_checkpoint_uses_only_control_model_keys(root):
    """A ControlNet v1.0-style file also holds the SD model (model.diffusion_model., first_stage_model.)."""
    from safetensors.torch import load_file, save_file

    from ksampler_rt.export.controlnet_single_file import load_controlnet, write_control_file
    src = tiny_control_source("sd15", root)
    f = write_control_file(src / "controlnet", root / "whole.safetensors", "ldm_prefixed")
    sd = load_file(f)
    sd.update({"model.diffusion_model." + k.removeprefix("control_model."): v + 1 for k, v in sd.items()
               if k.startswith("control_model.input_blocks.")})
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    save_file(sd, f)
    module, _, _ = load_controlnet(f, "ldm", str(src), None)
    ref = load_file(src / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in ref.items())


def test_single_file_exports_equal_the_folder_export(root):
    """An SD1.5 cldm file (under control_model.) exported with --config <checkpoint folder> gives the diffusers
    folder's ONNX outputs (the other layouts load to the same weights: test_single_file_layouts_round_trip)."""
    from ksampler_rt.export.controlnet_single_file import write_control_file
    from ksampler_rt.export.onnx_export import export_model

    for family, layout in (("sd15", "ldm_prefixed"),):
        _, cn_export, src = tiny_controlnet_export(family, root)
        f = write_control_file(src / "controlnet", root / f"export-{family}.safetensors", layout)
        m = export_model(f, str(root / f"single-{family}"), config=str(src))
        assert (m["kind"], m["family"], m["source_layout"]) == ("controlnet", family, layout.removesuffix("_prefixed"))
        a, b = _sess(cn_export / "controlnet.onnx"), _sess(root / f"single-{family}" / "controlnet.onnx")
        c = _case(family, 0, 96 if family == "sdxl" else 32)
        for x, y in zip(a.run(None, _feeds(a, c)), b.run(None, _feeds(b, c))):
            np.testing.assert_array_equal(x, y)


def test_family_refusals(root, tmp_path):
    from diffusers import ControlNetModel

    from ksampler_rt.export.controlnet_single_file import load_controlnet, load_t2i_adapter
    from ksampler_rt.export.errors import ExportError
    from ksampler_rt.export.onnx_export import export_model

    src = tiny_control_source("sd15", root)
    with pytest.raises(ExportError, match="--family: received sdxl, expected sd15"):
        load_controlnet(str(src / "controlnet"), "diffusers", None, "sdxl")
    with pytest.raises(ExportError, match="--family: received sdxl, expected sd15"):
        load_t2i_adapter(str(src / "t2i_adapter"), "diffusers", "sdxl")
    cfg = dict(ControlNetModel.load_config(src / "controlnet"), cross_attention_dim=40)
    odd = tmp_path / "odd-controlnet"
    ControlNetModel.from_config(cfg).save_pretrained(odd)
    with pytest.raises(ExportError, match="received cross_attention_dim=40"):
        export_model(str(odd), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_make_tiny_model_cli_writes_deterministic_controlnet_and_adapter(root, tmp_path):
    from ksampler_rt.cli import main

    src = tiny_control_source("sd15", root)
    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", "sd15", "--controlnet", "--t2i-adapter"]) == 0
    for sub in ("controlnet", "t2i_adapter"):
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            assert (tmp_path / "m" / sub / name).read_bytes() == (src / sub / name).read_bytes()


SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("family,unet_cfg", [("sd15", SD15_UNET), ("sdxl", SDXL_UNET)])
def test_real_size_structure_on_meta_tensors(family, unet_cfg):
    """Full-size SD1.5 / SDXL ControlNets and T2I-Adapters (shapes only, meta tensors): the cldm round trip gives
    back the config (heads by the family convention), and the residual / feature shapes the ControlNet and adapter
    produce are the ones unet_control declares for the real UNet."""
    from diffusers import ControlNetModel, T2IAdapter

    from ksampler_rt.export.controlnet_single_file import (_cn_to_ldm, _heads, _ldm_to_diffusers,
                                                           _original_to_diffusers_adapter, family_of_controlnet,
                                                           infer_adapter_config, infer_controlnet_config)
    from ksampler_rt.export.wrappers import control_residual_layout

    with torch.device("meta"):
        cn = ControlNetModel(**unet_cfg)
        xl = family == "sdxl"
        ad = T2IAdapter(channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=16 if xl else 8,
                        adapter_type="full_adapter_xl" if xl else "full_adapter")
    sd = cn.state_dict()
    back = _ldm_to_diffusers({"control_model." + k: v for k, v in _cn_to_ldm(sd, dict(cn.config)).items()})
    assert set(back) == set(sd)
    cfg = infer_controlnet_config(back)
    assert family_of_controlnet(cfg, None) == family
    cfg.update(_heads(cfg, family))
    for key, want in unet_cfg.items():
        got = cfg.get(key)
        assert json.loads(json.dumps(got)) == json.loads(json.dumps(want)), key

    layout = control_residual_layout(cn.config)
    h = 16
    x = torch.empty(1, 4, h, h, device="meta")
    kw = {"added_cond_kwargs": {"text_embeds": torch.empty(1, 1280, device="meta"),
                                "time_ids": torch.empty(1, 6, device="meta")}} if xl else {}
    down, mid = cn(x, torch.empty(1, device="meta"), torch.empty(1, 77, unet_cfg["cross_attention_dim"], device="meta"),
                   torch.empty(1, 3, 8 * h, 8 * h, device="meta"), return_dict=False, **kw)
    assert [(r.shape[1], h // r.shape[2]) for r in down] == layout["down"]
    assert (mid.shape[1], h // mid.shape[2]) == layout["mid"]
    feats = ad(torch.empty(1, 3, 8 * h, 8 * h, device="meta"))
    want = layout["adapter"] + ([layout["adapter_mid"]] if len(feats) > len(layout["adapter"]) else [])
    assert [(f.shape[1], h // f.shape[2]) for f in feats] == want

    orig = {}
    for k, v in ad.state_dict().items():  # the TencentARC layout ComfyUI reads (its load_t2i_adapter, inverted)
        parts = k.split(".")
        if parts[1] == "body" and parts[3] == "resnets":
            orig[f"body.{2 * int(parts[2]) + int(parts[4])}.{'.'.join(parts[5:])}"] = v
        elif parts[1] == "body":
            orig[f"body.{2 * int(parts[2])}.{'.'.join(parts[3:])}"] = v
        else:
            orig[".".join(parts[1:])] = v
    conv = _original_to_diffusers_adapter(orig)
    assert set(conv) == set(ad.state_dict())
    acfg = infer_adapter_config(conv)
    assert (acfg["adapter_type"], acfg["channels"], acfg["downscale_factor"]) == (
        ad.config.adapter_type, [320, 640, 1280, 1280], 16 if xl else 8)
