"""Backends as objects: every registered backend satisfies the interface, and a backend defined in this file
(one class, registered here as a new module of engines/backends/ would be) shows up everywhere: the backend
lists, ``available_backends``, ``pick_backend``, the cache key's environment, ``ksampler-rt build``, the
cache CLI, ``load_engines`` and the engine benchmark."""
import dataclasses
import importlib
import importlib.util
import json
import pkgutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import ksampler_rt.engines as engines_pkg
from ksampler_rt.engines import (Backend, BuildOptions, EngineCache, EngineError, ForeignEngineError, LoadOptions,
                                 available_backends, build_engines, load_engines, pick_backend)
from ksampler_rt.engines import backends as registry
from ksampler_rt.engines.base import Engine, UnknownTensorError
from ksampler_rt.engines.cache import KEY_FIELDS
from ksampler_rt.engines.envinfo import cpu_info, gpu_info

BUILTIN = {"tensorrt": "cuda", "onnxruntime-cuda": "cuda", "onnxruntime-trt": "cuda", "onnxruntime-cpu": "cpu",
           "openvino-cpu": "cpu"}


# --- a backend that is not part of the package: ONNX's reference evaluator ----------------------------------
class ReferenceEngine(Engine):
    backend = "onnx-reference"

    def __init__(self, model, inputs, outputs, profiles=None, *, path, **kw):
        super().__init__(model, inputs, outputs, profiles, source=str(path), **kw)
        self.path = Path(path)
        self.evaluator = None

    def _load(self):
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(str(self.path))

    def _release(self):
        self.evaluator = None

    def _run(self, feeds, profile_index):
        return dict(zip(self.output_names, self.evaluator.run(self.output_names, feeds)))


class ReferenceBackend(Backend):
    name = "onnx-reference"
    device_type = "cpu"
    order = 60
    auto_priority = 0  # ahead of every built-in backend, so "auto" picks it while it is usable
    runtime = "the ONNX reference evaluator"

    def __init__(self):
        self.reason = None  # what unavailable_reason() says
        self.version = "1"  # a machine fact no built-in backend has
        self.builds = []

    def unavailable_reason(self):
        return self.reason

    def environment(self, device_id=0):
        return {"cpu": cpu_info()["cpu"], "onnx_reference": self.version}

    def builder(self, job):
        import onnx

        def build(tmp):
            self.builds.append(job.entry.name)
            onnx.save(onnx.load(str(job.entry.path)), str(tmp / "model.onnx"))
            return {"artefact": "model.onnx"}

        return build

    def make_engine(self, job):
        e = job.entry
        return ReferenceEngine(e.name, e.inputs, e.outputs, job.profiles, path=job.artefact, request=job.request,
                               export_dir=job.export_dir)


@pytest.fixture
def fake():
    backend = registry.register(ReferenceBackend())
    try:
        yield backend
    finally:
        registry.unregister(backend.name)


# --- every registered backend ---------------------------------------------------------------------------------
def test_the_builtin_backends_are_discovered_one_module_each():
    here = Path(registry.__file__).parent
    modules = {m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_") and m.name != "base"}
    by_module = {type(b).__module__.rsplit(".", 1)[-1]: b.name for b in registry.registered()}
    assert set(by_module) == modules and len(modules) == len(BUILTIN)
    for m in modules:  # each file's BACKEND is the registered object
        assert registry.get_backend(by_module[m]) is importlib.import_module(f"{registry.__name__}.{m}").BACKEND
    assert {b.name: b.device_type for b in registry.registered()} == BUILTIN
    assert engines_pkg.BACKENDS == registry.backend_names() == (
        "tensorrt", "onnxruntime-cuda", "onnxruntime-trt", "onnxruntime-cpu", "openvino-cpu")
    from ksampler_rt.engines.loader import AUTO_ORDER

    assert AUTO_ORDER == registry.auto_order() == ("tensorrt", "onnxruntime-cuda", "openvino-cpu", "onnxruntime-cpu")
    assert list(available_backends()) == list(registry.backend_names())


@pytest.mark.parametrize("name", sorted(BUILTIN), ids=lambda n: f"backend={n}")  # not the gpu/tensorrt marks
def test_every_registered_backend_satisfies_the_interface(name):
    b = registry.get_backend(name)
    registry.check_backend(b)
    assert isinstance(b, Backend) and b.name == name and b.device_type == BUILTIN[name]
    why = b.unavailable_reason()
    assert why is None or (isinstance(why, str) and why)
    env = registry.environment(name)
    assert env["backend"] == name and not (set(env) - {"backend"}) & set(KEY_FIELDS)
    json.dumps(env)  # part of the sidecar
    opts = BuildOptions(backend=name)
    assert isinstance(b.key_options(opts), dict) and json.dumps(b.key_options(opts))
    assert isinstance(b.resolve_precision("fp32", None), str)
    candidates = b.lookup_options(opts, LoadOptions())
    assert candidates and all(isinstance(c, BuildOptions) and c.backend == name for c in candidates)
    fields = {f.name for f in dataclasses.fields(LoadOptions)}
    for label, kw in b.bench_variants(4):
        assert label and set(kw) <= fields
    assert registry.device_type(name) == BUILTIN[name]


def test_environments_are_the_machine_facts_of_earlier_versions():
    """The cache key's environment did not change with the move to backend objects: existing entries stay valid."""
    def version(mod):
        if importlib.util.find_spec(mod) is None:
            return None
        return getattr(importlib.import_module(mod), "__version__", None)

    gpu = gpu_info(0) or dict.fromkeys(("gpu", "compute_capability", "driver", "cuda", "nvidia_driver"))
    ov = None
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        ov = openvino.get_version()
    expected = {
        "onnxruntime-cpu": {**cpu_info(), "onnxruntime": ort.__version__},
        "openvino-cpu": {**cpu_info(), "openvino": ov},
        "onnxruntime-cuda": {**gpu, "onnxruntime": ort.__version__},
        "onnxruntime-trt": {**gpu, "onnxruntime": ort.__version__, "tensorrt": version("tensorrt")},
        # TensorRT plans do not depend on the driver (issue 23): no driver facts in its key
        "tensorrt": {**{k: v for k, v in gpu.items() if k not in ("driver", "nvidia_driver")},
                     "tensorrt": version("tensorrt")},
    }
    for name, facts in expected.items():
        assert registry.environment(name) == {"backend": name, **facts}


@pytest.mark.parametrize("name", sorted(BUILTIN), ids=lambda n: f"backend={n}")  # not the gpu/tensorrt marks
def test_every_available_backend_builds_and_loads_a_model_matching_the_reference(name, tiny_export, cache_root,
                                                                                   feeds_for):
    from onnx.reference import ReferenceEvaluator

    why = available_backends()[name]
    if why:
        pytest.skip(why)
    es = load_engines(tiny_export, name, LoadOptions(shapes="64x64", batch="1-2", build_missing=True),
                      models=["unet", "vae_decoder"])
    with es:
        assert es.backend == name and all(e.backend == name for e in es.engines().values())
        rng = np.random.default_rng(3)
        eng = es.vae_decoder
        feeds = feeds_for(eng, rng, b=1)
        ref = ReferenceEvaluator(str(tiny_export / "vae_decoder.onnx")).run(None, feeds)[0]
        tol = 1e-4 if registry.get_backend(name).device_type == "cpu" else 2e-2  # fp16 on a GPU
        np.testing.assert_allclose(eng(**feeds)["image"], ref, rtol=tol, atol=tol)


# --- a new backend, registered here, appears everywhere ----------------------------------------------------------
def test_a_new_backend_appears_in_the_lists_and_the_picks(fake):
    assert fake.name in engines_pkg.BACKENDS and fake.name in registry.backend_names()
    from ksampler_rt.engines import build as build_module
    from ksampler_rt.engines import loader

    assert build_module.BACKENDS[-1] == fake.name  # order 60: listed last
    assert loader.AUTO_ORDER[0] == fake.name
    assert available_backends()[fake.name] is None
    assert pick_backend(fake.name) == fake.name and pick_backend("auto") == fake.name
    assert registry.device_type(fake.name) == "cpu"

    fake.reason = "the reference evaluator is switched off"
    assert available_backends()[fake.name] == "the reference evaluator is switched off"
    assert pick_backend("auto") == next(b for b in registry.auto_order() if available_backends()[b] is None)
    with pytest.raises(EngineError, match="backend onnx-reference is not available: the reference evaluator is"):
        pick_backend(fake.name)


def test_a_new_backend_builds_and_loads(fake, tiny_export, cache_root, feeds_for):
    with pytest.raises(EngineError, match=r"no onnx-reference engine for unet .*no engine has been built.*"
                                          r"`ksampler-rt build .* --backend onnx-reference`"):
        load_engines(tiny_export, fake.name, build_missing=False)
    assert fake.builds == []

    built = build_engines(tiny_export, BuildOptions(backend=fake.name))
    assert sorted(fake.builds) == sorted(built) == ["clip", "unet", "vae_decoder", "vae_encoder"]
    for entry in built.values():
        assert entry.components["backend"] == fake.name and entry.meta["artefact"] == "model.onnx"
        assert entry.components["onnx_reference"] == "1" and entry.components["profiles"] == "any"

    rng = np.random.default_rng(5)
    with load_engines(tiny_export, "auto", build_missing=False) as es, \
            load_engines(tiny_export, "onnxruntime-cpu") as ref:
        assert es.backend == fake.name and fake.builds.count("unet") == 1  # loaded from the cache
        for name, eng in es.engines().items():
            assert isinstance(eng, ReferenceEngine) and Path(eng.source).parent == built[name].path
            feeds = feeds_for(eng, rng, b=1)
            want = getattr(ref, name)(**feeds)
            got = eng(**feeds)
            assert list(got) == list(want)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4)
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
        np.testing.assert_allclose(es.unet_callable()(x, 10.0, ctx), ref.unet_callable()(x, 10.0, ctx),
                                   rtol=1e-4, atol=1e-4)


def test_a_new_backends_environment_is_part_of_the_key(fake, tiny_export, cache_root):
    env = registry.environment(fake.name)
    assert env == {"backend": fake.name, "cpu": cpu_info()["cpu"], "onnx_reference": "1"}
    old = build_engines(tiny_export, BuildOptions(backend=fake.name), models=["unet"])["unet"]

    fake.version = "2"  # another version of the library: the old entry is foreign here
    with pytest.raises(ForeignEngineError, match=r"built for CPU '.*', onnx_reference 1; this machine has "
                                                 r"CPU '.*', onnx_reference 2 \(onnx_reference '1' != '2' here\)"):
        old.check_environment(registry.environment(fake.name))
    with pytest.raises(EngineError, match=r"built for .*onnx_reference 1 \(onnx_reference '1' != '2' here\)"):
        load_engines(tiny_export, fake.name, build_missing=False)
    new = build_engines(tiny_export, BuildOptions(backend=fake.name), models=["unet"])["unet"]
    assert new.path != old.path and fake.builds == ["unet", "unet"]

    from ksampler_rt.cli import main

    rows = json.loads(_out(main, ["engines", "list", "--json"]))["entries"]
    assert sorted(r["status"] for r in rows) == ["foreign", "ok"]
    assert main(["engines", "prune"]) == 0
    assert [e.path for e in EngineCache().entries()] == [new.path]


def _out(main, argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def test_a_new_backend_is_a_cli_choice(fake, tiny_export, cache_root, capsys):
    from ksampler_rt.cli import main

    assert main(["build", str(tiny_export), "--backend", fake.name, "--models", "unet"]) == 0
    assert f"1 engine(s) ready for {fake.name}" in capsys.readouterr().out
    assert main(["engines", "inspect", f"unet-{fake.name}"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"


def test_an_unregistered_backends_entries_are_kept_and_reported(fake, tiny_export, cache_root, capsys):
    from ksampler_rt.cli import main

    build_engines(tiny_export, BuildOptions(backend=fake.name), models=["unet"])
    registry.unregister(fake.name)
    try:
        assert fake.name not in engines_pkg.BACKENDS and fake.name not in available_backends()
        with pytest.raises(EngineError, match=r"backend: received 'onnx-reference', expected auto or one of "
                                              r"tensorrt, onnxruntime-cuda"):
            load_engines(tiny_export, fake.name)
        assert main(["engines", "list", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["entries"]
        assert [r["status"] for r in rows] == ["unknown backend"]
        assert main(["engines", "inspect", f"unet-{fake.name}"]) == 1
        assert "backend: received 'onnx-reference'" in json.loads(capsys.readouterr().out)["problems"][0]
        assert main(["engines", "prune"]) == 0 and len(EngineCache().entries()) == 1  # not judged: kept
    finally:
        registry.register(fake)


def test_a_new_backend_is_benchmarked(fake, tiny_export, cache_root):
    from ksampler_rt.bench.engines import run

    rows = run(tiny_export, [fake.name], [(64, 64)], 1, repeat=1, models=["unet"], log=lambda *_: None)
    assert {r["backend"] for r in rows} == {fake.name}
    assert [r["variant"] for r in rows] == [label for label, _ in fake.bench_variants(_cores())]
    assert rows[0]["copy"]["kind"] == "host memcpy" and rows[0]["median_ms"] > 0


def _cores():
    from ksampler_rt.bench.engines import _cores

    return _cores()


# --- registering -------------------------------------------------------------------------------------------------
def test_register_refuses_an_incomplete_or_clashing_backend():
    class NoEngine(ReferenceBackend):
        name = "half-done"
        make_engine = Backend.make_engine

    with pytest.raises(EngineError, match=r"half-done: received a backend without make_engine\(\)"):
        registry.register(NoEngine())
    with pytest.raises(EngineError, match="register: received a second backend named 'onnxruntime-cpu'"):
        registry.register(type("Clash", (ReferenceBackend,), {"name": "onnxruntime-cpu"})())
    with pytest.raises(EngineError, match=r"backend.name: received 'auto'"):
        registry.register(type("Auto", (ReferenceBackend,), {"name": "auto"})())
    with pytest.raises(EngineError, match=r"gpu-ish.device_type: received 'gpu', expected one of cpu, cuda"):
        registry.register(type("Gpu", (ReferenceBackend,), {"name": "gpu-ish", "device_type": "gpu"})())
    with pytest.raises(TypeError, match="backend: received str, expected a Backend instance"):
        registry.register("onnxruntime-cpu")
    with pytest.raises(EngineError, match=r"unregister: received 'nope', expected one of"):
        registry.unregister("nope")
    assert registry.backend_names() == tuple(sorted(BUILTIN, key=lambda n: registry.get_backend(n).order))


def test_device_type_of_auto_and_unknown_names_is_cpu():
    assert registry.device_type("auto") == registry.device_type("no-such-backend") == "cpu"


# --- load options -------------------------------------------------------------------------------------------------
def test_load_options_and_keywords_are_the_same_request(tiny_export, cache_root):
    a = load_engines(tiny_export, "onnxruntime-cpu", LoadOptions(shapes="64x64", batch="1-2", threads=1),
                     models=["unet"])
    b = load_engines(tiny_export, "onnxruntime-cpu", shapes="64x64", batch="1-2", threads=1, models=["unet"])
    c = load_engines(tiny_export, "onnxruntime-cpu", LoadOptions(shapes="128x128", threads=1), batch="1-2",
                     shapes="64x64", models=["unet"])  # keywords override the options' fields
    for es in (a, b, c):
        assert [p.label for p in es.unet.profiles] == ["64x64 static"] and es.unet.threads == 1
        assert es.unet.profiles[0]["sample"].max == (2, 4, 8, 8)
    with pytest.raises(TypeError, match=r"load_engines: received unexpected keyword argument\(s\) \['thread'\], "
                                        r"expected .*LoadOptions field: shapes, batch"):
        load_engines(tiny_export, "onnxruntime-cpu", thread=2)
    with pytest.raises(TypeError, match="load_engines options: received str, expected LoadOptions"):
        load_engines(tiny_export, "onnxruntime-cpu", "64x64")
    with pytest.raises(EngineError, match=r"models: received \['clip', 'transformer'\], expected a non-empty "
                                          r"selection of unet, clip"):
        load_engines(tiny_export, "onnxruntime-cpu", models=["clip", "transformer"])
    clip_only = load_engines(tiny_export, "onnxruntime-cpu", models=["clip"])  # a text-encoder component
    assert set(clip_only.engines()) == {"clip"} and clip_only.denoiser is None
    with pytest.raises(EngineError, match="received an export without a UNet or transformer"):
        clip_only.unet_callable()


def test_unknown_tensor_name_is_a_clear_error(tiny_export, cache_root):
    es = load_engines(tiny_export, "onnxruntime-cpu", models=["unet"])
    assert es.unet.spec("out").name == "out"
    with pytest.raises(UnknownTensorError, match=r"unet tensor: received 'latent', expected one of sample, "
                                                 r"timestep, encoder_hidden_states, out") as ei:
        es.unet.spec("latent")
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, EngineError)
