"""``onnxruntime-cpu``: ONNX Runtime's CPU execution provider (a core dependency)."""
from __future__ import annotations

from ._onnxruntime import OnnxRuntimeBackend, providers
from .base import LoadJob


class OnnxRuntimeCpu(OnnxRuntimeBackend):
    name = "onnxruntime-cpu"
    device_type = "cpu"
    order = 40
    auto_priority = 40  # after openvino-cpu: same fp32 numerics, OpenVINO measured faster (docs/engines.md)
    level = "all"  # every pass, CPU layout (NCHWc) transforms included: the artefact is CPU-specific

    def unavailable_reason(self) -> str | None:
        return None if "CPUExecutionProvider" in providers() else "onnxruntime is not installed"

    def build_providers(self, device_id: int) -> list:
        return ["CPUExecutionProvider"]

    def resolve_precision(self, export_precision: str, requested: str | None) -> str:
        # --precision auto: the export's own precision -- fp16 has no native ONNX Runtime CPU kernels and int8
        # dynamic quantization was measured slower than fp32 on the UNet (docs/engines.md, "Precision")
        from ..precision import AUTO, parse_precision

        spec = parse_precision(requested)
        if spec is not None and {spec.default, *(p for _, p in spec.per)} <= {AUTO, None, export_precision}:
            requested = None
        return super().resolve_precision(export_precision, requested)

    def make_engine(self, job: LoadJob):
        from ..ort import OrtCpuEngine

        e = job.entry
        return OrtCpuEngine(e.name, e.inputs, e.outputs, job.profiles, path=job.artefact,
                            threads=job.options.threads, spinning=job.options.spinning, request=job.request,
                            export_dir=job.export_dir)

    def bench_variants(self, cores: int) -> list[tuple[str, dict]]:
        return [(f"threads={cores} spin=0", {"threads": cores}), ("threads=1 spin=0", {"threads": 1}),
                (f"threads={cores} spin=1", {"threads": cores, "spinning": True})]


BACKEND = OnnxRuntimeCpu()
