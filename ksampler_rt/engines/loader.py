"""``load_engines(export_dir, backend=...) -> EngineSet``: what the pipeline uses.

The sampler only sees ``EngineSet.unet_callable()`` (and the other engines' ``__call__``); it never
knows the backend.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .base import Engine
from .build import (BACKENDS, BuildOptions, build_model, key_components, model_profiles, profile_request,
                    rebuild_command, resolve_precision)
from .cache import EngineCache
from .envinfo import environment, gpu_info
from .manifest import ExportManifest, load_manifest
from .spec import EngineError

# openvino-cpu before onnxruntime-cpu: same fp32 numerics, measured faster on CPUs (docs/engines.md).
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "openvino-cpu", "onnxruntime-cpu")


def available_backends() -> dict[str, str | None]:
    """{backend: None if usable here, else the reason it is not}."""
    out: dict[str, str | None] = {}
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    gpu = None
    if "CUDAExecutionProvider" in providers or importlib.util.find_spec("tensorrt") is not None:
        gpu = gpu_info(0)
    if importlib.util.find_spec("tensorrt") is None:
        out["tensorrt"] = "TensorRT is not installed (pip install ksampler-rt[tensorrt])"
    elif importlib.util.find_spec("cuda") is None and importlib.util.find_spec("cupy") is None:
        out["tensorrt"] = "cuda-python is not installed (pip install ksampler-rt[tensorrt])"
    elif gpu is None:
        out["tensorrt"] = "no NVIDIA GPU found"
    else:
        out["tensorrt"] = None
    swap = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1"
    for name, ep in (("onnxruntime-cuda", "CUDAExecutionProvider"), ("onnxruntime-trt", "TensorrtExecutionProvider")):
        if ep not in providers:
            out[name] = f"this onnxruntime has no {ep} ({swap})"
        elif gpu is None:
            out[name] = "no NVIDIA GPU found"
        else:
            out[name] = None
    out["onnxruntime-cpu"] = None if "CPUExecutionProvider" in providers else "onnxruntime is not installed"
    from .openvino_backend import openvino_unavailable_reason

    out["openvino-cpu"] = openvino_unavailable_reason()
    return out


def pick_backend(backend: str) -> str:
    avail = available_backends()
    if backend == "auto":
        for b in AUTO_ORDER:
            if avail.get(b) is None:
                return b
        raise EngineError("no backend is available: " + "; ".join(f"{k}: {v}" for k, v in avail.items()))
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}: choose auto or one of {', '.join(BACKENDS)}")
    if avail.get(backend):
        raise EngineError(f"backend {backend} is not available: {avail[backend]}")
    return backend


@dataclass
class EngineSet:
    manifest: ExportManifest
    backend: str
    unet: Engine
    clip: Engine | None = None
    clip2: Engine | None = None
    vae_decoder: Engine | None = None
    vae_encoder: Engine | None = None
    scratch: object = field(default=None, repr=False)

    def engines(self) -> dict[str, Engine]:
        return {n: e for n in ("unet", "clip", "clip2", "vae_decoder", "vae_encoder")
                if (e := getattr(self, n)) is not None}

    def load(self) -> "EngineSet":
        for e in self.engines().values():
            e.load()
        return self

    def release(self) -> None:
        for e in self.engines().values():
            e.release()

    def __enter__(self) -> "EngineSet":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.release()

    def unet_callable(self, engine: Engine | None = None) -> Callable[..., np.ndarray]:
        """``unet(x, timestep, context, y=None) -> array`` with x's dtype, mapped to the ONNX inputs
        ``sample``, ``timestep``, ``encoder_hidden_states``, ``y`` and the first output. Casts to the
        engine's input dtypes and broadcasts a scalar timestep over the batch. ``engine``: another engine of
        the same UNet (e.g. ``unet.with_weights(...)`` for a LoRA); default ``self.unet``."""
        eng = self.unet if engine is None else engine
        specs = {s.name: s for s in eng.inputs}
        for need in ("sample", "timestep", "encoder_hidden_states"):
            if need not in specs:
                raise EngineError(f"the exported UNet has no input {need!r} (inputs: {', '.join(specs)})")

        def unet(x, timestep, context, **kwargs) -> np.ndarray:
            y = kwargs.pop("y", None)
            extra = sorted(k for k, v in kwargs.items() if v is not None)
            if extra:
                raise TypeError(f"unet(): unsupported keyword argument(s) {extra}; the exported UNet takes "
                                f"x, timestep, context and y")
            x = np.asarray(x)
            batch = x.shape[0]
            ts = specs["timestep"]
            t = np.asarray(timestep, dtype=ts.dtype)
            if ts.rank == 0:
                if t.size != 1:
                    raise EngineError(f"this UNet takes one scalar timestep, received shape {t.shape}")
                t = t.reshape(())
            elif t.size == 1 and batch != 1:
                t = np.full((batch,), t.reshape(-1)[0], dtype=ts.dtype)
            else:
                t = t.reshape(-1) if ts.rank == 1 else t
            feeds = {"sample": np.ascontiguousarray(x, dtype=specs["sample"].dtype), "timestep": t,
                     "encoder_hidden_states": np.ascontiguousarray(context, dtype=specs["encoder_hidden_states"].dtype)}
            if "y" in specs:
                if y is None:
                    raise TypeError("unet(): this UNet (SDXL-style) needs y (the pooled/ADM vector)")
                feeds["y"] = np.ascontiguousarray(y, dtype=specs["y"].dtype)
            elif y is not None:
                raise TypeError("unet(): this UNet takes no y")
            out = eng(**feeds)[eng.output_names[0]]
            return out if out.dtype == x.dtype else out.astype(x.dtype)

        unet.engine = eng
        return unet


def load_engines(export_dir, backend: str = "auto", shapes=None, *, batch=None, tokens=None, dynamic=False,
                 precision: str | None = None, cache: EngineCache | str | None = None,
                 build_missing: bool | None = None, models=None, threads: int | None = None,
                 cuda_graph: bool = True, device_id: int = 0, verify: bool = True, refit: bool | None = None,
                 log=None) -> EngineSet:
    """Engines for every model of the export, from the engine cache.

    ``shapes`` ('512x512,768x768' or [(w, h)]), ``batch`` ('1-4'), ``tokens``, ``dynamic``: the shape
    profiles, as for ``ksampler-rt build``. For ONNX Runtime they only restrict what the engines accept
    (and pick CUDA-graph buckets), as for OpenVINO (which compiles per input shape on first use); for
    TensorRT they select the plan. ``build_missing``: build an engine
    that is not cached yet; by default yes for ONNX Runtime (seconds), no for TensorRT (minutes: run
    ``ksampler-rt build`` once), which raises an error saying why nothing usable is cached. ``refit``
    (TensorRT): use the plan built with ``--refit`` (LoRA weights swapped without a rebuild); None = that plan
    when it is cached, else the plain one.
    """
    backend = pick_backend(backend)
    cache = cache if isinstance(cache, EngineCache) else EngineCache(cache)
    manifest = load_manifest(export_dir)
    opts = BuildOptions.from_cli(backend, shapes, batch, tokens, dynamic, precision, device_id=device_id,
                                 refit=bool(refit))
    if build_missing is None:
        build_missing = backend != "tensorrt"
    env = environment(backend, device_id)
    req = profile_request(manifest, opts, required=backend == "tensorrt")
    scratch = None
    if backend == "tensorrt":
        from .cuda import DeviceScratch

        scratch = DeviceScratch()
    engines: dict[str, Engine] = {}
    for name, entry in manifest.models.items():
        if models is not None and name not in models:
            continue
        profiles = model_profiles(entry, req)
        comps = key_components(manifest, entry, opts, resolve_precision(manifest, opts), profiles, env)
        found = None
        if backend == "tensorrt" and refit is None:  # prefer a refittable plan when one is cached
            from dataclasses import replace

            found = cache.lookup(key_components(manifest, entry, replace(opts, refit=True),
                                                resolve_precision(manifest, opts), profiles, env), checksums=verify)
        if found is None:
            found = cache.lookup(comps, checksums=verify)
        if found is None:
            if not build_missing:
                raise EngineError(
                    f"no {backend} engine for {name} of {manifest.export_dir} on this machine: "
                    f"{cache.explain_miss(comps)}. Build it once with `{rebuild_command(manifest, opts, req, False)}`")
            found = build_model(manifest, name, opts, cache, env, log)
        found.check_environment(env)
        common = dict(request=req, export_dir=str(manifest.export_dir))
        artefact = found.file(found.meta.get("artefact", "model.onnx"))
        if backend == "onnxruntime-cpu":
            from .ort import OrtCpuEngine

            eng = OrtCpuEngine(name, entry.inputs, entry.outputs, profiles, path=artefact, threads=threads, **common)
        elif backend == "openvino-cpu":
            from .openvino_backend import OpenVinoCpuEngine, model_cache_dir

            eng = OpenVinoCpuEngine(name, entry.inputs, entry.outputs, profiles, path=artefact, threads=threads,
                                    model_cache=model_cache_dir(cache.root), **common)
        elif backend in ("onnxruntime-cuda", "onnxruntime-trt"):
            from .ort import OrtCudaEngine

            eng = OrtCudaEngine(name, entry.inputs, entry.outputs, profiles, path=artefact, device_id=device_id,
                                cuda_graph=cuda_graph and (not profiles or all(p.is_static for p in profiles)),
                                tensorrt_ep=backend == "onnxruntime-trt",
                                trt_cache_dir=str(cache.root / "ort-trt"), **common)
        else:
            from .trt_backend import TensorRTEngine

            eng = TensorRTEngine(name, entry.inputs, entry.outputs, profiles, path=artefact, scratch=scratch,
                                 cuda_graph=cuda_graph, **common)
        engines[name] = eng
    if "unet" not in engines:
        raise EngineError("load_engines: the UNet was not selected (models=...)")
    return EngineSet(manifest, backend, scratch=scratch, **engines)
