"""``tensorrt``: native TensorRT >= 10 (``pip install ksampler-rt[tensorrt]``). The artefact is a serialized
plan with one optimisation profile per shape bucket, so it is shape-bound; a build takes minutes, so
``load_engines`` does not build a missing plan unless asked (``ksampler-rt build`` once per machine)."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..envinfo import module_version
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
        return {**self.gpu_facts(device_id), "tensorrt": module_version("tensorrt")}

    def resolve_precision(self, export_precision: str, requested: str | None) -> str:
        return requested or "fp16"  # TensorRT converts; fp16 is the fast default on every GPU it supports

    def key_options(self, options) -> dict:
        return {"refit": options.refit, "weight_streaming": options.weight_streaming}

    def builder(self, job: BuildJob) -> Callable[[Path], dict]:
        from ..trt_backend import build_plan, import_tensorrt

        import_tensorrt()  # raises the install message before anything starts
        opts, env = job.options, job.env

        def build(tmp: Path) -> dict:
            plan = build_plan(job.entry.path, job.profiles, job.precision, env.get("compute_capability"),
                              refit=opts.refit, weight_streaming=opts.weight_streaming,
                              timing_cache=job.cache.timing_cache_path(env))
            (tmp / "engine.plan").write_bytes(plan)
            return {"artefact": "engine.plan"}

        return build

    def lookup_options(self, options, load) -> list:
        # refit=None: a refittable plan (LoRA without a rebuild) when one is cached, else the plain one
        return [replace(options, refit=True), options] if load.refit is None else [options]

    def open_set(self, load):
        from ..cuda import DeviceScratch

        return DeviceScratch()  # one activation buffer for every engine of the set

    def make_engine(self, job: LoadJob):
        from ..trt_backend import TensorRTEngine

        e = job.entry
        return TensorRTEngine(e.name, e.inputs, e.outputs, job.profiles, path=job.artefact, scratch=job.shared,
                              cuda_graph=job.options.cuda_graph, request=job.request, export_dir=job.export_dir)


BACKEND = TensorRT()
