"""Tiny ControlNet fixtures shared by the export tests and the end-to-end ControlNet tests.

``tiny_controlnet_export(family, tmp_root)`` builds (once per session, under the first ``tmp_root`` given) a tiny ``family`` checkpoint
with its tiny ControlNet and T2I-Adapter (``make-tiny-model --controlnet --t2i-adapter``), and exports the
checkpoint with ``unet_control`` and the ControlNet. Returns ``(sd_export_dir, controlnet_export_dir,
diffusers_dir)``: ``diffusers_dir/controlnet`` and ``diffusers_dir/t2i_adapter`` hold the diffusers modules
(the references). ``tiny_t2i_adapter_export(family, tmp_root)`` is the T2I-Adapter's export. Read-only.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_CACHE: dict = {}


def tiny_control_source(family: str, tmp_root) -> Path:
    """The tiny ``family`` checkpoint folder with ``controlnet/`` and ``t2i_adapter/`` (built once)."""
    key = ("source", family)  # one per session, whichever tmp_root asks first
    if key not in _CACHE:
        from ksampler_rt.export.tiny import make_tiny_model
        from ksampler_rt.export.tiny_control import make_tiny_controlnet, make_tiny_t2i_adapter

        src = make_tiny_model(Path(tmp_root) / f"cn-{family}" / "model", family, seed=0)
        make_tiny_controlnet(src)
        make_tiny_t2i_adapter(src)
        _CACHE[key] = src
    return _CACHE[key]


def tiny_controlnet_export(family: str, tmp_root) -> tuple[Path, Path, Path]:
    """(SD export with unet_control, ControlNet export, diffusers checkpoint folder) for ``family``."""
    key = ("cn", family)
    if key not in _CACHE:
        from ksampler_rt.export.onnx_export import export_model

        src = tiny_control_source(family, tmp_root)
        root = Path(tmp_root) / f"cn-{family}"
        export_model(str(src), str(root / "export"), control_inputs=True)
        export_model(str(src / "controlnet"), str(root / "controlnet-export"))
        _CACHE[key] = (root / "export", root / "controlnet-export", src)
    return _CACHE[key]


def tiny_t2i_adapter_export(family: str, tmp_root) -> Path:
    """The tiny ``family`` T2I-Adapter's export (its diffusers folder: ``tiny_control_source(...)/t2i_adapter``)."""
    key = ("ad", family)
    if key not in _CACHE:
        from ksampler_rt.export.onnx_export import export_model

        src = tiny_control_source(family, tmp_root)
        out = Path(tmp_root) / f"cn-{family}" / "t2i-adapter-export"
        export_model(str(src / "t2i_adapter"), str(out))
        _CACHE[key] = out
    return _CACHE[key]
