"""ControlNet residuals stay on the device between the ControlNet and UNet engine calls (issue #21).

ONNX Runtime CUDA engines over the fakes of fake_gpu.py ("device" memory is host memory at real addresses,
copies are real memmoves, a replayed graph reads its captured buffers): a ControlNet engine and a UNet engine
taking its residuals, driven by the real runtime (``ksampler``, ``ControlNet``) through ``controlnet_callable``
and ``EngineSet.unet_callable``. Each copy is logged with its source and destination buffer, so the test
can tell a residual's D2D copy from any H2D / D2H of it. The latents are compared with the same sampling run
on the host path (no cuda-python: numpy outputs, ORT's own copies) and on plain numpy callables (no engine).
"""
from __future__ import annotations

import gc
import sys
import threading
import types

import numpy as np
import pytest

from ksampler_rt.engines import ort_cuda
from ksampler_rt.engines.device import DeviceTensor
from ksampler_rt.engines.loader import EngineSet, _control_feeds, controlnet_callable
from ksampler_rt.engines.spec import TensorSpec
from ksampler_rt.runtime import Model, ksampler
from ksampler_rt.runtime.control import ControlNet, ControlOutputError, PreparedControl

from fake_gpu import FakeCuda, fake_onnxruntime, reference

B, H, W, T = "batch", "h", "w", "tokens"
CTX = TensorSpec("encoder_hidden_states", "float32", (B, T, 8))
BASE = [TensorSpec("sample", "float32", (B, 4, H, W)), TensorSpec("timestep", "float32", (B,)), CTX]
RESIDUALS = [TensorSpec("down_0", "float32", (B, 4, H, W)), TensorSpec("down_1", "float32", (B, 4, "h_2", "w_2")),
             TensorSpec("mid", "float32", (B, 8, "h_2", "w_2"))]
CN_INPUTS = BASE + [TensorSpec("controlnet_cond", "float32", (B, 3, "H", "W"))]
UNET_INPUTS = BASE + RESIDUALS
UNET_OUTPUTS = [TensorSpec("out", "float32", (B, 4, H, W))]
STEPS = 3


def controlnet_math(sample, timestep, encoder_hidden_states, controlnet_cond):
    """The fake ControlNet: residuals that depend on every input."""
    ctx = encoder_hidden_states.mean(axis=(1, 2), dtype=np.float32)[:, None, None, None]
    hint = controlnet_cond.mean(axis=1, keepdims=True, dtype=np.float32)[:, :, ::8, ::8]
    down_0 = (np.float32(0.5) * sample + hint + np.float32(1e-3) * timestep[:, None, None, None]).astype(np.float32)
    down_1 = np.float32(0.25) * down_0[:, :, ::2, ::2]
    mid = np.concatenate([down_1, -down_1], axis=1) + ctx
    return {"down_0": down_0, "down_1": down_1, "mid": mid.astype(np.float32)}


def unet_math(sample, timestep, encoder_hidden_states, down_0, down_1, mid):
    """The fake residual-taking UNet: fake_gpu's reference plus every residual."""
    low = down_1 + mid.mean(axis=1, keepdims=True, dtype=np.float32)
    extra = down_0 + np.repeat(np.repeat(low, 2, axis=2), 2, axis=3)
    return {"out": (reference(sample, timestep, encoder_hidden_states) + np.float32(0.01) * extra).astype(np.float32)}


def compute(source, feeds):
    return controlnet_math(**feeds) if str(source).endswith("controlnet.onnx") else unet_math(**feeds)


def io(source):
    cn = str(source).endswith("controlnet.onnx")
    return (CN_INPUTS, RESIDUALS) if cn else (UNET_INPUTS, UNET_OUTPUTS)


@pytest.fixture
def fake_ort(monkeypatch):
    ort = fake_onnxruntime(compute=compute, io=io)
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setattr(ort_cuda, "_PRELOADED", [])
    return ort


def make_engines(tmp_path, monkeypatch, cuda):
    """(ControlNet engine, UNet engine) on the fake CUDA EP; ``cuda`` None: no cuda-python (host path)."""
    monkeypatch.setattr(ort_cuda, "_cuda_runtime", lambda: cuda)
    engines = []
    for name, ins, outs in (("controlnet", CN_INPUTS, RESIDUALS), ("unet_control", UNET_INPUTS, UNET_OUTPUTS)):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(b"onnx")
        engines.append(ort_cuda.OrtCudaEngine(name, ins, outs, path=path, cuda_graph=True))
    return engines


def sample(network, unet, strength=1.0, seed=3):
    """Euler, CFG over one batched cond+uncond call per step (one ControlNet on both, as ControlNetApplyAdvanced)."""
    rng = np.random.default_rng(seed)
    hint = rng.uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    control = ControlNet(network, hint, strength=strength)
    positive = [[rng.standard_normal((1, 7, 8)).astype(np.float32), {"control": control}]]
    negative = [[rng.standard_normal((1, 7, 8)).astype(np.float32), {"control": control}]]
    latent = {"samples": np.zeros((1, 4, 8, 8), np.float32)}
    return ksampler(Model(unet, "sd15"), seed, STEPS, 5.0, "euler", "normal", positive, negative, latent)["samples"]


def numpy_network(x, timestep, context, hint, y=None):
    """The same ControlNet without any engine (the runtime's plain-callable contract)."""
    hint = np.broadcast_to(hint, (x.shape[0],) + hint.shape[1:])
    t = np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (x.shape[0],))
    out = controlnet_math(x, t, context, hint)
    return {"down": [out["down_0"], out["down_1"]], "mid": out["mid"]}


def numpy_unet(x, timestep, context, control):
    t = np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (x.shape[0],))
    down_0, down_1 = control["down"]
    return unet_math(x, t, context, down_0, down_1, control["mid"])["out"]


def run_on_engines(tmp_path, monkeypatch, cuda, strength):
    cn, unet = make_engines(tmp_path, monkeypatch, cuda)
    with cn, unet:
        samples = sample(controlnet_callable(cn), EngineSet(None, "onnxruntime-cuda").unet_callable(unet), strength)
        ptrs = {"cn_out": {v.data_ptr() for b in cn._buckets.values() for v in b.outputs.values()},
                "unet_res": {b.inputs[s.name].data_ptr() for b in unet._buckets.values() for s in RESIDUALS}}
    return samples, cn, unet, ptrs


def copies(cuda, kind, *, src=(), dst=()):
    return [c for c in cuda.copies if c[0] == kind and (not src or c[2] in src) and (not dst or c[1] in dst)]


# --- the common case: residuals go device to device --------------------------------------------------------

def test_residuals_go_device_to_device_and_results_equal_the_host_path(tmp_path, monkeypatch, fake_ort):
    cuda = FakeCuda()
    got, cn, unet, ptrs = run_on_engines(tmp_path, monkeypatch, cuda, 1.0)
    n = STEPS * len(RESIDUALS)
    assert copies(cuda, "dtoh", src=ptrs["cn_out"]) == []           # no residual came to the host
    assert copies(cuda, "htod", dst=ptrs["unet_res"]) == []         # none was uploaded
    dtod = copies(cuda, "dtod")
    assert len(dtod) == n and all(c[2] in ptrs["cn_out"] and c[1] in ptrs["unet_res"] for c in dtod)
    assert cn.stats["device_outputs"] == n and cn.stats["d2h_fallbacks"] == 0
    assert unet.stats["dtod"] == n and unet.stats["device_feeds_via_host"] == 0
    assert unet.stats["graph_runs"] == STEPS and cn.stats["graph_runs"] == STEPS  # CUDA graphs replayed the buckets
    # ORT's own uploads happen only when a bucket is made: the 4 ControlNet inputs and the UNet's 3 host inputs
    assert len(fake_ort.update_inplace_calls) == len(CN_INPUTS) + len(BASE)

    host, hcn, hunet, _ = run_on_engines(tmp_path, monkeypatch, None, 1.0)  # no cuda-python: numpy all the way
    assert hcn.stats["device_outputs"] == 0 and hunet.stats["dtod"] == 0
    np.testing.assert_array_equal(got, host)
    np.testing.assert_allclose(got, sample(numpy_network, numpy_unet, 1.0), rtol=1e-6, atol=1e-6)


def test_strength_below_one_falls_back_to_the_host_and_is_counted(tmp_path, monkeypatch, fake_ort):
    cuda = FakeCuda()
    got, cn, unet, ptrs = run_on_engines(tmp_path, monkeypatch, cuda, 0.5)
    n = STEPS * len(RESIDUALS)
    assert cn.stats["device_outputs"] == n
    assert cn.stats["d2h_fallbacks"] == n and len(copies(cuda, "dtoh", src=ptrs["cn_out"])) == n
    assert unet.stats["dtod"] == 0 and copies(cuda, "dtod") == []
    assert len(copies(cuda, "htod", dst=ptrs["unet_res"])) == n   # the scaled residuals are uploaded
    host = run_on_engines(tmp_path, monkeypatch, None, 0.5)[0]
    np.testing.assert_array_equal(got, host)
    np.testing.assert_allclose(got, sample(numpy_network, numpy_unet, 0.5), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, sample(numpy_network, numpy_unet, 1.0), rtol=1e-4)  # strength did something


# --- lifetime: a DeviceTensor never shows values of a later run ---------------------------------------------

def cn_feeds(seed):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
            "timestep": np.full((2,), 10.0 * seed, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 7, 8)).astype(np.float32),
            "controlnet_cond": rng.uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)}


def test_a_kept_device_tensor_is_copied_to_the_host_before_its_buffer_is_reused(tmp_path, monkeypatch, fake_ort):
    cn, _ = make_engines(tmp_path, monkeypatch, FakeCuda())
    with cn:
        first = cn(**cn_feeds(1), keep_on_device=True)
        assert isinstance(first["mid"], DeviceTensor) and first["mid"].data_ptr() is not None
        assert cn.stats["d2h_fallbacks"] == 0
        cn(**cn_feeds(2), keep_on_device=True)  # same bucket: overwrites the buffers `first` pointed at
        assert cn.stats["d2h_fallbacks"] == len(RESIDUALS) and first["mid"].data_ptr() is None
        for name, want in controlnet_math(**cn_feeds(1)).items():
            np.testing.assert_array_equal(np.asarray(first[name]), want)
        second = cn(**cn_feeds(3), keep_on_device=True)
        gc.collect()
        del second
        cn(**cn_feeds(4), keep_on_device=True)  # nothing alive from the last run: no copy
        assert cn.stats["d2h_fallbacks"] == len(RESIDUALS)
        kept = cn(**cn_feeds(5), keep_on_device=True)
    # released: the tensor still reads its own values (copied out before the buffers were freed)
    np.testing.assert_array_equal(np.asarray(kept["down_1"]), controlnet_math(**cn_feeds(5))["down_1"])
    host = cn(**cn_feeds(6))  # the default call returns numpy, as before
    assert all(type(v) is np.ndarray for v in host.values())


def test_device_tensors_are_validated_by_their_metadata(tmp_path, monkeypatch, fake_ort):
    cn, unet = make_engines(tmp_path, monkeypatch, FakeCuda())
    with cn, unet:
        res = cn(**cn_feeds(1), keep_on_device=True)
        f = cn_feeds(1)
        feeds = {"sample": f["sample"], "timestep": f["timestep"], "encoder_hidden_states": f["encoder_hidden_states"],
                 "down_0": res["down_1"], "down_1": res["down_1"], "mid": res["mid"]}  # down_0 has the wrong shape
        with pytest.raises(ValueError, match="down_0"):
            unet(**feeds)
        feeds["down_0"] = res["down_0"]
        want = unet_math(**{k: np.asarray(v) for k, v in feeds.items()})["out"]
        np.testing.assert_array_equal(unet(**feeds)["out"], want)
        assert unet.stats["dtod"] == len(RESIDUALS) and unet.stats["device_feeds_via_host"] == 0
        cn(**cn_feeds(2), keep_on_device=True)  # another call before the UNet: `res` moves to the host
        np.testing.assert_array_equal(unet(**feeds)["out"], want)
        assert unet.stats["dtod"] == len(RESIDUALS) and unet.stats["device_feeds_via_host"] == len(RESIDUALS)


def test_concurrent_callers_sharing_the_engines_get_their_own_residuals(tmp_path, monkeypatch, fake_ort):
    cn, unet = make_engines(tmp_path, monkeypatch, FakeCuda())
    errors = []

    def run(seed):
        try:
            for k in range(6):
                f = cn_feeds(10 * seed + k)
                res = cn(**f, keep_on_device=True)
                base = {n: f[n] for n in ("sample", "timestep", "encoder_hidden_states")}
                got = unet(**base, **res)["out"]
                want = unet_math(**base, **controlnet_math(**f))["out"]
                if not np.array_equal(got, want):
                    errors.append((seed, k))
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    with cn, unet:
        threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert unet.stats["dtod"] + unet.stats["device_feeds_via_host"] == 18 * len(RESIDUALS)


def test_a_consumer_without_device_inputs_gets_host_arrays(tmp_path, monkeypatch, fake_ort):
    cn, _ = make_engines(tmp_path, monkeypatch, FakeCuda())
    with cn:
        out = controlnet_callable(cn)(**{"x": cn_feeds(1)["sample"], "timestep": 10.0,
                                         "context": cn_feeds(1)["encoder_hidden_states"],
                                         "hint": cn_feeds(1)["controlnet_cond"]})
        specs = {s.name: s for s in UNET_INPUTS}
        x = cn_feeds(1)["sample"]
        host = _control_feeds(specs, {}, ["down_0", "down_1"], out, x, device=False)
        device = _control_feeds(specs, {}, ["down_0", "down_1"], out, x, device=True)
        assert all(type(v) is np.ndarray for v in host.values())
        assert all(isinstance(v, DeviceTensor) for v in device.values())
        assert cn.stats["d2h_fallbacks"] == len(RESIDUALS)
        for name, want in controlnet_math(**cn_feeds(1)).items():
            np.testing.assert_array_equal(host[name], want)


# --- the runtime treats device-resident residuals as opaque -----------------------------------------------

class Opaque:
    """A device-resident residual the runtime may not read (``__array__`` fails)."""

    device_resident = True

    def __init__(self, shape):
        self.shape, self.dtype = shape, np.dtype(np.float32)

    def __array__(self, *a, **k):
        raise AssertionError("the runtime copied a device-resident residual to the host")


class Sampling:
    def percent_to_sigma(self, p):
        return 1e9 if p <= 0 else 0.0


def test_the_runtime_passes_device_residuals_through_untouched():
    down, mid = [Opaque((2, 4, 8, 8))], Opaque((2, 8, 4, 4))
    net = lambda x, t, c, hint, y=None: {"down": down, "mid": mid}  # noqa: E731
    prepared = PreparedControl(ControlNet(net, np.zeros((1, 3, 64, 64), np.float32)), Sampling(), (8, 8), None)
    x = np.zeros((2, 4, 8, 8), np.float32)
    out = prepared.residuals(x, np.zeros(2, np.float32), np.float32(1.0), None, None, 1, last=True)
    assert out["down"][0] is down[0] and out["mid"] is mid
    bad = lambda x, t, c, hint, y=None: {"down": down, "mid": Opaque((3, 8, 4, 4))}  # noqa: E731
    prepared = PreparedControl(ControlNet(bad, np.zeros((1, 3, 64, 64), np.float32)), Sampling(), (8, 8), None)
    with pytest.raises(ControlOutputError, match=r"mid of shape \(3, 8, 4, 4\)"):
        prepared.residuals(x, np.zeros(2, np.float32), np.float32(1.0), None, None, 1, last=True)


# --- the CUDA facade's device-to-device copy -----------------------------------------------------------------

def test_cuda_runtime_dtod_is_a_device_to_device_memcpy_async(monkeypatch):
    from ksampler_rt.engines.cuda import CudaRuntime

    calls = []
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                              cudaMemcpyDeviceToDevice=3)
    rt.cudaMemcpyAsync = lambda *a: (calls.append(a), (0,))[1]
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = rt
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    CudaRuntime().dtod(0x2000, 0x1000, 64, 7)
    assert calls == [(0x2000, 0x1000, 64, 3, 7)]
