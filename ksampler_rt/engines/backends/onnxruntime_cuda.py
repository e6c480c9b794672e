"""``onnxruntime-cuda``: ONNX Runtime's CUDA execution provider, IO binding and CUDA graphs (needs the
``onnxruntime-gpu`` wheel instead of ``onnxruntime``).

The build applies ONNX Runtime's transformer optimizer fusions for diffusion models (``unet`` / ``vae`` /
``clip``: fused attention, NHWC GroupNorm...; ``ksampler_rt.engines.ort_fusion``) and then the session's
own passes with the CUDA EP; the LoRA path applies its weights to the export's graph and fuses after."""
from __future__ import annotations

import warnings
from pathlib import Path

from ._onnxruntime import OnnxRuntimeBackend, providers
from .base import BuildJob, LoadJob

GPU_SWAP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1"


class OnnxRuntimeCuda(OnnxRuntimeBackend):
    name = "onnxruntime-cuda"
    device_type = "cuda"
    order = 20
    auto_priority = 20
    level = "extended"  # the layout passes of "all" are CPU-only and EP-specific
    execution_providers = ("CUDAExecutionProvider",)  # all must be in this onnxruntime
    tensorrt_ep = False
    fusions = True  # the transformer optimizer's diffusion fusions before the CUDA EP

    def unavailable_reason(self) -> str | None:
        have = providers()
        for ep in self.execution_providers:
            if ep not in have:
                return f"this onnxruntime has no {ep} ({GPU_SWAP})"
        if self.gpu_facts(0)["gpu"] is None:
            return "no NVIDIA GPU found"
        return None

    def build_providers(self, device_id: int) -> list:
        return [(ep, {"device_id": str(device_id)}) for ep in self.execution_providers]

    def key_options(self, options) -> dict:
        return {"fusions": "transformers-optimizer"} if self.fusions else {}

    def before_session(self, ort) -> None:
        from ..ort_cuda import preload_cuda_libraries

        preload_cuda_libraries(ort)

    def build_source(self, job: BuildJob, tmp: Path) -> Path:
        from ..ort_fusion import fuse, model_type, save_model

        if not self.fusions or model_type(job.entry.name) is None:
            return job.entry.path
        try:
            fused = fuse(str(job.entry.path), job.entry.name, use_gpu=True,
                         half=job.manifest.precision in ("fp16", "bf16"))
        except Exception as exc:  # a graph the optimizer cannot handle still runs, unfused
            warnings.warn(f"{job.entry.name}: ONNX Runtime's transformer optimizer failed ({type(exc).__name__}: "
                          f"{exc}); building without its fusions", RuntimeWarning, stacklevel=2)
            return job.entry.path
        return save_model(fused, tmp / "fused.onnx")

    def make_engine(self, job: LoadJob):
        from ..ort_cuda import OrtCudaEngine
        from ..ort_fusion import model_type

        e, o = job.entry, job.options
        # CUDA graphs per shape bucket: batch / size ranges too (each exact shape set captures its own graph)
        return OrtCudaEngine(e.name, e.inputs, e.outputs, job.profiles, path=job.artefact, device_id=o.device_id,
                             cuda_graph=o.cuda_graph, tensorrt_ep=self.tensorrt_ep,
                             trt_cache_dir=str(job.cache.root / "ort-trt"), request=job.request,
                             export_dir=job.export_dir, fusion=model_type(e.name) if self.fusions else None)


BACKEND = OnnxRuntimeCuda()
