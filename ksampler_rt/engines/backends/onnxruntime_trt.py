"""``onnxruntime-trt``: ONNX Runtime's TensorRT execution provider (with the CUDA provider behind it);
never picked by ``auto`` (the native ``tensorrt`` backend is)."""
from __future__ import annotations

from ..envinfo import module_version
from .onnxruntime_cuda import OnnxRuntimeCuda


class OnnxRuntimeTrt(OnnxRuntimeCuda):
    name = "onnxruntime-trt"
    order = 30
    auto_priority = None
    execution_providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    tensorrt_ep = True

    def environment(self, device_id: int = 0) -> dict:
        return {**super().environment(device_id), "tensorrt": module_version("tensorrt")}


BACKEND = OnnxRuntimeTrt()
