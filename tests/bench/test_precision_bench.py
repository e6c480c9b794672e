"""``ksampler-rt bench --precision``: the quality columns against hand values, each precision's measured error on
the tiny SD1.5 (the real networks, the whole txt2img job) inside its documented bound, refusals as rows, and
diffusers' fp32 pipeline on the same weights as the independent check that the fp32 reference is right."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ksampler_rt.bench import precision as B
from ksampler_rt.engines import precision as P


def test_relative_l2_and_psnr_against_hand_values():
    ref = np.array([3.0, 4.0])  # norm 5
    assert B.relative_l2(ref, ref) == 0.0
    assert B.relative_l2(np.array([3.0, 5.0]), ref) == pytest.approx(1 / 5)
    img = np.full((2, 2), 0.5)
    assert B.psnr(img, img) == math.inf
    assert B.psnr(img + 0.1, img) == pytest.approx(20.0)  # mse 0.01 -> 10 log10(1 / 0.01)
    with pytest.raises(ValueError, match="psnr: received shapes"):
        B.psnr(img, np.zeros(3))


def test_split_precisions_keeps_per_network_specs_whole():
    assert B.split_precisions("fp32,bf16,auto") == ["fp32", "bf16", "auto"]
    assert B.split_precisions("fp32;unet=bf16,vae=fp32") == ["fp32", "unet=bf16,vae=fp32"]
    with pytest.raises(ValueError, match="--precision: received ''"):
        B.split_precisions("")


def test_cpu_flags_record_is_this_machines():
    rec = B.cpu_flags_record()
    flags = P.cpu_flags()
    assert rec["cpu_flags"] == [f for f in B.PRECISION_FLAGS if f in flags]
    assert rec["amx_or_avx512_bf16"] == bool({"amx_bf16", "avx512_bf16"} & flags)


@pytest.fixture(scope="module")
def tiny_result():
    pytest.importorskip("openvino")
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    precisions = ["fp32", "auto"]
    for p in ("bf16", "fp16", "int8"):  # what this machine runs; the refusals are tested below
        if P.cpu_precision_refusal("openvino-cpu", p) is None:
            precisions.append(p)
    if "bf16" in precisions:
        precisions.append("unet=bf16,vae=fp32")
    cfg = B.PrecisionBenchConfig(model="tiny", backends=("openvino-cpu",), precisions=tuple(precisions),
                                 width=64, height=64, steps=6, repeats=0, peers=("diffusers",))
    return B.run(cfg, log=lambda m: None)


def test_each_precision_stays_inside_its_documented_bound_on_the_tiny_model(tiny_result):
    assert not [r for r in tiny_result["rows"] if "refused" in r]  # only precisions this machine runs were asked
    rows = {r["precision"]: r for r in tiny_result["rows"]}
    assert rows["fp32"]["latent_rel_l2"] == 0.0  # the reference itself
    checked = 0
    for prec, row in rows.items():
        if prec == "fp32":
            continue
        # every network's own bound; the latent carries the UNet's (and the text encoder's) error, the image
        # the VAE's on top of it
        for model, built in row["resolved"].items():
            network = {"clip2": "clip", "vae_decoder": "vae", "vae_encoder": "vae"}.get(model, model)
            bound = P.QUALITY_BOUNDS.get((network, built))
            assert built == "fp32" or bound is not None, (prec, model, built)
        unet = P.QUALITY_BOUNDS.get(("unet", row["resolved"]["unet"]), {"rel_l2": 0.0})
        clip = P.QUALITY_BOUNDS.get(("clip", row["resolved"]["clip"]), {"rel_l2": 0.0})
        assert row["latent_rel_l2"] <= unet["rel_l2"] + clip["rel_l2"], row
        vae = P.QUALITY_BOUNDS.get(("vae", row["resolved"]["vae_decoder"]))
        if vae and row["resolved"]["unet"] == "fp32":
            assert row["image_psnr_db"] >= vae["psnr_db"], row
        assert row["image_psnr_db"] > 20.0, row  # still the same picture
        checked += 1
    assert checked == len(rows) - 1


def test_auto_picks_what_this_machine_runs_natively(tiny_result):
    row = next(r for r in tiny_result["rows"] if r["precision"] == "auto")
    want = {n: P.auto_precision("openvino-cpu", n) for n in P.NETWORKS}
    assert row["resolved"] == {"unet": want["unet"], "clip": want["clip"], "vae_decoder": want["vae"],
                               "vae_encoder": want["vae"]}
    if not tiny_result["environment"]["amx_or_avx512_bf16"]:
        assert set(row["resolved"].values()) == {"fp32"}


def test_fp32_reference_agrees_with_diffusers_on_the_same_weights(tiny_result):
    """The independent check: diffusers' own fp32 pipeline (same sigmas, seed, CFG) decodes to the product's
    fp32 image, so the quality columns compare against the right picture."""
    peer = next(p for p in tiny_result["peers"] if p["name"] == "diffusers torch eager")
    assert peer["image_psnr_db_vs_product_fp32"] > 40.0


def test_refused_precisions_are_rows_naming_the_missing_feature(monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx", "avx2"}))
    cfg = B.PrecisionBenchConfig(model="tiny", backends=("openvino-cpu",), precisions=("bf16",), width=64,
                                 height=64, steps=2, repeats=0, peers=())
    res = B.run(cfg, log=lambda m: None)
    refused = [r for r in res["rows"] if r["precision"] == "bf16"]
    assert refused and refused[0]["refused"] == "bf16 on openvino-cpu needs AVX-512-BF16 or AMX; this CPU has avx2, avx"
    assert "refused: bf16 on openvino-cpu needs AVX-512-BF16 or AMX" in B.format_report(res)


def test_bench_cli_precision_prints_the_rows_and_writes_json(tmp_path, capsys):
    pytest.importorskip("openvino")
    from ksampler_rt.cli import main

    rc = main(["bench", "--model", "tiny", "--backend", "openvino-cpu", "--precision", "fp32;unet=fp32,vae=fp32",
               "--size", "64x64", "--steps", "2", "--repeats", "1", "--peers", "none", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ksampler-rt openvino-cpu fp32" in out and "ksampler-rt openvino-cpu unet=fp32,vae=fp32" in out
    written = list(tmp_path.glob("precision-tiny-*.json"))
    assert len(written) == 1
    import json

    res = json.loads(written[0].read_text())
    assert res["environment"]["cpu_flags"] == B.cpu_flags_record()["cpu_flags"]
    same = next(r for r in res["rows"] if r["precision"] == "unet=fp32,vae=fp32")
    assert same["latent_rel_l2"] == pytest.approx(0.0, abs=1e-6)  # fp32 spelled per network is the same engines
