"""``onnxruntime-cuda``: ONNX Runtime's CUDA execution provider, IO binding and CUDA graphs (needs the
``onnxruntime-gpu`` wheel instead of ``onnxruntime``)."""
from __future__ import annotations

from ._onnxruntime import OnnxRuntimeBackend, providers
from .base import LoadJob

GPU_SWAP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1"


class OnnxRuntimeCuda(OnnxRuntimeBackend):
    name = "onnxruntime-cuda"
    device_type = "cuda"
    order = 20
    auto_priority = 20
    level = "extended"  # the layout passes of "all" are CPU-only and EP-specific
    execution_providers = ("CUDAExecutionProvider",)  # all must be in this onnxruntime
    tensorrt_ep = False

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

    def make_engine(self, job: LoadJob):
        from ..ort import OrtCudaEngine

        e, o = job.entry, job.options
        static = not job.profiles or all(p.is_static for p in job.profiles)  # CUDA graphs need fixed shapes
        return OrtCudaEngine(e.name, e.inputs, e.outputs, job.profiles, path=job.artefact, device_id=o.device_id,
                             cuda_graph=o.cuda_graph and static, tensorrt_ep=self.tensorrt_ep,
                             trt_cache_dir=str(job.cache.root / "ort-trt"), request=job.request,
                             export_dir=job.export_dir)


BACKEND = OnnxRuntimeCuda()
