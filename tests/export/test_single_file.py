"""Single-file (LDM key layout) checkpoints: family detection, conversion, export round trip."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from ksampler_rt.export.errors import ExportError  # noqa: E402
from ksampler_rt.export.families import SUPPORTED_FAMILIES, config_dir  # noqa: E402
from ksampler_rt.export.ldm_writer import write_single_file_checkpoint  # noqa: E402
from ksampler_rt.export.single_file import detect_family, load_single_file, read_safetensors_header  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_sd15_dir, tiny_sd2v_dir, tiny_sdxl_dir):
    d = tmp_path_factory.mktemp("single")
    return {
        "sd15": (tiny_sd15_dir, write_single_file_checkpoint(tiny_sd15_dir, d / "sd15.safetensors")),
        "sd2-v": (tiny_sd2v_dir, write_single_file_checkpoint(tiny_sd2v_dir, d / "sd2.safetensors")),
        "sdxl": (tiny_sdxl_dir, write_single_file_checkpoint(tiny_sdxl_dir, d / "sdxl.safetensors")),
    }


def test_detect_families(ckpts):
    assert detect_family(read_safetensors_header(ckpts["sd15"][1])) == ("sd15", "eps")
    assert detect_family(read_safetensors_header(ckpts["sdxl"][1])) == ("sdxl", "eps")
    h2 = read_safetensors_header(ckpts["sd2-v"][1])
    with pytest.raises(ExportError, match="--prediction"):
        detect_family(h2)
    assert detect_family(h2, prediction="v") == ("sd2-v", "v")
    assert detect_family(h2, prediction="eps") == ("sd2", "eps")
    assert detect_family(h2, family="sd2-v") == ("sd2-v", "v")
    assert detect_family(dict(h2, v_pred=("F32", (0,)))) == ("sd2-v", "v")
    with pytest.raises(ExportError, match="does not match"):
        detect_family(h2, family="sd15")
    # refiner: only OpenCLIP-bigG as embedder 0, with ADM
    hx = read_safetensors_header(ckpts["sdxl"][1])
    ref = {k.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): v
           for k, v in hx.items() if not k.startswith("conditioner.embedders.0.transformer.")}
    assert detect_family(ref) == ("sdxl-refiner", "eps")


def test_detect_rejects(tmp_path, ckpts):
    with pytest.raises(ExportError, match="model.diffusion_model.input_blocks.0.0.weight"):
        detect_family({"foo.weight": ("F32", (2,)), "bar": ("F32", (1,))})
    with pytest.raises(ExportError, match="SD3.*supported: sd15, sd2, sd2-v, sdxl, sdxl-refiner"):
        detect_family({"model.joint_blocks.0.x.weight": ("F32", (2,))})
    h = read_safetensors_header(ckpts["sd15"][1])
    h["model.diffusion_model.input_blocks.0.0.weight"] = ("F32", (32, 9, 3, 3))
    with pytest.raises(ExportError, match="9 input channels"):
        detect_family(h)
    # a real safetensors file that is not SD; and a file that is not safetensors at all
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    from ksampler_rt.export.onnx_export import export_model
    with pytest.raises(ExportError, match="not a Stable Diffusion checkpoint.*expected"):
        export_model(str(tmp_path / "other.safetensors"), str(tmp_path / "out"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ExportError, match="not a safetensors file"):
        export_model(str(tmp_path / "junk.safetensors"), str(tmp_path / "out"))
    with pytest.raises(ExportError, match="--prediction"):
        export_model(ckpts["sd2-v"][1], str(tmp_path / "out"), config=str(ckpts["sd2-v"][0]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
def test_conversion_is_exact(ckpts, family):
    """LDM file -> diffusers' from_single_file/convert_* with a local config == the original folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    src, f = ckpts[family]
    fam, pred, mods, _ = load_single_file(f, prediction="v" if family == "sd2-v" else None, config=str(src))
    assert fam == family
    refs = {"unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet"),
            "vae": AutoencoderKL.from_pretrained(src, subfolder="vae"),
            "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder")}
    if family == "sdxl":
        refs["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2")
    assert set(mods) == set(refs)
    for name, ref in refs.items():
        a, b = ref.state_dict(), mods[name].state_dict()
        assert set(a) <= set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_single_file_export_roundtrip(ckpts, tmp_path):
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel
    from ksampler_rt.export.manifest import read_manifest
    from ksampler_rt.export.onnx_export import export_model
    src, f = ckpts["sd15"]
    out = tmp_path / "out"
    export_model(f, str(out), config=str(src))
    m = read_manifest(str(out))
    assert m["family"] == "sd15" and m["source_kind"] == "single_file" and m["source"] == os.path.abspath(f)
    assert m["weights_hash"] == hashlib.sha256(open(f, "rb").read()).hexdigest()
    assert m["text_encoders"][0]["tokenizer"] == "tokenizer"  # taken from --config
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
    g = torch.Generator().manual_seed(3)
    x, t, c = torch.randn(2, 4, 16, 8, generator=g), torch.tensor([3.0, 700.0]), torch.randn(2, 154, 32, generator=g)
    sess = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy()})[0]
    with torch.no_grad():
        ref = unet(x, t, c).sample.numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_packaged_configs_are_the_real_architectures():
    """Shipped configs build the published parameter counts (meta device: no memory, no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    expect_unet = {"sd15": 859_520_964, "sd2": 865_910_724, "sd2-v": 865_910_724, "sdxl": 2_567_463_684,
                   "sdxl-refiner": 2_259_526_660}
    for fam in SUPPORTED_FAMILIES:
        d = config_dir(fam)
        with torch.device("meta"):
            u = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d, subfolder="unet"))
            v = AutoencoderKL.from_config(AutoencoderKL.load_config(d, subfolder="vae"))
            assert sum(p.numel() for p in u.parameters()) == expect_unet[fam]
            assert sum(p.numel() for p in v.parameters()) == 83_653_863
            if fam != "sdxl-refiner":
                te = CLIPTextModel(CLIPTextConfig.from_pretrained(d, subfolder="text_encoder"))
                n = sum(p.numel() for p in te.parameters())
                assert n == {"sd15": 123_060_480, "sdxl": 123_060_480}.get(fam, 340_387_840)
            if fam.startswith("sdxl"):
                te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d, subfolder="text_encoder_2"))
                assert sum(p.numel() for p in te2.parameters()) == 694_659_840
        if fam == "sdxl":
            assert u.config.projection_class_embeddings_input_dim == 1280 + 6 * 256
        if fam == "sdxl-refiner":
            assert u.config.projection_class_embeddings_input_dim == 1280 + 5 * 256
