"""What the three ONNX Runtime backends share: the providers this onnxruntime has, and the build step
(the session's optimized model, written by ``SessionOptions.optimized_model_filepath``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..envinfo import module_version
from ..spec import EngineError
from .base import Backend, BuildJob

EXTERNAL_DATA_MIN_BYTES = 1 << 20


def providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


class OnnxRuntimeBackend(Backend):
    """An ONNX Runtime backend: its artefact is the optimized model, which is specific to the ONNX Runtime
    version and the hardware it was optimized for, and accepts any shape the export accepts."""

    runtime = "ONNX Runtime"
    level = "all"  # graph optimization level of the build

    def build_providers(self, device_id: int) -> list:
        """The providers of the build session (``[name]`` or ``[(name, options)]``)."""
        raise NotImplementedError

    def environment(self, device_id: int = 0) -> dict:
        return {**self.machine_facts(device_id), "onnxruntime": module_version("onnxruntime")}

    def machine_facts(self, device_id: int) -> dict:
        return self.cpu_facts() if self.device_type == "cpu" else self.gpu_facts(device_id)

    def build_source(self, job: BuildJob, tmp: Path) -> Path:
        """The ONNX file the build session optimizes (the export's own by default; the CUDA backend fuses
        it first). A file written into ``tmp`` must not be named ``model.onnx*``."""
        return job.entry.path

    def before_session(self, ort) -> None:
        """Called before the build session is created (the CUDA backends preload CUDA libraries)."""

    def builder(self, job: BuildJob) -> Callable[[Path], dict]:
        entry, provs = job.entry, self.build_providers(job.options.device_id)
        level = self.level

        def build(tmp: Path) -> dict:
            import onnxruntime as ort

            from ..ort import check_providers, cpu_session_options
            from ..precision import QUANTIZED_CPU_NOTE, ort_session_configs, quantized_model

            quantized = quantized_model(job.manifest.data, entry.name)
            if quantized and self.device_type == "cpu":
                import warnings

                warnings.warn(f"{entry.name}: {quantized} Q/DQ graph "
                              f"{QUANTIZED_CPU_NOTE}", RuntimeWarning, stacklevel=2)

            out = tmp / "model.onnx"
            source = self.build_source(job, tmp)
            self.before_session(ort)
            so = cpu_session_options(level=level, optimized_model_path=str(out),
                                     external_data_min_bytes=EXTERNAL_DATA_MIN_BYTES)
            for key, value in ort_session_configs(job.manifest.data, entry.name).items():
                so.add_session_config_entry(key, value)  # a Q/DQ graph runs as written (fake quantization)
            session = ort.InferenceSession(str(source), sess_options=so, providers=provs)
            check_providers(session, [p[0] if isinstance(p, tuple) else p for p in provs], entry.name)
            del session
            if Path(source).parent == tmp:  # an intermediate file of this build (e.g. the fused model)
                for f in tmp.glob(Path(source).name + "*"):
                    f.unlink()
            if not out.is_file():
                raise EngineError(f"ONNX Runtime did not write the optimized model for {entry.name}")
            data = tmp / "model.onnx.data"
            if data.exists() and data.stat().st_size == 0:
                data.unlink()
            return {"artefact": "model.onnx"}

        return build
