import json
import os
import time

import pytest

from ksampler_rt.engines import (BuildOptions, CacheCorruptError, EngineCache, EngineError, ForeignEngineError,
                                 build_engines, load_engines)
from ksampler_rt.engines.build import key_components
from ksampler_rt.engines.cache import compute_key, entry_name
from ksampler_rt.engines.envinfo import environment
from ksampler_rt.engines.manifest import load_manifest
from ksampler_rt.engines.profiles import ProfileRequest, compute_profiles

TRT_ENV = {"backend": "tensorrt", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "12.4",
           "nvidia_driver": "550.54", "cuda": "12.4", "tensorrt": "10.3.0"}


def test_cache_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KSAMPLER_RT_CACHE", str(tmp_path / "c"))
    assert EngineCache().engines_dir == tmp_path / "c" / "engines"
    monkeypatch.delenv("KSAMPLER_RT_CACHE")
    assert str(EngineCache().root).endswith(os.path.join(".cache", "ksampler-rt"))


def test_each_key_component_changes_the_key(tiny_export):
    m = load_manifest(tiny_export)
    entry = m.models["unet"]
    opts = BuildOptions(backend="tensorrt")
    profs = compute_profiles("unet", entry.inputs, ProfileRequest(sizes=((64, 64),)))
    base = key_components(m, entry, opts, "fp16", profs, TRT_ENV)
    k0 = compute_key(base)
    variants = [
        {**base, "weights_hash": "other"},
        {**base, "gpu": "NVIDIA A100-SXM4-80GB"},
        {**base, "compute_capability": "8.0"},
        {**base, "driver": "12.2"},
        {**base, "nvidia_driver": "535.1"},
        {**base, "cuda": "12.1"},
        {**base, "tensorrt": "10.4.0"},
        {**base, "precision": "bf16"},
        key_components(m, entry, opts, "fp16",
                       compute_profiles("unet", entry.inputs, ProfileRequest(sizes=((128, 128),))), TRT_ENV),
        key_components(m, entry, BuildOptions(backend="tensorrt", refit=True), "fp16", profs, TRT_ENV),
        key_components(m, m.models["vae_decoder"], opts, "fp16",
                       compute_profiles("vae_decoder", m.models["vae_decoder"].inputs,
                                        ProfileRequest(sizes=((64, 64),))), TRT_ENV),
        {**base, "backend": "onnxruntime-cuda"},
    ]
    keys = {compute_key(v) for v in variants}
    assert k0 not in keys and len(keys) == len(variants)
    cpu = environment("onnxruntime-cpu")
    kc = key_components(m, entry, BuildOptions(), "fp32", [], cpu)
    assert compute_key(kc) != compute_key({**kc, "onnxruntime": "1.0.0"})
    assert compute_key(kc) != compute_key({**kc, "isa": "avx2"})
    assert compute_key(kc) != compute_key({**kc, "cpu": "Other CPU"})


def _build_unet(export, root, **kw):
    return build_engines(export, BuildOptions(backend="onnxruntime-cpu", **kw), models=["unet"],
                         cache=EngineCache(root))["unet"]


def test_build_writes_sidecar_and_reuses(tiny_export, cache_root):
    e = _build_unet(tiny_export, cache_root)
    side = json.loads((e.path / "entry.json").read_text())
    assert side["key"] == compute_key(side["components"]) and e.path.name == entry_name(side["components"], side["key"])
    assert set(side["files"]) >= {"model.onnx"} and len(side["files"]["model.onnx"]["sha256"]) == 64
    assert side["components"]["weights_hash"] == load_manifest(tiny_export).weights_hash
    mtime = (e.path / "model.onnx").stat().st_mtime_ns
    again = _build_unet(tiny_export, cache_root)
    assert again.path == e.path and (e.path / "model.onnx").stat().st_mtime_ns == mtime
    forced = _build_unet(tiny_export, cache_root, force=True)
    assert forced.path == e.path
    assert not [p for p in (cache_root / "engines").iterdir() if p.name.startswith(".tmp-")]


def test_crash_mid_write_leaves_nothing_loadable(tiny_export, cache_root):
    cache = EngineCache(cache_root)
    m = load_manifest(tiny_export)
    comps = key_components(m, m.models["unet"], BuildOptions(), "fp32", [], environment("onnxruntime-cpu"))

    def crashing_build(tmp):
        (tmp / "model.onnx").write_bytes(b"half a model")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        cache.write(comps, crashing_build)
    assert cache.lookup(comps) is None
    assert cache.entries() == []

    # A hard kill (no cleanup at all) leaves a .tmp- directory: never looked up, pruned later.
    tmp = cache.engines_dir / f".tmp-{entry_name(comps, compute_key(comps))}-x"
    tmp.mkdir()
    (tmp / "model.onnx").write_bytes(b"partial")
    assert cache.lookup(comps) is None
    old = time.time() - 7200
    os.utime(tmp, (old, old))
    removed = cache.prune(env_for=environment)
    assert [p for p, _ in removed] == [tmp] and not tmp.exists()

    # A final directory without a sidecar (e.g. copied by hand, half-way) is refused.
    final = cache.path_for(comps)
    final.mkdir()
    (final / "model.onnx").write_bytes(b"partial")
    with pytest.raises(CacheCorruptError, match="no entry.json"):
        cache.lookup(comps)


def test_flipped_byte_fails_checksum_with_rebuild_command(tiny_export, cache_root):
    e = _build_unet(tiny_export, cache_root)
    f = e.path / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError) as ei:
        load_engines(tiny_export, backend="onnxruntime-cpu", models=["unet"])
    msg = str(ei.value)
    assert str(f) in msg and "checksum" in msg
    assert f"ksampler-rt build {tiny_export} --backend onnxruntime-cpu" in msg and "--force" in msg
    _build_unet(tiny_export, cache_root, force=True)  # the advertised fix works
    load_engines(tiny_export, backend="onnxruntime-cpu", models=["unet"])


def test_truncated_file_and_edited_sidecar(tiny_export, cache_root):
    e = _build_unet(tiny_export, cache_root)
    side = e.path / "entry.json"
    meta = json.loads(side.read_text())
    meta["components"]["precision"] = "fp16"  # tampered, key no longer matches
    side.write_text(json.dumps(meta))
    with pytest.raises(CacheCorruptError, match="key does not match"):
        EngineCache(cache_root).read_entry(e.path).verify()
    e = _build_unet(tiny_export, cache_root, force=True)
    with open(e.path / "model.onnx", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(CacheCorruptError, match="truncated"):
        EngineCache(cache_root).read_entry(e.path).verify()


def _forge_foreign(entry, cache, **env):
    """Rewrite an entry as if it had been built on another machine, with a consistent key and name."""
    meta = json.loads((entry.path / "entry.json").read_text())
    meta["components"].update(env)
    meta["key"] = compute_key(meta["components"])
    dest = cache.engines_dir / entry_name(meta["components"], meta["key"])
    entry.path.rename(dest)
    (dest / "entry.json").write_text(json.dumps(meta))
    return dest


def test_foreign_plan_is_never_loaded(tiny_export, cache_root):
    cache = EngineCache(cache_root)
    e = _build_unet(tiny_export, cache_root)
    dest = _forge_foreign(e, cache, cpu="Some Other CPU", isa="avx2", onnxruntime="1.20.0")
    # Loading by export: the foreign entry is a miss; with build_missing=False the error says why.
    with pytest.raises(EngineError) as ei:
        load_engines(tiny_export, backend="onnxruntime-cpu", models=["unet"], build_missing=False)
    msg = str(ei.value)
    assert "Some Other CPU" in msg and "onnxruntime '1.20.0'" in msg and "ksampler-rt build" in msg
    # Loading that entry explicitly is refused, naming what differs and how to rebuild.
    foreign = cache.read_entry(dest).verify()
    with pytest.raises(ForeignEngineError, match="built for .*Some Other CPU.*never loaded.*ksampler-rt build"):
        foreign.check_environment(environment("onnxruntime-cpu"))
    # A foreign entry planted under this machine's expected name is refused by its key.
    m = load_manifest(tiny_export)
    comps = key_components(m, m.models["unet"], BuildOptions(), "fp32", [], environment("onnxruntime-cpu"))
    dest.rename(cache.path_for(comps))
    with pytest.raises((ForeignEngineError, CacheCorruptError), match="key"):
        load_engines(tiny_export, backend="onnxruntime-cpu", models=["unet"])


def test_tensorrt_missing_plan_says_how_to_build(tiny_export, cache_root, monkeypatch):
    """Pure logic: the TensorRT miss message (no GPU involved, nothing is run)."""
    from ksampler_rt.engines.backends import get_backend

    trt = get_backend("tensorrt")  # as if on a GPU box with TensorRT: the backend object answers
    monkeypatch.setattr(trt, "unavailable_reason", lambda: None)
    monkeypatch.setattr(trt, "environment", lambda device_id=0: {k: v for k, v in TRT_ENV.items() if k != "backend"})
    monkeypatch.setattr("ksampler_rt.engines.cuda.DeviceScratch.__init__", lambda self, cuda=None: None)
    with pytest.raises(EngineError, match=r"no tensorrt engine for unet .*no engine has been built.*"
                                          r"ksampler-rt build .* --backend tensorrt --shapes 512x512 --batch 1-4"):
        load_engines(tiny_export, backend="tensorrt")


def test_prune_foreign_and_all(tiny_export, cache_root):
    cache = EngineCache(cache_root)
    e = _build_unet(tiny_export, cache_root)
    _forge_foreign(e, cache, cpu="Some Other CPU")
    _build_unet(tiny_export, cache_root)
    assert len(cache.entries()) == 2
    dry = cache.prune(env_for=environment, dry_run=True)
    assert len(dry) == 1 and len(cache.entries()) == 2
    removed = cache.prune(env_for=environment)
    assert len(removed) == 1 and "another machine" in removed[0][1]
    assert [x.components["cpu"] for x in cache.entries()] == [environment("onnxruntime-cpu")["cpu"]]
    assert len(cache.prune(everything=True)) == 1 and cache.entries() == []


def test_concurrent_identical_builds_keep_one(tiny_export, cache_root):
    cache = EngineCache(cache_root)
    m = load_manifest(tiny_export)
    comps = key_components(m, m.models["unet"], BuildOptions(), "fp32", [], environment("onnxruntime-cpu"))

    def build(tmp):
        (tmp / "model.onnx").write_bytes(b"x" * 10)
        if not cache.path_for(comps).exists():  # the "other process" finishes first
            cache.write(comps, lambda t: (t / "model.onnx").write_bytes(b"x" * 10))

    e = cache.write(comps, build)
    assert e.verify() and len(cache.all_dirs()) == 1
