"""``onnxruntime-trt``: ONNX Runtime's TensorRT execution provider (with the CUDA provider behind it);
never picked by ``auto`` (the native ``tensorrt`` backend is).

ORT refuses to save an optimized model once the TensorRT EP compiled nodes ("Unable to serialize model as
it contains compiled nodes"), so the artefact is the EP's own engine cache instead: the build creates a
session over the export's ONNX with ``trt_engine_cache_enable`` / ``trt_engine_cache_path`` pointing into
the cache entry (and the shape profiles), runs it once per profile so that TensorRT builds its engines, and
the engine loads the export's ONNX with the same cache path (the EP finds its engines by the model's path
and graph, hence the export's own file rather than a copy)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..envinfo import module_version
from ..spec import EngineError
from .base import BuildJob, LoadJob
from .onnxruntime_cuda import OnnxRuntimeCuda

ARTEFACT = "ort-trt.json"


def _feeds_at(profile, attr: str, inputs) -> dict:
    out = {}
    for s in inputs:
        shape = tuple(getattr(profile[s.name], attr)) if s.name in profile.ranges else tuple(
            d if isinstance(d, int) else 1 for d in s.shape)
        out[s.name] = np.zeros(shape, dtype=np.dtype(s.dtype))
    return out


class OnnxRuntimeTrt(OnnxRuntimeCuda):
    name = "onnxruntime-trt"
    order = 30
    auto_priority = None
    execution_providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    tensorrt_ep = True
    shape_bound = True  # the EP's engines are built for the profiles: part of the key, as for tensorrt
    fusions = False  # TensorRT does its own fusions; contrib ops would fall back to the CUDA EP

    def environment(self, device_id: int = 0) -> dict:
        return {**super().environment(device_id), "tensorrt": module_version("tensorrt")}

    def builder(self, job: BuildJob) -> Callable[[Path], dict]:
        entry, opts = job.entry, job.options

        def build(tmp: Path) -> dict:
            import json

            import onnxruntime as ort

            from ..ort import TRT_EP, check_providers
            from ..ort_cuda import preload_cuda_libraries, trt_profile_options

            preload_cuda_libraries(ort)
            cache_dir = tmp  # top level: the engine cache checksums the files of an entry's directory
            trt_opts = {"device_id": str(opts.device_id), "trt_engine_cache_enable": "1",
                        "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": "1",
                        "trt_timing_cache_path": str(cache_dir),
                        # precision from the export's types; the same options as OrtCudaEngine at load, so
                        # that the EP finds these engines again
                        "trt_fp16_enable": "0"}
            if job.profiles:
                trt_opts.update(trt_profile_options(job.profiles))
            provs = [(TRT_EP, trt_opts), ("CUDAExecutionProvider", {"device_id": str(opts.device_id)})]
            so = ort.SessionOptions()  # no optimized_model_filepath: ORT cannot save compiled nodes
            so.log_severity_level = 3
            session = ort.InferenceSession(str(entry.path), sess_options=so, providers=provs)
            check_providers(session, [TRT_EP], entry.name)
            # The EP builds an engine on the first run of a shape it has none for: once per profile (opt).
            for profile in job.profiles:
                session.run(None, _feeds_at(profile, "opt", entry.inputs))
            del session
            built = sorted(p.name for p in cache_dir.iterdir() if p.is_file())
            if not built:
                raise EngineError(f"{entry.name}: the TensorRT EP wrote no engine into {cache_dir}")
            (tmp / ARTEFACT).write_text(json.dumps({"onnx": str(entry.path), "files": built}, indent=1))
            return {"artefact": ARTEFACT, "onnx": str(entry.path)}

        return build

    def make_engine(self, job: LoadJob):
        from ..ort_cuda import OrtCudaEngine

        e, o = job.entry, job.options
        return OrtCudaEngine(e.name, e.inputs, e.outputs, job.profiles, path=e.path, device_id=o.device_id,
                             cuda_graph=o.cuda_graph, tensorrt_ep=True, trt_cache_dir=str(Path(job.artefact).parent),
                             request=job.request, export_dir=job.export_dir)


BACKEND = OnnxRuntimeTrt()
