"""``openvino-cpu``: OpenVINO's CPU plugin (``pip install 'ksampler-rt[openvino]'``). The artefact is the
export converted once to OpenVINO IR (``model.xml`` + ``model.bin``, weights kept in the export's
precision), keyed by the OpenVINO version and the CPU; the engine compiles it per input shape at run
time, so it is not shape-bound.

Precision (``--precision``, per network as ``unet=bf16,vae=fp32``; ``ksampler_rt.engines.precision``):
fp32 (default), bf16 and fp16 are OpenVINO's ``INFERENCE_PRECISION_HINT`` at compile time (the IR keeps
fp32 weights); int8 compresses the IR's weights to int8 with NNCF (``nncf.compress_weights``, INT8_ASYM,
per channel) at build time. Each precision is refused with the missing CPU feature where this CPU has no
native path for it; ``auto`` resolves per network (docs/engines.md, "Precision").
"""
from __future__ import annotations

import json
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

    def resolve_precision(self, export_precision: str, requested: str | None) -> str:
        """The set's precision spec (``fp32``, ``bf16`` or per network ``unet=bf16,vae=fp32``), ``auto``
        resolved for this CPU; a precision this CPU cannot run natively is refused with the reason."""
        from ..precision import resolve_cpu_spec

        return resolve_cpu_spec(self.name, export_precision, requested)

    def model_precision(self, precision: str, entry, manifest) -> str:
        from ..precision import model_precision_of

        return model_precision_of(precision, entry.name, manifest.family)

    def builder(self, job: BuildJob) -> Callable[[Path], dict]:
        from ..openvino_backend import INFERENCE_HINTS, PRECISION_FILE

        entry = job.entry
        precision = job.precision
        if precision not in INFERENCE_HINTS:
            raise EngineError(f"precision: received {precision!r} for {entry.name}, expected one of "
                              f"{', '.join(INFERENCE_HINTS)} (openvino-cpu)")

        def build(tmp: Path) -> dict:
            from ..openvino_backend import import_openvino

            ov = import_openvino()
            model = ov.Core().read_model(str(entry.path))
            if precision == "int8":
                model = _compress_int8(model, entry.name)
            # compress_to_fp16=False: an fp32 export stays fp32 (save_model's default would halve the weights).
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            del model
            for f in ("model.xml", "model.bin"):
                if not (tmp / f).is_file():
                    raise EngineError(f"OpenVINO did not write {f} for {entry.name}")
            if precision == "fp32":  # no record: an fp32 artefact stays what it was before precisions existed
                return {"artefact": "model.xml"}
            record = {"precision": precision, "inference_precision_hint": INFERENCE_HINTS[precision],
                      "weights": "int8 (NNCF INT8_ASYM, per channel)" if precision == "int8" else "as exported"}
            (tmp / PRECISION_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            return {"artefact": "model.xml", "precision_detail": record}

        return build

    def make_engine(self, job: LoadJob):
        from ..openvino_backend import PRECISION_FILE, OpenVinoCpuEngine, model_cache_dir

        e = job.entry
        # the artefact records the precision it was built in; fp32 ones (and those built before precisions) have
        # no record
        record = Path(job.artefact).parent / PRECISION_FILE
        precision = json.loads(record.read_text())["precision"] if record.is_file() else "fp32"
        return OpenVinoCpuEngine(e.name, e.inputs, e.outputs, job.profiles, path=job.artefact,
                                 threads=job.options.threads, model_cache=model_cache_dir(job.cache.root),
                                 request=job.request, export_dir=job.export_dir, precision=precision)


def _compress_int8(model, name: str):
    """The model with int8 weights (NNCF weight compression; activations stay in the inference precision)."""
    try:
        import nncf
    except ImportError as exc:
        raise EngineError(f"int8 on openvino-cpu needs NNCF for {name}'s weight compression: nncf is not "
                          f"installed (pip install nncf)") from exc
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


BACKEND = OpenVinoCpu()
