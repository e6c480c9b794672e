"""``tensorrt``: native TensorRT 10.x / 11.x (``pip install ksampler-rt[tensorrt]``). The artefact is a
serialized plan with one optimisation profile per shape bucket, so it is shape-bound; a build takes minutes,
so ``load_engines`` does not build a missing plan unless asked (``ksampler-rt build`` once per machine).

Precision comes from the export: each model is built in the precision the export gave it (an fp16 export's
fp32 VAE stays fp32); TensorRT 11 builds strongly typed networks (its only mode), TensorRT 10 the flag
path with the export's fp32 layers pinned. fp8 / int8 build a quantized export's Q/DQ denoiser
(``ksampler-rt export SRC --out DIR --quantize fp8``; manifest ``"quantized"``) and its other models in fp32;
an export without Q/DQ nodes is refused. The cache key holds the precision actually built, whether the
network was strongly typed, the exporter revision (a new exporter can change the graph behind the same
weights) and no driver version (a plan depends on TensorRT, the GPU and CUDA, not on the driver)."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..envinfo import module_version
from ..spec import EngineError
from .base import Backend, BuildJob, LoadJob

INSTALL = "pip install ksampler-rt[tensorrt]"


class TensorRT(Backend):
    name = "tensorrt"
    device_type = "cuda"
    order = 10
    auto_priority = 10
    shape_bound = True
    builds_on_load = False
    supports_refit = True
    runtime = "TensorRT"

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return f"TensorRT is not installed ({INSTALL})"
        if importlib.util.find_spec("cuda") is None and importlib.util.find_spec("cupy") is None:
            return f"cuda-python is not installed ({INSTALL})"
        if self.gpu_facts(0)["gpu"] is None:
            return "no NVIDIA GPU found"
        return None

    def environment(self, device_id: int = 0) -> dict:
        facts = self.gpu_facts(device_id)
        for driver in ("driver", "nvidia_driver"):  # plans do not depend on the driver: no rebuild on update
            facts.pop(driver, None)
        return {**facts, "tensorrt": module_version("tensorrt")}

    @staticmethod
    def installed_major() -> int | None:
        v = module_version("tensorrt")
        try:
            return int(str(v).split(".")[0]) if v else None
        except ValueError:
            return None

    def resolve_precision(self, export_precision: str, requested: str | None) -> str:
        """The export's precision by default. TensorRT 10 can convert (``--precision fp16`` on an fp32 export,
        the builder flag path); TensorRT 11 builds strongly typed networks only, so it runs the export's own."""
        from ..trt_backend import QUANTIZED

        p = requested or export_precision
        major = self.installed_major()
        if p in QUANTIZED:
            return p  # the precision of the Q/DQ graph: gated per model, with the manifest (model_precision)
        if p != export_precision and major is not None and major >= 11:
            raise EngineError(f"precision: received {p!r}, expected the export's own precision "
                              f"{export_precision!r} (TensorRT {major} builds strongly typed networks, whose "
                              f"precision is the ONNX file's); re-export with `--precision {p}`")
        return p

    def model_precision(self, precision: str, entry, manifest) -> str:
        """What ``entry`` is built in: ``precision``, except a model the export kept in fp32 inside a half
        precision export (the SDXL VAE), which is built fp32 unless a conversion was asked for."""
        from ..precision import keeps_fp32
        from ..trt_backend import QUANTIZED

        if precision in QUANTIZED:
            return self._quantized_precision(precision, entry, manifest)
        if precision == "fp16" and keeps_fp32(entry.name, manifest.family):  # T5-XXL, FLUX.1's VAE
            return "fp32"
        if precision == manifest.precision and precision in ("fp16", "bf16"):
            floats = [s.dtype for s in entry.inputs if s.dtype.startswith("float")]
            if floats and all(d == "float32" for d in floats):
                return "fp32"
        return precision

    def _quantized_precision(self, precision: str, entry, manifest) -> str:
        """fp8 / int8: the quantized export's denoiser (its Q/DQ graph) in ``precision``, its other models
        (text encoders, VAE: no Q/DQ nodes) in fp32. An export without Q/DQ nodes: refused here when the
        build is strongly typed (TensorRT 11), else by ``precision_flags`` after the GPU check, as before."""
        from ..precision import quantized_model
        from ..trt_backend import qdq_refusal

        quantized = manifest.data.get("quantized")
        if not quantized:
            major = self.installed_major()
            if major is not None and major >= 11:
                raise EngineError(qdq_refusal(precision))
            return precision
        if quantized != precision:
            raise EngineError(f"precision: received {precision!r}, expected {quantized!r} (this export's Q/DQ "
                              f"nodes are {quantized}; re-quantize with `--quantize {precision}`)")
        return precision if quantized_model(manifest.data, entry.name) else "fp32"

    def key_options(self, options) -> dict:
        major = self.installed_major()
        return {"refit": options.refit, "weight_streaming": options.weight_streaming,
                "strongly_typed": bool(options.weight_streaming or (major is not None and major >= 11))}

    def export_key(self, manifest) -> dict:
        return {"exporter_revision": manifest.data.get("exporter_revision")}

    def builder(self, job: BuildJob) -> Callable[[Path], dict]:
        from ..precision import quantized_model
        from ..trt_backend import build_plan, import_tensorrt

        import_tensorrt()  # raises the install message before anything starts
        opts, env = job.options, job.env

        def build(tmp: Path) -> dict:
            plan = build_plan(job.entry.path, job.profiles, job.precision, env.get("compute_capability"),
                              refit=opts.refit, weight_streaming=opts.weight_streaming,
                              timing_cache=job.cache.timing_cache_path(env),
                              quantized_export=quantized_model(job.manifest.data, job.entry.name) is not None)
            (tmp / "engine.plan").write_bytes(plan)
            return {"artefact": "engine.plan"}

        return build

    def lookup_options(self, options, load) -> list:
        # refit=None: the plain plan first (TensorRT 11.3 lists a known issue where REFIT builds can drop a
        # GEMM bias, and refittable plans can be slower), a refittable one only when no plain plan is cached.
        # The first candidate is what is built on a miss: the plain plan.
        return [options, replace(options, refit=True)] if load.refit is None else [options]

    def open_set(self, load):
        from ..cuda import DeviceScratch

        return DeviceScratch()  # one activation buffer for every engine of the set

    def make_engine(self, job: LoadJob):
        from ..trt_backend import TensorRTEngine

        e = job.entry
        return TensorRTEngine(e.name, e.inputs, e.outputs, job.profiles, path=job.artefact, scratch=job.shared,
                              cuda_graph=job.options.cuda_graph, request=job.request, export_dir=job.export_dir)


BACKEND = TensorRT()
