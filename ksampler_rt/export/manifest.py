"""manifest.json written next to the exported models (read by the engines helper). Torch-free."""
from __future__ import annotations

import json
import os

FORMAT = "ksampler-rt-export"
FORMAT_VERSION = 1
# What this exporter writes inside format 1; bumped when the graphs change (2: every CLIP hidden layer;
# 3: the all-zero attention masks of torch's SDPA export are dropped).
EXPORTER_REVISION = 3
MANIFEST_NAME = "manifest.json"

REQUIRED_KEYS = ("format", "format_version", "family", "prediction", "latent_channels", "latent_scale",
                 "schedule", "text_encoders", "adm_channels", "models", "precision", "opset", "versions",
                 "weights_hash", "source", "initializer_map")


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name, dist in (("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                       ("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("ksampler_rt", "ksampler-rt")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            out[name] = None
    if out["ksampler_rt"] is None:
        from ksampler_rt import __version__
        out["ksampler_rt"] = __version__
    return out


def write_manifest(out_dir: str, manifest: dict) -> str:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest: received one without {missing}, expected all of {list(REQUIRED_KEYS)}")
    path = os.path.join(out_dir, MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_manifest(export_dir: str) -> dict:
    path = os.path.join(export_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{export_dir}: no {MANIFEST_NAME} (not a ksampler-rt export)")
    with open(path) as f:
        m = json.load(f)
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: format: received {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version: received {m.get('format_version')!r}, expected {FORMAT_VERSION} "
                         f"(re-export the checkpoint with this version of ksampler-rt)")
    return m
