"""Export of the tiny diffusers fixtures: ONNX vs torch, manifest schema, SDXL y, atomicity, bad input."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from ksampler_rt.export import onnx_export  # noqa: E402
from ksampler_rt.export.adm import sdxl_adm, timestep_embedding  # noqa: E402
from ksampler_rt.export.errors import ExportError  # noqa: E402
from ksampler_rt.export.manifest import REQUIRED_KEYS, read_manifest  # noqa: E402
from ksampler_rt.export.onnx_export import export_model  # noqa: E402

MODELS = {"sd15": ["unet", "clip", "vae_decoder", "vae_encoder"],
          "sd2-v": ["unet", "clip", "vae_decoder", "vae_encoder"],
          "sdxl": ["unet", "clip", "clip2", "vae_decoder", "vae_encoder"]}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: one intra-op thread is as fast as two on an idle box and far faster on a busy one
    (spinning OpenMP workers); ONNX Runtime follows torch's setting in validation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sd15_dir, tiny_sd2v_dir, tiny_sdxl_dir):
    cache = {}

    def get(family):
        if family not in cache:
            src = {"sd15": tiny_sd15_dir, "sd2-v": tiny_sd2v_dir, "sdxl": tiny_sdxl_dir}[family]
            out = tmp_path_factory.mktemp("exp") / family
            export_model(str(src), str(out))
            cache[family] = (str(src), str(out))
        return cache[family]
    return get


def _no_leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_export_family_fp32(exported, family):
    src, out = exported(family)
    m = read_manifest(out)
    for k in REQUIRED_KEYS:
        assert k in m
    assert m["family"] == family and m["precision"] == "fp32" and m["opset"] == 17
    assert m["prediction"] == ("v" if family == "sd2-v" else "eps")
    assert m["schedule"] == {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012,
                             "timesteps": 1000, "zsnr": False}
    assert m["latent_channels"] == 4
    assert m["latent_scale"] == pytest.approx(0.13025 if family == "sdxl" else 0.18215)
    ucfg = json.load(open(os.path.join(src, "unet", "config.json")))
    assert m["adm_channels"] == (ucfg["projection_class_embeddings_input_dim"] if family == "sdxl" else 0)
    if family == "sdxl":
        assert m["adm_channels"] == 64 + 6 * ucfg["addition_time_embed_dim"]
    assert sorted(m["models"]) == sorted(MODELS[family])
    assert set(m["versions"]) == {"torch", "diffusers", "transformers", "onnx", "onnxruntime", "ksampler_rt"}
    assert len(m["weights_hash"]) == 64
    for name, info in m["models"].items():
        assert os.path.isfile(os.path.join(out, info["file"]))
        v = info["validation"]
        assert v["max_abs_err"] < 1e-4 and v["max_rel_err"] < 1e-4, (name, v)
        assert len(v["shapes"]) == 2 and v["shapes"][0] != v["shapes"][1]
        assert info["external_data"] is False
        # graph I/O names/dims as the manifest says, symbolic dims kept
        g = onnx.load(os.path.join(out, info["file"]), load_external_data=False).graph
        assert [i.name for i in g.input] == [i["name"] for i in info["inputs"]]
        assert [o.name for o in g.output] == [o["name"] for o in info["outputs"]]
        for vi, spec in zip(g.input, info["inputs"]):
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert dims == spec["shape"]
        # every torch parameter used by the graph is a named initializer
        imap = m["initializer_map"][name]
        inits = {i.name for i in g.initializer}
        assert imap and all(v in inits for v in imap.values())
    unet_in = [i["name"] for i in m["models"]["unet"]["inputs"]]
    assert unet_in == ["sample", "timestep", "encoder_hidden_states"] + (["y"] if family == "sdxl" else [])
    # all UNet parameters are mapped (nothing constant-folded away)
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    assert set(m["initializer_map"]["unet"]) == {n for n, _ in unet.named_parameters()}
    for te in m["text_encoders"]:
        assert te["tokenizer"] and os.path.isdir(os.path.join(out, te["tokenizer"]))
        assert te["pad_token_id"] is not None
    assert not _no_leftovers(os.path.dirname(out))


def test_unet_dynamic_third_shape(exported, tiny_sd15_dir):
    """A shape never seen at export or validation time (B=3, 40x24 latent, T=231)."""
    from diffusers import UNet2DConditionModel
    src, out = exported("sd15")
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
    g = torch.Generator().manual_seed(5)
    x, t, c = torch.randn(3, 4, 40, 24, generator=g), torch.tensor([1.0, 500.5, 999.0]), torch.randn(3, 231, 32, generator=g)
    sess = ort.InferenceSession(os.path.join(out, "unet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy()})[0]
    with torch.no_grad():
        ref = unet(x, t, c).sample.numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    v = [1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0]
    ref = get_timestep_embedding(torch.tensor(v), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    assert np.abs(timestep_embedding(v, 256) - ref).max() < 1e-4  # float32 sin/cos of args ~1e3


def test_sdxl_y_is_comfy_encode_adm(exported):
    """ComfyUI's y (pooled + 6 embedded size/crop/target ids) through the ONNX UNet == diffusers' own
    text_embeds/time_ids path of the same UNet."""
    from diffusers import UNet2DConditionModel
    src, out = exported("sdxl")
    m = read_manifest(out)
    adm = m["sdxl_adm"]
    assert adm["pooled_dim"] == 64 and len(adm["time_ids"]) == 6
    assert m["adm_channels"] == 64 + 6 * adm["time_embed_dim"]
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
    g = torch.Generator().manual_seed(9)
    pooled = torch.randn(2, 64, generator=g)
    w, h, cw, ch, tw, th = 1024, 768, 16, 32, 1152, 896
    y = sdxl_adm(pooled.numpy(), w, h, crop_w=cw, crop_h=ch, target_width=tw, target_height=th,
                 embed_dim=adm["time_embed_dim"])
    assert y.shape == (2, m["adm_channels"])
    x, t, c = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 96, generator=g)
    # diffusers order: original_size (h, w), crops_coords_top_left (top=crop_h, left=crop_w), target_size (h, w)
    time_ids = torch.tensor([[h, w, ch, cw, th, tw]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ref = unet(x, t, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.numpy()
    sess = ort.InferenceSession(os.path.join(out, "unet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy(), "y": y})[0]
    assert np.abs(got - ref).max() < 1e-4


def test_clip_outputs(exported):
    from transformers import CLIPTextModelWithProjection
    src, out = exported("sdxl")
    te = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2").eval()
    ids = torch.full((1, 77), 0, dtype=torch.int64)
    ids[0, :5] = torch.tensor([912, 10, 20, 30, 913])
    sess = ort.InferenceSession(os.path.join(out, "clip2.onnx"), providers=["CPUExecutionProvider"])
    last, pen, pen_norm, pooled, layers, layers_norm = sess.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        o = te(ids, output_hidden_states=True)
    assert np.abs(pen - o.hidden_states[-2].numpy()).max() < 1e-4
    assert np.abs(last - o.last_hidden_state.numpy()).max() < 1e-4
    assert np.abs(pooled - o.text_embeds.numpy()).max() < 1e-4
    tm = te.text_model
    assert np.abs(pen_norm - tm.final_layer_norm(o.hidden_states[-2]).detach().numpy()).max() < 1e-4
    assert layers.shape[1] == te.config.num_hidden_layers  # every layer's output, for any CLIPSetLastLayer
    for i in range(layers.shape[1]):
        hidden = o.hidden_states[i + 1]
        assert np.abs(layers[:, i] - hidden.numpy()).max() < 1e-4
        assert np.abs(layers_norm[:, i] - tm.final_layer_norm(hidden).detach().numpy()).max() < 1e-4


# ------------------------------------------------------------------------------------------- bad input

def test_missing_path(tmp_path):
    with pytest.raises(ExportError, match="no such file"):
        export_model(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_folder_missing_component(tmp_path, tiny_sd15_dir):
    bad = tmp_path / "model"
    shutil.copytree(tiny_sd15_dir, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(ExportError, match="missing component 'vae/'"):
        export_model(str(bad), str(tmp_path / "out"))
    shutil.copytree(tiny_sd15_dir / "vae", bad / "vae")
    shutil.rmtree(bad / "text_encoder")
    with pytest.raises(ExportError, match="text_encoder"):
        export_model(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)


def test_unsupported_family(tmp_path, tiny_sd15_dir):
    with pytest.raises(ExportError, match="--family: received 'sd4', expected one of sd15, sd2, sd2-v, sdxl, "
                                          "sdxl-refiner, sd3, flux, flux-schnell"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "out"), family="sd4")
    with pytest.raises(ExportError, match="--family: received sdxl, expected sd15: .* does not match"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "out"), family="sdxl")


def test_cli_errors(tmp_path, tiny_sd15_dir, capsys):
    from ksampler_rt.cli import main
    assert main(["export", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_sd15_dir), "--out", str(tmp_path / "o"), "--family", "sd4"])
    assert e.value.code == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(tiny_sd15_dir), "--out", str(tmp_path / "full")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_validation_failure_leaves_nothing(tmp_path, tiny_sd15_dir, monkeypatch):
    from ksampler_rt.export import validate as validate_mod
    monkeypatch.setattr(validate_mod, "validate",
                        lambda *a, **k: {"max_abs_err": 0.5, "max_rel_err": 0.25, "shapes": []})
    with pytest.raises(ExportError, match="clip.onnx failed validation: max_rel_err 0.25 > tolerance 0.001"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "out"), models=["clip"])
    assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)


def test_no_space(tmp_path, tiny_sd15_dir, monkeypatch):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(onnx_export.shutil, "disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(ExportError, match="no space left"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)


def test_enospc_and_interrupt_mid_export(tmp_path, tiny_sd15_dir, monkeypatch):
    import errno
    real = onnx_export.finalize_onnx

    def write_then_fail(scratch, final, spec):
        real(scratch, final, spec)  # a real file lands in the temp dir, then the disk "fills up"
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(onnx_export, "finalize_onnx", write_then_fail)
    with pytest.raises(ExportError, match="no space left on device"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "out"), models=["clip"])
    assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(onnx_export, "finalize_onnx", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_model(str(tiny_sd15_dir), str(tmp_path / "out"), models=["clip"])
    assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)


def test_models_subset_errors(tmp_path, tiny_sd15_dir):
    with pytest.raises(ExportError, match=r"models: received \['clip2'\], expected a non-empty subset of"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "out"), models=["clip2"])  # sd15 has no clip2
    with pytest.raises(ExportError, match=r"models: received \[\], expected a non-empty subset of"):
        export_model(str(tiny_sd15_dir), str(tmp_path / "out"), models=[])
    assert not (tmp_path / "out").exists() and not _no_leftovers(tmp_path)


@pytest.mark.slow  # ~25 s CPU: torch.export's symbolic-shape tracing + decomposition of the tiny UNet
def test_dynamo_exporter_unet(tmp_path, tiny_sd15_dir):
    """The non-default exporter, once: torch.export + onnxscript, tiny SD1.5 UNet only, validated against torch
    at two shapes by the export itself, then at a third shape here; every parameter stays a named initializer."""
    from diffusers import UNet2DConditionModel
    out = tmp_path / "dyn"
    m = export_model(str(tiny_sd15_dir), str(out), exporter="dynamo", models=["unet"])
    assert m["exporter"] == "dynamo" and list(m["models"]) == ["unet"] and m["text_encoders"] == []
    assert m["opset"] == 18  # the dynamo exporter emits opset >= 18 (17 requested by default)
    v = m["models"]["unet"]["validation"]
    assert len(v["shapes"]) == 2 and v["shapes"][0] != v["shapes"][1]
    assert v["max_rel_err"] < 1e-4, v
    g = onnx.load(str(out / "unet.onnx"), load_external_data=False).graph
    assert [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input] == \
        [i["shape"] for i in m["models"]["unet"]["inputs"]]
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet").eval()
    assert set(m["initializer_map"]["unet"]) == {n for n, _ in unet.named_parameters()}
    assert set(m["initializer_map"]["unet"].values()) <= {i.name for i in g.initializer}
    g3 = torch.Generator().manual_seed(6)
    x, t, c = torch.randn(3, 4, 8, 12, generator=g3), torch.tensor([2.0, 400.0, 990.0]), torch.randn(3, 231, 32, generator=g3)
    sess = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy()})[0]
    with torch.no_grad():
        ref = unet(x, t, c).sample.numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_manifest_is_json_roundtrip(exported):
    _, out = exported("sd15")
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["format"] == "ksampler-rt-export" and m["format_version"] == 1
    assert m["text_encoders"][0]["context_output"] == "last_hidden_state"
