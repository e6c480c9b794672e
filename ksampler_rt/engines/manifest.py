"""Reading an export directory: ``manifest.json`` plus the IO specs of each ONNX file.

Only these manifest keys are relied on: ``format``, ``format_version``, ``family``, ``prediction``,
``latent_scale``, ``models`` (each ``file``, ``inputs``, ``outputs``), ``precision``, ``weights_hash``.
IO specs come from the ONNX file itself when the ``onnx`` package is importable (an export-time
dependency, so a production box may not have it), else from the manifest.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from .profiles import MODELS
from .spec import EngineError, TensorSpec

FORMAT = "ksampler-rt-export"
FORMAT_VERSION = 1


@dataclass
class ModelEntry:
    name: str
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass
class ExportManifest:
    export_dir: Path
    data: dict
    models: dict[str, ModelEntry] = field(default_factory=dict)

    @property
    def weights_hash(self) -> str:
        return str(self.data["weights_hash"])

    @property
    def precision(self) -> str:
        return str(self.data.get("precision") or "fp32")

    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell (8 for SD/SDXL): ``latent_downscale`` when the exporter writes it; else
        ``latent_scale`` when it
        is an integer >= 2; a float below 1 is the VAE scaling factor (0.18215), not a size ratio."""
        v = self.data.get("latent_downscale")
        if isinstance(v, int) and v >= 2:
            return v
        v = self.data.get("latent_scale")
        if isinstance(v, (int, float)) and float(v) >= 2 and float(v).is_integer():
            return int(v)
        return 8

    @property
    def family(self) -> str | None:
        return self.data.get("family")

    @property
    def kind(self) -> str:
        """What the export is: ``checkpoint`` (a denoiser and maybe its text encoders / VAE, or a separate
        component of one), ``controlnet`` or ``t2i_adapter``."""
        return str(self.data.get("kind") or "checkpoint")


def read_onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
    """Graph inputs/outputs from the ONNX file (without loading external weights), or None."""
    if importlib.util.find_spec("onnx") is None:
        return None
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def specs(values):
        out = []
        for v in values:
            if v.name in inits:
                continue
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in t.shape.dim)
            out.append(TensorSpec(v.name, int(t.elem_type), dims))
        return out

    return specs(model.graph.input), specs(model.graph.output)


def load_manifest(export_dir, read_onnx: bool = True) -> ExportManifest:
    export_dir = Path(export_dir).expanduser().resolve()
    path = export_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {export_dir} is not a ksampler-rt export "
                                f"(create one with `ksampler-rt export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path} is not valid JSON: {exc}") from None
    if data.get("format") != FORMAT:
        raise EngineError(f"{path}: format is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: format_version {data.get('format_version')!r} is not supported "
                          f"(this ksampler-rt reads version {FORMAT_VERSION}); re-export the model")
    for key in ("models", "weights_hash"):
        if key not in data:
            raise EngineError(f"{path}: missing key {key!r}")
    manifest = ExportManifest(export_dir, data)
    for name, entry in data["models"].items():
        if name not in MODELS:
            continue  # a model this runtime does not use
        file = export_dir / entry["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{file} (model {name!r} of {path}) not found")
        io = read_onnx_io(file) if read_onnx else None
        if io is None:
            io = ([TensorSpec.from_json(s) for s in entry.get("inputs", [])],
                  [TensorSpec.from_json(s) for s in entry.get("outputs", [])])
        manifest.models[name] = ModelEntry(name, file, io[0], io[1])
    if not manifest.models:
        raise EngineError(f"{path}: received an export with the models {sorted(data['models'])}, expected at least "
                          f"one of {', '.join(MODELS)}")
    return manifest
