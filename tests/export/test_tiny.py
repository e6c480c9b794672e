"""Tiny random-weight SD fixtures: determinism, offline loading, shapes, tokenizer, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ksampler_rt.cli import main  # noqa: E402
from ksampler_rt.export import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def fixture_dirs(tiny_sd15_dir, tiny_sd2v_dir, tiny_sdxl_dir):
    return {"sd15": tiny_sd15_dir, "sd2-v": tiny_sd2v_dir, "sdxl": tiny_sdxl_dir}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path, family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(path, local_files_only=True)


def test_layout(fixture_dirs):
    for family, root in fixture_dirs.items():
        names = {"model_index.json", "unet", "text_encoder", "tokenizer", "vae", "scheduler"}
        if family == "sdxl":
            names |= {"text_encoder_2", "tokenizer_2"}
        assert names <= {p.name for p in root.iterdir()}
        for tok in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
            assert sorted(p.name for p in (root / tok).iterdir()) == [
                "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
        assert (root / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (root / "text_encoder" / "model.safetensors").is_file()
        assert not list(root.parent.glob(".*tmp-*"))  # temp build dir was renamed away


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_rebuild_is_byte_identical(family, fixture_dirs, tmp_path):
    again = tiny.make_tiny_model(tmp_path / "again", family, seed=0)
    assert _hashes(again) == _hashes(fixture_dirs[family])


@pytest.mark.parametrize("family", tiny.TINY_FAMILIES)
def test_offline_load_and_forward(family, fixture_dirs):
    root = fixture_dirs[family]
    dims = json.loads((root / "tiny_fixture.json").read_text())
    assert dims == {**dims, **tiny.TINY_DIMS[family]}
    pipe = _load(root, family)
    assert pipe.unet.config.cross_attention_dim == dims["context_dim"]
    assert pipe.vae.config.scaling_factor == dims["scaling_factor"]
    assert pipe.scheduler.config.prediction_type == dims["prediction_type"]
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == dims["vocab_size"]

    ids = pipe.tokenizer("a red apple", padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        ctx = out.hidden_states[-1 if family == "sd15" else -2]
        kwargs = {}
        if family == "sdxl":
            ids2 = pipe.tokenizer_2("a red apple", padding="max_length", max_length=77,
                                    return_tensors="pt").input_ids
            out2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
            assert out2.text_embeds.shape == (1, dims["pooled_dim"])
            ctx = torch.cat([ctx, out2.hidden_states[-2]], dim=-1)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            kwargs["added_cond_kwargs"] = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
            assert (pipe.unet.add_embedding.linear_1.in_features == dims["adm_in_channels"]
                    == dims["pooled_dim"] + 6 * dims["addition_time_embed_dim"])
        assert ctx.shape == (1, 77, dims["context_dim"])

        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = pipe.unet(x, torch.tensor([500]), ctx, **kwargs).sample
        assert eps.shape == x.shape
        assert torch.isfinite(eps).all() and 0.3 < eps.std().item() < 3.0

        img = pipe.vae.decode(x / dims["scaling_factor"]).sample
        assert img.shape == (1, 3, 64, 64)
        lat = pipe.vae.encode(img).latent_dist.mean
        assert lat.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("family,sub,pad_with_end", [
    ("sd15", "tokenizer", True), ("sd2-v", "tokenizer", False),
    ("sdxl", "tokenizer", True), ("sdxl", "tokenizer_2", False)])
def test_tokenizer_round_trip(family, sub, pad_with_end, fixture_dirs):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    path = fixture_dirs[family] / sub
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (bos, eos) == (len(vocab) - 2, len(vocab) - 1) and vocab["!"] == 0
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(path)
        ids = tok("a red apple", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and ids[0] == bos
        n = ids.index(eos)
        assert n >= 4 and all(i not in (bos, eos) for i in ids[1:n])
        assert ids[n + 1:] == [eos if pad_with_end else 0] * (76 - n)
        assert tok.decode(ids[:n + 1], skip_special_tokens=True) == "a red apple"
        # Any text tokenizes (complete byte alphabet), lowercased like CLIP.
        odd = tok("Ünïcode ☃ RED").input_ids
        assert odd[0] == bos and odd[-1] == eos and eos not in odd[1:-1]
        assert tok("RED").input_ids == tok("red").input_ids

    # The runtime reads the same files with `tokenizers` alone.
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    raw = Tokenizer(BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"),
                                  end_of_word_suffix="</w>"))
    assert raw.get_vocab_size() == len(vocab)


def test_refuses_non_empty_dir_and_force(tmp_path, tiny_sd15_dir):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty.*force"):
        tiny.make_tiny_model(out, "sd15")
    assert (out / "keep.txt").exists()
    tiny.make_tiny_model(out, "sd15", force=True)
    assert not (out / "keep.txt").exists()
    assert _hashes(out) == _hashes(tiny_sd15_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp leftovers


def test_unknown_family(tmp_path):
    msg = "family: received 'x', expected one of ('sd15', 'sd2-v', 'sdxl', 'sd3', 'flux', 'flux-schnell')"
    with pytest.raises(ValueError) as exc:
        tiny.make_tiny_model(tmp_path / "m", "x")
    assert str(exc.value) == msg
    with pytest.raises(ValueError):
        tiny.default_tiny_model_dir("x")
    assert not (tmp_path / "m").exists()


def test_cli(tmp_path, capsys, tiny_sd15_dir):
    out = tmp_path / "cli"
    assert main(["make-tiny-model", str(out), "--family", "sd15", "--seed", "1"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "model_index.json") in printed
    assert str(out / "unet" / "diffusion_pytorch_model.safetensors") in printed
    h1, h0 = _hashes(out), _hashes(tiny_sd15_dir)
    assert h1["unet/diffusion_pytorch_model.safetensors"] != h0["unet/diffusion_pytorch_model.safetensors"]
    assert h1["unet/config.json"] == h0["unet/config.json"]

    assert main(["make-tiny-model", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["make-tiny-model", str(out), "--force"]) == 0
    assert _hashes(out) == h0
    with pytest.raises(SystemExit):
        main(["make-tiny-model", str(out), "--family", "sd4"])
    flow = tmp_path / "cli-flux"
    assert main(["make-tiny-model", str(flow), "--family", "flux-schnell"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(flow / "transformer" / "diffusion_pytorch_model.safetensors") in printed
    assert str(flow / "tokenizer_2" / "tokenizer.json") in printed


def test_ensure_tiny_model_caches(tmp_path, monkeypatch, tiny_sd2v_dir):
    monkeypatch.setenv("KSAMPLER_RT_CACHE", str(tmp_path / "cache"))
    expected = tiny.default_tiny_model_dir("sd2-v")
    assert expected.parent.parent == tmp_path / "cache"
    path = tiny.ensure_tiny_model("sd2-v")
    assert path == expected
    assert _hashes(path) == _hashes(tiny_sd2v_dir)
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert tiny.ensure_tiny_model("sd2-v") == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    monkeypatch.delenv("KSAMPLER_RT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert str(tiny.default_tiny_model_dir("sdxl")).startswith(
        str(tmp_path / "home" / ".cache" / "ksampler-rt"))


def test_light_imports():
    code = ("import sys, ksampler_rt.export.tiny_cli, ksampler_rt.export.tiny as t; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules; "
            "assert t.TINY_FAMILIES == ksampler_rt.export.tiny_cli._FAMILIES; "
            "assert t.TINY_FLOW_FAMILIES == ksampler_rt.export.tiny_cli._FLOW_FAMILIES")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
