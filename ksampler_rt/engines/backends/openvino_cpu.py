"""``openvino-cpu``: OpenVINO's CPU plugin (``pip install 'ksampler-rt[openvino]'``). The artefact is the
export converted once to OpenVINO IR (``model.xml`` + ``model.bin``, weights kept in the export's
precision), keyed by the OpenVINO version and the CPU; the engine compiles it per input shape at run
time, so it is not shape-bound."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..envinfo import openvino_version
from ..spec import EngineError
from .base import Backend, BuildJob, LoadJob


class OpenVinoCpu(Backend):
    name = "openvino-cpu"
    device_type = "cpu"
    order = 50
    auto_priority = 30  # before onnxruntime-cpu: same fp32 numerics, measured faster on CPUs (docs/engines.md)
    runtime = "OpenVINO"

    def unavailable_reason(self) -> str | None:
        from ..openvino_backend import openvino_unavailable_reason

        return openvino_unavailable_reason()

    def environment(self, device_id: int = 0) -> dict:
        return {**self.cpu_facts(), "openvino": openvino_version()}

    def builder(self, job: BuildJob) -> Callable[[Path], dict]:
        entry = job.entry

        def build(tmp: Path) -> dict:
            from ..openvino_backend import import_openvino

            ov = import_openvino()
            model = ov.Core().read_model(str(entry.path))
            # compress_to_fp16=False: an fp32 export stays fp32 (save_model's default would halve the weights).
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            del model
            for f in ("model.xml", "model.bin"):
                if not (tmp / f).is_file():
                    raise EngineError(f"OpenVINO did not write {f} for {entry.name}")
            return {"artefact": "model.xml"}

        return build

    def make_engine(self, job: LoadJob):
        from ..openvino_backend import OpenVinoCpuEngine, model_cache_dir

        e = job.entry
        return OpenVinoCpuEngine(e.name, e.inputs, e.outputs, job.profiles, path=job.artefact,
                                 threads=job.options.threads, model_cache=model_cache_dir(job.cache.root),
                                 request=job.request, export_dir=job.export_dir)


BACKEND = OpenVinoCpu()
