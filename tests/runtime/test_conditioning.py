"""SDXL ADM vector vs ComfyUI 0.3.64 model_base.SDXL / SDXLRefiner.encode_adm."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ksampler_rt.runtime.conditioning import (SDXL_ADM_DIM, SDXL_REFINER_ADM_DIM, sdxl_adm, sdxl_refiner_adm,
                                              timestep_embedding)


@pytest.fixture(scope="module")
def pooled():
    return np.random.default_rng(0).standard_normal((2, 1280)).astype(np.float32)


def _torch_embedding(values, dim=256):
    """Independent oracle: diffusers-style get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0, max_period=10000), which is ComfyUI's timestep_embedding."""
    torch = pytest.importorskip("torch")
    t = torch.tensor(values, dtype=torch.float32)
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32)
    exponent = exponent / (half - 0)  # downscale_freq_shift = 0
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)  # flip_sin_to_cos
    return emb.numpy()


def test_embedding_hand_math():
    e = timestep_embedding([0.0, 1024.0])
    assert e.shape == (2, 256) and e.dtype == np.float32
    assert np.array_equal(e[0], np.concatenate([np.ones(128), np.zeros(128)]).astype(np.float32))
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    np.testing.assert_allclose(e[1, :128], np.cos(1024 * freqs), atol=2e-4)  # cos first
    np.testing.assert_allclose(e[1, 128:], np.sin(1024 * freqs), atol=2e-4)
    assert e[1, 0] == pytest.approx(math.cos(1024), abs=1e-6)
    assert e[1, 128] == pytest.approx(math.sin(1024), abs=1e-6)
    assert timestep_embedding([3.0], dim=7).shape == (1, 7)


def test_embedding_vs_torch():
    values = [0.0, 1.0, 6.0, 2.5, 512.0, 768.0, 1024.0, 1536.0, 4096.0, 123.0]
    ref = _torch_embedding(values)
    ours = timestep_embedding(values)
    # float32 args up to 4096 rad: the sin/cos of the same float32 argument agree to ~1 ulp
    np.testing.assert_allclose(ours, ref, rtol=0, atol=3e-7)


def test_frequencies_match_torch_exactly():
    """ComfyUI's freqs come from torch's float32 exp (MKL's on x86-64); ours must be bit-identical with the
    torch installed here (t * freq reaches ~4000 rad, so one ulp of a frequency would show as ~1e-4 in
    the embedding). tests/runtime/test_cpu_capability.py covers MKL's other code paths in subprocesses."""
    torch = pytest.importorskip("torch")
    ref = torch.exp(-math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128).numpy()
    from ksampler_rt.runtime import conditioning as C

    assert np.array_equal(C.frequencies(128), ref)
    if C.mkl_vml_path() is not None:  # the table is not a no-op: the correctly rounded values differ
        assert not np.array_equal(C.frequencies(128, mkl_path=None), ref)


def test_frequencies_other_tables_within_one_ulp():
    """Tables without a measured delta (other dims) are correctly rounded: within 1 ulp of torch's."""
    torch = pytest.importorskip("torch")
    from ksampler_rt.runtime import conditioning as C

    for half, period in ((160, 10000.0), (64, 10000.0), (640, 10000.0), (128, 1000.0)):
        ref = torch.exp(-math.log(period) * torch.arange(0, half, dtype=torch.float32) / half).numpy()
        ours = C.frequencies(half, period)
        ulps = np.abs(ours.view(np.int32).astype(np.int64) - ref.view(np.int32))
        assert ulps.max() <= 1, (half, period)


def test_frequencies_bad_path():
    from ksampler_rt.runtime import conditioning as C

    with pytest.raises(ValueError, match=r"mkl_path: received 'avx9', expected"):
        C.frequencies(128, mkl_path="avx9")


def test_sdxl_adm_layout(pooled):
    y = sdxl_adm(pooled, width=1024, height=768, crop_w=16, crop_h=32, target_width=2048, target_height=1536)
    assert y.shape == (2, SDXL_ADM_DIM) == (2, 2816) and y.dtype == np.float32
    assert np.array_equal(y[:, :1280], pooled)
    # order: height, width, crop_h, crop_w, target_height, target_width
    expected = timestep_embedding([768, 1024, 32, 16, 1536, 2048]).reshape(-1)
    assert np.array_equal(y[0, 1280:], expected) and np.array_equal(y[1, 1280:], expected)
    np.testing.assert_allclose(y[0, 1280:], _torch_embedding([768, 1024, 32, 16, 1536, 2048]).reshape(-1), atol=3e-7)


def test_sdxl_adm_target_defaults(pooled):
    a = sdxl_adm(pooled[:1], 832, 1216)
    b = sdxl_adm(pooled[:1], 832, 1216, 0, 0, 832, 1216)
    assert np.array_equal(a, b)
    # crop 0 embeds as [1]*128 + [0]*128
    assert np.array_equal(a[0, 1280 + 512:1280 + 640], np.ones(128, np.float32))


def test_sdxl_adm_vs_torch_encode_adm(pooled):
    """The whole vector as ComfyUI's encode_adm assembles it, in torch."""
    torch = pytest.importorskip("torch")
    parts = [torch.from_numpy(_torch_embedding([v])) for v in (1024, 1024, 0, 0, 1024, 1024)]
    flat = torch.flatten(torch.cat(parts)).unsqueeze(0).repeat(2, 1)
    ref = torch.cat((torch.from_numpy(pooled), flat), dim=1).numpy()
    np.testing.assert_allclose(sdxl_adm(pooled, 1024, 1024), ref, atol=3e-7, rtol=0)


def test_refiner(pooled):
    y = sdxl_refiner_adm(pooled, 1024, 1024)
    assert y.shape == (2, SDXL_REFINER_ADM_DIM) == (2, 2560)
    assert np.array_equal(y[0, 1280:], timestep_embedding([1024, 1024, 0, 0, 6.0]).reshape(-1))
    neg = sdxl_refiner_adm(pooled, 1024, 1024, negative=True)
    assert np.array_equal(neg[0, -256:], timestep_embedding([2.5])[0])
    custom = sdxl_refiner_adm(pooled, 1024, 1024, aesthetic_score=7.5, negative=True)
    assert np.array_equal(custom[0, -256:], timestep_embedding([7.5])[0])
    np.testing.assert_allclose(y[0, 1280:], _torch_embedding([1024, 1024, 0, 0, 6.0]).reshape(-1), atol=3e-7)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(pooled=np.zeros(1280, np.float32)), r"pooled: .*\(1280,\)"),
    (dict(pooled=np.zeros((0, 1280), np.float32)), r"pooled"),
    (dict(pooled=np.full((1, 1280), np.nan, np.float32)), r"pooled: contains NaN"),
    (dict(width=-8), r"width: received -8.0, expected a finite number >= 0"),
    (dict(height=float("nan")), r"height: received nan"),
    (dict(crop_w="0"), r"crop_w: received '0'"),
    (dict(target_height=float("inf")), r"target_height: received inf"),
    (dict(crop_h=True), r"crop_h: received True"),
])
def test_validation(kwargs, pattern):
    args = dict(pooled=np.zeros((1, 1280), np.float32), width=1024, height=1024)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        sdxl_adm(**args)


def test_refiner_validation():
    with pytest.raises(ValueError, match="aesthetic_score: received -1.0"):
        sdxl_refiner_adm(np.zeros((1, 1280), np.float32), 1024, 1024, aesthetic_score=-1)
