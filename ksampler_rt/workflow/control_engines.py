"""ControlNet and T2I-Adapter on engines: the networks ``ControlNetLoader`` returns, and the checkpoint's
UNet switching to its residual-taking engine while a ControlNet is active.

Two UNet engines, not one: an export made with ``--control-inputs`` holds ``unet`` and ``unet_control``
(the same weights plus the residual inputs). The plain engine serves every call without ControlNet; the
residual-taking one is built and loaded on the first call that has residuals (docs/engines.md, "ControlNet":
feeding zeros to one always-residual engine costs every plain step, measured there).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable


class ControlledUNet:
    """``unet(x, timestep, context, control=None, **kw)``: the plain UNet, or with ``control`` the export's
    ``unet_control`` engine (loaded by ``load_control()`` on first use). :meth:`with_lora` gives the view of a
    LoRA stack: its plain callable, and the residual-taking engine with the same merged weights."""

    def __init__(self, plain: Callable, load_control: Callable[[], object] | None, export_dir: Path,
                 manifest: dict | None = None, *, root: "ControlledUNet | None" = None, stack: tuple = ()):
        self.plain, self._load_control, self.export_dir, self.manifest = plain, load_control, export_dir, manifest
        self.root, self.stack = root, stack
        self._engines = self._target = self._callable = None
        self._lock = threading.Lock()
        self.engine = getattr(plain, "engine", None)

    def with_lora(self, plain: Callable, stack: tuple) -> "ControlledUNet":
        root = self.root or self
        return ControlledUNet(plain, root._load_control, root.export_dir, root.manifest, root=root, stack=stack)

    def _control_engines(self):
        if self._load_control is None:
            raise ValueError(f"control_net: received a ControlNet for the checkpoint {self.export_dir.name}, whose "
                             f"export has no UNet with ControlNet inputs; expected one exported with "
                             f"`ksampler-rt export SOURCE --out {self.export_dir} --control-inputs`")
        with self._lock:
            if self._engines is None:
                self._engines = self._load_control()
            return self._engines

    def _lora_target(self):
        from .lora import WeightTarget

        engines = self._control_engines()
        with self._lock:
            if self._target is None:
                self._target = WeightTarget(engines.unet_control, "unet_control", self.manifest, self.export_dir,
                                            patch_model="unet")
            return self._target

    def control_callable(self) -> Callable:
        if self._callable is None:
            root = self.root or self
            engines = root._control_engines()
            engine = root._lora_target().engine_for(self.stack) if self.stack else engines.unet_control
            self._callable = engines.unet_callable(engine)
        return self._callable

    def __call__(self, x, timestep, context, control=None, **kwargs):
        if control is None:
            return self.plain(x, timestep, context, **kwargs)
        return self.control_callable()(x, timestep, context, control=control, **kwargs)

    def release(self) -> None:
        with self._lock:
            if self._target is not None:
                self._target.release()
            if self._engines is not None:
                self._engines.release()
            self._engines = self._target = self._callable = None


class EngineControl:
    """A CONTROL_NET on engines: ``kind`` "controlnet" (``net(x, timestep, context, hint, y=None) ->
    {"down", "mid"}``) or "t2i_adapter" (``net(hint) -> [features]``, down-block order), ``family`` the UNet
    family it fits; the T2I attributes the runtime reads come from the export's manifest."""

    def __init__(self, engines, manifest: dict, name: str = ""):
        self.engines, self.manifest = engines, manifest
        self.kind = manifest.get("kind", "controlnet")
        self.family = manifest.get("family")
        # comfy/controlnet.py load_controlnet: the config's global_pool_conditions, or a file named *_shuffle
        stem = name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".pth", ".ckpt", ".bin")) else name
        self.global_average_pooling = bool(manifest.get("global_pool_conditions")) or stem.endswith(
            ("_shuffle", "_shuffle_fp16"))
        if self.kind == "t2i_adapter":
            # comfy/t2i_adapter/adapter.py Adapter: pixel unshuffle by 8, by 16 for the SDXL adapters; its input
            # channels are the image's (3, or 1 for the sketch adapters)
            self.unshuffle_amount = 16 if manifest.get("adapter_type") == "full_adapter_xl" else 8
            cond = next(s for s in engines.t2i_adapter.inputs if s.name == "controlnet_cond")
            self.channels_in = int(cond.shape[1]) if isinstance(cond.shape[1], int) else 3
            self._call = _adapter_callable(engines.t2i_adapter, manifest)
        else:
            self._call = engines.controlnet_callable()

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def release(self) -> None:
        self.engines.release()


def _adapter_callable(engine, manifest: dict) -> Callable:
    import numpy as np

    names = list((manifest.get("control_outputs") or {}).get("features") or engine.output_names)
    dtype = next(s.dtype for s in engine.inputs if s.name == "controlnet_cond")

    def adapter(hint):
        out = engine(controlnet_cond=np.ascontiguousarray(hint, dtype=dtype))
        return [out[n] for n in names]

    adapter.engine = engine
    return adapter


def load_controlnet(registry, name: str, *, backend: str = "auto", log: Callable[[str], None] | None = print,
                    **engine_options) -> EngineControl:
    """``ControlNetLoader``'s ``control_net_name``: an export registered under the registry's ``controlnet/``."""
    import json

    from ..engines import load_engines

    path = registry.component("controlnet", name)
    manifest = json.loads((path / "manifest.json").read_text())
    kind = manifest.get("kind")
    if kind not in ("controlnet", "t2i_adapter"):
        raise ValueError(f"control_net_name: received {name!r}, an export of kind {kind or 'checkpoint'!r}, "
                         f"expected a ControlNet or T2I-Adapter export (`ksampler-rt export` of one)")
    engines = load_engines(path, backend=backend, log=log, **engine_options)
    return EngineControl(engines, manifest, name)
