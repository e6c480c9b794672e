"""Engines: one model (UNet, CLIP, VAE encoder/decoder) on one backend, numpy in and numpy out.

    from ksampler_rt.engines import load_engines
    with load_engines("export/", backend="auto") as engines:
        unet = engines.unet_callable()          # unet(x, timestep, context, y=None) -> np.ndarray

Backends: ``tensorrt`` (native TensorRT >= 10), ``onnxruntime-cuda`` (IO binding + CUDA graphs),
``onnxruntime-trt`` (ONNX Runtime's TensorRT provider), ``onnxruntime-cpu``, ``openvino-cpu`` (OpenVINO's
CPU plugin, ``pip install 'ksampler-rt[openvino]'``). Built artefacts live in the
engine cache (``$KSAMPLER_RT_CACHE``/engines, ``ksampler-rt build`` / ``ksampler-rt engines``).
See docs/engines.md.
"""
from .base import Engine
from .build import BACKENDS, BuildOptions, build_engines
from .cache import CacheCorruptError, CacheError, EngineCache, ForeignEngineError
from .loader import EngineSet, available_backends, load_engines
from .profiles import ProfileRequest, compute_profiles
from .spec import EngineError, ShapeProfile, ShapeRange, SpecError, TensorSpec

__all__ = [
    "BACKENDS", "BuildOptions", "CacheCorruptError", "CacheError", "Engine", "EngineCache", "EngineError",
    "EngineSet", "ForeignEngineError", "ProfileRequest", "ShapeProfile", "ShapeRange", "SpecError", "TensorSpec",
    "available_backends", "build_engines", "compute_profiles", "load_engines",
]
