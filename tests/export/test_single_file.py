"""Single-file (LDM key layout) checkpoints: family detection, conversion, export round trip."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from ksampler_rt.export.errors import ExportError  # noqa: E402
from ksampler_rt.export.families import SUPPORTED_FAMILIES, config_dir  # noqa: E402
from ksampler_rt.export.ldm_writer import write_single_file_checkpoint  # noqa: E402
from ksampler_rt.export.single_file import detect_family, load_single_file, read_safetensors_header  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: far faster on a busy box, no slower on an idle one
    yield
    torch.set_num_threads(n)


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
    with pytest.raises(ExportError, match="checkpoint family: received 'SD3.*', expected one of sd15, sd2, sd2-v, sdxl, sdxl-refiner"):
        detect_family({"model.joint_blocks.0.x.weight": ("F32", (2,))})
    h = read_safetensors_header(ckpts["sd15"][1])
    h["model.diffusion_model.input_blocks.0.0.weight"] = ("F32", (32, 9, 3, 3))
    with pytest.raises(ExportError, match="UNet input channels: received 9, expected 4"):
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


@pytest.fixture(scope="module")
def configs_only(tmp_path_factory, tiny_sd15_dir, tiny_sd2v_dir, tiny_sdxl_dir):
    """The tiny folders' configs without tokenizer folders (what a single-file user has: no tokenizer)."""
    d = tmp_path_factory.mktemp("cfg")
    ignore = shutil.ignore_patterns("tokenizer*", "*.safetensors")
    return {fam: shutil.copytree(src, d / fam, ignore=ignore)
            for fam, src in (("sd15", tiny_sd15_dir), ("sd2-v", tiny_sd2v_dir), ("sdxl", tiny_sdxl_dir))}


@pytest.fixture
def no_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so the machine's own cache cannot satisfy a lookup."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _comfyui_tree(root, ckpt, tok_src):
    """<root>/ComfyUI/{comfy/sd1_tokenizer/, models/checkpoints/sub/<ckpt>}: ComfyUI's layout (its sd1_tokenizer
    holds vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; pad = <|endoftext|>)."""
    comfy = root / "ComfyUI"
    shutil.copytree(tok_src, comfy / "comfy" / "sd1_tokenizer")
    (comfy / "models" / "checkpoints" / "sub").mkdir(parents=True)
    dst = comfy / "models" / "checkpoints" / "sub" / os.path.basename(ckpt)
    shutil.copyfile(ckpt, dst)
    return comfy, dst


def _check_tokenizer(out, te, pad_with_end):
    from transformers import CLIPTokenizer
    tdir = out / te["tokenizer"]
    tok = CLIPTokenizer.from_pretrained(str(tdir))
    assert (tok.bos_token_id, tok.eos_token_id) == (te["bos_token_id"], te["eos_token_id"])
    assert te["pad_token_id"] == tok.pad_token_id == (te["eos_token_id"] if pad_with_end else 0)
    assert te["pad_token"] == ("<|endoftext|>" if pad_with_end else "!")
    # the runner's own tokenizer reads the copied files and pads as ComfyUI does
    from ksampler_rt.workflow.tokenizer import ClipTokenizer
    rt = ClipTokenizer(tdir, pad_with_end=te["pad_token_id"] == te["eos_token_id"])
    assert rt.pad_token == te["pad_token_id"]


def test_single_file_export_roundtrip(ckpts, configs_only, tiny_sd15_dir, tmp_path, capsys, no_hf_cache):
    """Full single-file export through the CLI with --tokenizer (a folder holding only vocab.json + merges.txt)."""
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel
    from ksampler_rt.cli import main
    from ksampler_rt.export.manifest import read_manifest
    src, f = ckpts["sd15"]
    tok = tmp_path / "clip-tok"
    tok.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tiny_sd15_dir / "tokenizer" / name, tok / name)
    out = tmp_path / "out"
    assert main(["export", str(f), "--out", str(out), "--config", str(configs_only["sd15"]), "--tokenizer", str(tok)]) == 0
    printed = capsys.readouterr()
    assert f"--tokenizer {tok}" in printed.out and f"--tokenizer {tok}" in printed.err
    m = read_manifest(str(out))
    assert m["family"] == "sd15" and m["source_kind"] == "single_file" and m["source"] == os.path.abspath(f)
    assert m["weights_hash"] == hashlib.sha256(open(f, "rb").read()).hexdigest()
    assert sorted(m["models"]) == ["clip", "unet", "vae_decoder", "vae_encoder"]
    te = m["text_encoders"][0]
    assert te["tokenizer"] == "tokenizer" and te["tokenizer_source"] == f"--tokenizer {tok}"
    for name in ("vocab.json", "merges.txt"):
        assert (out / "tokenizer" / name).read_bytes() == (tok / name).read_bytes()
    _check_tokenizer(out, te, pad_with_end=True)
    # the converted UNet == the original folder's, at a shape the export did not validate
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
    g = torch.Generator().manual_seed(3)
    x, t, c = torch.randn(2, 4, 16, 8, generator=g), torch.tensor([3.0, 700.0]), torch.randn(2, 154, 32, generator=g)
    sess = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy()})[0]
    with torch.no_grad():
        ref = unet(x, t, c).sample.numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_tokenizer_from_config_folder(ckpts, tmp_path, no_hf_cache):
    from ksampler_rt.export.onnx_export import export_model
    src, f = ckpts["sd15"]
    m = export_model(f, str(tmp_path / "out"), config=str(src), models=["clip"])
    te = m["text_encoders"][0]
    assert te["tokenizer"] == "tokenizer" and te["tokenizer_source"] == f"--config {src}"
    assert (tmp_path / "out" / "tokenizer" / "tokenizer_config.json").read_bytes() == \
        (src / "tokenizer" / "tokenizer_config.json").read_bytes()  # copied as is


def test_tokenizer_from_comfyui_tree(ckpts, configs_only, tiny_sd15_dir, tmp_path, capsys, no_hf_cache):
    """SDXL checkpoint in <ComfyUI>/models/checkpoints/: comfy/sd1_tokenizer serves clip_l (pad <|endoftext|>)
    and clip_g (same BPE vocabulary, pad id 0)."""
    from ksampler_rt.export.onnx_export import export_model
    from ksampler_rt.export.clip_tokenizer import find_comfyui_tokenizer
    comfy, f = _comfyui_tree(tmp_path, ckpts["sdxl"][1], tiny_sd15_dir / "tokenizer")
    assert find_comfyui_tokenizer(str(f)) == str(comfy / "comfy" / "sd1_tokenizer")
    link = tmp_path / "elsewhere.safetensors"  # a symlink to a file inside the tree finds it too
    link.symlink_to(f)
    assert find_comfyui_tokenizer(str(link)) == str(comfy / "comfy" / "sd1_tokenizer")
    out = tmp_path / "out"
    m = export_model(str(f), str(out), config=str(configs_only["sdxl"]), models=["clip", "clip2"])
    assert "ComfyUI installation" in capsys.readouterr().err
    assert sorted(m["models"]) == ["clip", "clip2"]
    l, g = m["text_encoders"]
    assert (l["name"], l["tokenizer"], g["name"], g["tokenizer"]) == ("clip", "tokenizer", "clip2", "tokenizer_2")
    assert l["tokenizer_source"].startswith("ComfyUI installation") and str(comfy) in l["tokenizer_source"]
    _check_tokenizer(out, l, pad_with_end=True)
    _check_tokenizer(out, g, pad_with_end=False)
    assert (out / "tokenizer_2" / "vocab.json").read_bytes() == (tiny_sd15_dir / "tokenizer" / "vocab.json").read_bytes()


def _fake_hf_cache(hub, tok_src, repo="openai/clip-vit-large-patch14"):
    rdir = hub / ("models--" + repo.replace("/", "--"))
    snap = rdir / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    (rdir / "refs").mkdir()
    (rdir / "refs" / "main").write_text(snap.name)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_src / name, snap / name)
    return snap


def test_tokenizer_from_hf_cache(ckpts, configs_only, tiny_sd15_dir, tmp_path, monkeypatch):
    """SD2 checkpoint outside any ComfyUI tree: the tokenizer files already in the local HF cache (HF_HUB_CACHE)
    are used, clip_h padding with id 0."""
    from ksampler_rt.export.onnx_export import export_model
    from ksampler_rt.export.clip_tokenizer import find_clip_tokenizer
    snap = _fake_hf_cache(tmp_path / "hub", tiny_sd15_dir / "tokenizer")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, how = find_clip_tokenizer(ckpts["sd2-v"][1])
    assert folder == str(snap) and how == f"Hugging Face cache ({snap})"
    out = tmp_path / "out"
    m = export_model(ckpts["sd2-v"][1], str(out), config=str(configs_only["sd2-v"]), prediction="v", models=["clip"])
    te = m["text_encoders"][0]
    assert te["tokenizer_source"] == f"Hugging Face cache ({snap})"
    _check_tokenizer(out, te, pad_with_end=False)


def test_tokenizer_missing(ckpts, configs_only, tmp_path, capsys, no_hf_cache):
    from ksampler_rt.cli import main
    from ksampler_rt.export.onnx_export import export_model
    from ksampler_rt.export import source as source_mod
    f, cfg, out = ckpts["sdxl"][1], str(configs_only["sdxl"]), tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:  # fails before loading the checkpoint
        mp.setattr(source_mod, "load_source", lambda *a, **k: pytest.fail("loaded the checkpoint"))
        with pytest.raises(ExportError) as e:
            export_model(f, str(out), config=cfg)
    msg = str(e.value)
    for way in ("--tokenizer DIR", "ComfyUI", "comfy/sd1_tokenizer", "Hugging Face cache", "--no-tokenizer"):
        assert way in msg, way
    assert main(["export", f, "--out", str(out), "--config", cfg]) == 2
    assert "--no-tokenizer" in capsys.readouterr().err
    assert main(["export", f, "--out", str(out), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["export", f, "--out", str(out), "--tokenizer", cfg, "--no-tokenizer"]) == 2
    capsys.readouterr()
    assert not out.exists()
    # a tokenizer whose ids do not fit the text encoder's embedding is refused
    bad = tmp_path / "bigvocab"
    bad.mkdir()
    (bad / "vocab.json").write_text(json.dumps({"!": 0, "<|startoftext|>": 49406, "<|endoftext|>": 49407}))
    (bad / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ExportError, match="vocab_size 914: not this model's tokenizer"):
        export_model(f, str(out), config=cfg, tokenizer=str(bad), models=["clip"])
    # --no-tokenizer: exported, manifest says so
    m = export_model(f, str(out), config=cfg, no_tokenizer=True, models=["clip2"])
    assert [(te["name"], te["tokenizer"], te["pad_token_id"]) for te in m["text_encoders"]] == [("clip2", None, None)]
    assert "--no-tokenizer" in capsys.readouterr().err


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
