"""Engines: one model (UNet, CLIP, VAE encoder/decoder) on one backend, numpy in and numpy out.

    from ksampler_rt.engines import load_engines
    with load_engines("export/", backend="auto") as engines:
        unet = engines.unet_callable()          # unet(x, timestep, context, y=None) -> np.ndarray

Backends: ``tensorrt`` (native TensorRT >= 10), ``onnxruntime-cuda`` (IO binding + CUDA graphs),
``onnxruntime-trt`` (ONNX Runtime's TensorRT provider), ``onnxruntime-cpu``, ``openvino-cpu`` (OpenVINO's
CPU plugin, ``pip install 'ksampler-rt[openvino]'``), one module each in ``ksampler_rt.engines.backends``
(``get_backend(name)``, ``register(backend)``). Built artefacts live in the
engine cache (``$KSAMPLER_RT_CACHE``/engines, ``ksampler-rt build`` / ``ksampler-rt engines``).
See docs/engines.md.
"""
from .backends import Backend, backend_names, get_backend, register
from .base import Engine
from .build import BuildOptions, build_engines
from .cache import CacheCorruptError, CacheError, EngineCache, ForeignEngineError
from .loader import EngineSet, LoadOptions, available_backends, load_engines, pick_backend
from .profiles import ProfileRequest, compute_profiles
from .spec import EngineError, ShapeProfile, ShapeRange, SpecError, TensorSpec

__all__ = [
    "BACKENDS", "Backend", "BuildOptions", "CacheCorruptError", "CacheError", "Engine", "EngineCache", "EngineError",
    "EngineSet", "ForeignEngineError", "LoadOptions", "ProfileRequest", "ShapeProfile", "ShapeRange", "SpecError",
    "TensorSpec", "available_backends", "backend_names", "build_engines", "compute_profiles", "get_backend", "load_engines",
    "pick_backend", "register",
]


def __getattr__(name: str):
    if name == "BACKENDS":  # every registered backend's name, in listing order (registering one adds it)
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
