"""LoRA on exported engines: ComfyUI's ``LoraLoader`` without re-exporting or rebuilding anything.

A LoRA file holds, per patched layer, a low-rank pair ``down`` [r, in(, kh, kw)] / ``up`` [out, r(, 1, 1)]
and optionally ``alpha`` (scale = alpha / r, 1 without alpha) and a LoCon/Tucker ``mid`` [r, r, kh, kw].
The merged weight is ``base + strength * scale * (up @ down)`` (several LoRAs add up), computed in
float32 on the host and cast to the export's dtype.

Key layouts read (see docs/lora.md):

* kohya / A1111: ``lora_unet_<module with _>``, ``lora_te_`` (SD1.x/2.x text encoder), ``lora_te1_`` /
  ``lora_te2_`` (SDXL clip_l / clip_g), ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (``.lora_mid.weight`` for Tucker LoCon); UNet names in diffusers layout (SD1.x/2.x) or LDM layout
  (``input_blocks_4_1_...``, what kohya writes for SDXL);
* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.``,
  ``text_encoder_2.``, optional ``base_model.model.``), old diffusers ``...to_q_lora.down.weight`` and
  ``.lora.down.weight`` / ``.lora_linear_layer.down.weight``; an ``.alpha`` next to them is honoured;
* LoCon: the kohya layout on convolutions (4-D down/up);
* SD3 / FLUX.1 (flow exports: ``transformer``, ``clip_l``, ``clip_g``): diffusers / PEFT ``transformer.``, kohya
  ``lora_unet_double_blocks_...`` / ``lora_unet_joint_blocks_...`` and ComfyUI's ``diffusion_model.<BFL
  module>``, whose fused layers (``img_attn.qkv``, ``linear1``) patch row blocks of several parameters
  (:mod:`.flow_lora`).

Reading the files is :mod:`.lora_files`, mapping keys onto an export :mod:`.lora_keys`; this module holds the
merged-weight engines and the ``LoraLoader`` API.

Keys are mapped onto ONNX initializers with the export manifest's
``initializer_map[model][torch parameter name]``: exact, no fuzzy matching. Keys that match nothing are
reported by name (``LoraPatch.unmatched``, logged); a LoRA where nothing matches, or where shapes do not
fit, is refused with the family its keys indicate / the key and both shapes. The base engines are never
modified: a LoRA MODEL / CLIP runs ``engine.with_weights(merged)`` (ONNX Runtime: a second session over
the export's ONNX; TensorRT: a refit view of the same plan), cached per (LoRA set, strengths).
"""
from __future__ import annotations

import copy
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .lora_files import LoraError, LoraFile, LoraModule, load_lora_file, parse_lora_keys, read_safetensors
from .lora_keys import FLOW_MODELS, SD_MODELS, KeyIndex, LoraPatch, resolve_lora

__all__ = ["LoraError", "LoraFile", "LoraModule", "load_lora_file", "parse_lora_keys", "read_safetensors",
           "KeyIndex", "LoraPatch", "resolve_lora", "WeightTarget", "LoraState", "EngineForward", "LoraContext",
           "check_strength", "load_lora", "attach"]

STRENGTH_MIN, STRENGTH_MAX = -100.0, 100.0
DEFAULT_CACHE_SIZE = 4  # merged weight sets (= LoRA engines) kept per base engine


# ------------------------------------------------------------------------------- weights on engines

class WeightTarget:
    """One base engine (UNet or a text encoder) of an export, and its LoRA variants.

    ``engine_for(stack)`` returns the engine for a LoRA stack ``((LoraPatch, strength), ...)``: the base
    engine itself when every strength is 0, else ``base.with_weights(merged)``, cached per
    (LoRA files, strengths) in an LRU of ``cache_size`` entries. Nothing is exported, built or written.
    """

    def __init__(self, engine, model: str, manifest: dict, export_dir: str | os.PathLike,
                 cache_size: int = DEFAULT_CACHE_SIZE, patch_model: str | None = None):
        self.engine, self.model, self.manifest = engine, model, manifest
        # the model whose resolved LoRA targets this engine takes: unet_control takes the UNet's (same weights)
        self.patch_model = patch_model or model
        self.export_dir = Path(export_dir)
        self.init_map = manifest["initializer_map"][model]
        self.cache_size = int(cache_size)
        self._engines: "OrderedDict[tuple, object]" = OrderedDict()
        self._proto = None
        self._lock = threading.RLock()
        self.merges = 0  # how many merged weight sets were computed (tests / benchmarks)

    def _tensors(self):
        if self._proto is None:
            import onnx

            file = self.manifest["models"][self.model]["file"]
            proto = onnx.load(str(self.export_dir / file), load_external_data=False)
            self._proto = {t.name: t for t in proto.graph.initializer}
        return self._proto

    def weight_shape(self, pname: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._tensors()[self.init_map[pname]].dims)

    def base_weight(self, pname: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self._tensors()[self.init_map[pname]], base_dir=str(self.export_dir))

    def merge(self, stack) -> dict[str, np.ndarray]:
        """{ONNX initializer name: base + sum(strength * scale * up @ down)} for the stack."""
        deltas: dict[str, np.ndarray] = {}
        for patch, strength in stack:
            for part, module in patch.targets.get(self.patch_model, ()):
                pname = part.pname
                d = module.delta(self.weight_shape(pname), part.rows) * np.float32(strength)
                deltas[pname] = deltas[pname] + d if pname in deltas else d
        out = {}
        for pname, d in deltas.items():
            base = self.base_weight(pname)
            out[self.init_map[pname]] = (base.astype(np.float32) + d).astype(base.dtype)
        self.merges += 1
        return out

    def engine_for(self, stack):
        active = tuple((p, float(s)) for p, s in stack if s != 0 and p.n_patched(self.patch_model))
        if not active:
            return self.engine
        key = tuple((p.lora.key, s) for p, s in active)
        with self._lock:
            eng = self._engines.get(key)
            if eng is not None:
                self._engines.move_to_end(key)
                return eng
            eng = self.engine.with_weights(self.merge(active))
            self._engines[key] = eng
            while len(self._engines) > self.cache_size:
                _, old = self._engines.popitem(last=False)
                old.release()
            return eng

    def release(self) -> None:
        with self._lock:
            for eng in self._engines.values():
                eng.release()
            self._engines.clear()


@dataclass(frozen=True)
class LoraState:
    """What a MODEL / CLIP tower carries so that LoraLoader can patch it: its base target and stack."""

    target: WeightTarget
    stack: tuple = ()


class EngineForward:
    """A text-encoder tower's forward pass on an engine (``ClipTower.forward``), LoRA-aware."""

    def __init__(self, engine, lora: LoraState | None = None):
        self.engine, self.lora = engine, lora

    def __call__(self, input_ids: np.ndarray) -> dict:
        return self.engine(input_ids=input_ids)


class LoraContext:
    """Per-checkpoint LoRA bookkeeping: the weight targets and resolved patches (cached per file)."""

    def __init__(self, engines, manifest: dict, export_dir, family: str):
        self.engines, self.manifest, self.export_dir, self.family = engines, manifest, Path(export_dir), family
        self.targets: dict[str, WeightTarget] = {}
        if "initializer_map" in manifest:
            for name in SD_MODELS + FLOW_MODELS:
                eng = getattr(engines, name, None)
                if eng is not None and name in manifest["initializer_map"]:
                    self.targets[name] = WeightTarget(eng, name, manifest, export_dir)
        self._patches: dict[tuple, LoraPatch] = {}
        self._lock = threading.Lock()

    def patch(self, lf: LoraFile, log: Callable[[str], None] | None = None, partial: bool = False) -> LoraPatch:
        """``lf`` resolved against this export (cached); ``partial``: no error when nothing matches (the
        rest of the file may be for the other export of a MODEL / CLIP pair)."""
        key = (lf.key, partial)
        with self._lock:
            if key in self._patches:
                return self._patches[key]
        if not self.targets:
            raise LoraError(f"{self.export_dir}: the export has no initializer_map; re-export it to use LoRAs")

        def shape(model, pname):
            if model not in self.targets:  # resolve_lora counts the key as unmatched
                raise KeyError(f"model: received {model!r}, expected one of {sorted(self.targets)}")
            return self.targets[model].weight_shape(pname)

        patch = resolve_lora(lf, self.manifest, shape, partial=partial)
        if patch.unmatched and log:
            log(f"LoRA {lf.name}: {len(patch.unmatched)} key(s) match no weight of this export and are not applied: "
                + ", ".join(patch.unmatched[:20]) + (" ..." if len(patch.unmatched) > 20 else ""))
        with self._lock:
            self._patches[key] = patch
        return patch

    def release(self) -> None:
        for t in self.targets.values():
            t.release()


# ------------------------------------------------------------------------------------------- API

def check_strength(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise LoraError(f"{name}: received {value!r}, expected a number in [{STRENGTH_MIN:g}, {STRENGTH_MAX:g}]")
    value = float(value)
    if not STRENGTH_MIN <= value <= STRENGTH_MAX:
        raise LoraError(f"{name}: received {value:g}, expected a number in [{STRENGTH_MIN:g}, {STRENGTH_MAX:g}] "
                        f"(ComfyUI's LoraLoader range)")
    return value


def _model_with(model, patch: LoraPatch, strength: float):
    state: LoraState | None = getattr(model, "lora", None)
    if state is None:
        raise LoraError("this MODEL was not loaded from a ksampler-rt export (CheckpointLoaderSimple), so a LoRA "
                        "cannot be applied to it")
    stack = state.stack + ((patch, strength),)
    engine = state.target.engine_for(stack)
    new = copy.copy(model)
    new.unet = state.target.context.engines.unet_callable(engine)
    control = getattr(model, "control_unet", None)
    if control is not None:  # the residual-taking UNet gets the same LoRA stack when a ControlNet needs it
        new.unet = new.control_unet = control.with_lora(new.unet, stack)
    new.lora = LoraState(state.target, stack)
    return new


def _tower_with(tower, patches: Callable[[object], LoraPatch], strength: float):
    """``tower`` running its LoRA stack + (the LoRA resolved for its export, strength), or None when LoRAs do not
    reach it (T5). A tower is a ClipTower (``forward``), or a flow CLIP's wrapper around one (``tower``:
    flow_towers.ClipTextTower)."""
    state = getattr(getattr(tower, "forward", None), "lora", None)
    if state is not None:
        stack = state.stack + ((patches(state.target.context), strength),)
        return replace(tower, forward=EngineForward(state.target.engine_for(stack), LoraState(state.target, stack)))
    inner = getattr(tower, "tower", None)
    if inner is not None:
        new = _tower_with(inner, patches, strength)
        return None if new is None else replace(tower, tower=new)
    return None


def _tower_list(clip) -> list:
    towers = getattr(clip, "towers", None) or ()
    return list(towers.values() if isinstance(towers, Mapping) else towers)


def _clip_with(clip, patches: Callable[[object], LoraPatch], strength: float):
    """A CLIP whose towers (a tuple: SD / SDXL ``Clip``; a mapping: ``FlowClip``) run the LoRA; towers it does
    not reach stay as they are."""
    towers = clip.towers
    items = list(towers.items()) if isinstance(towers, Mapping) else list(enumerate(towers))
    out, patched = [], 0
    for key, tower in items:
        new = _tower_with(tower, patches, strength)
        patched += new is not None
        out.append((key, tower if new is None else new))
    if not patched:
        raise LoraError("this CLIP was not loaded from a ksampler-rt export, so a LoRA cannot be applied to it")
    return replace(clip, towers=dict(out) if isinstance(towers, Mapping) else tuple(t for _, t in out))


def _contexts(model, clip) -> list:
    """The LoRA contexts (one per export) of the MODEL and the CLIP's towers, each once, MODEL's first."""
    found = []
    state = getattr(model, "lora", None) if model is not None else None
    if state is not None:
        found.append(state.target.context)
    for tower in _tower_list(clip) if clip is not None else ():
        tower = getattr(tower, "tower", tower)
        state = getattr(getattr(tower, "forward", None), "lora", None)
        if state is not None and all(state.target.context is not c for c in found):
            found.append(state.target.context)
    return found


def _resolve(lf: LoraFile, contexts: list, log) -> Callable[[object], LoraPatch]:
    """context -> ``lf`` resolved for it. Several exports (UNETLoader + DualCLIPLoader / TripleCLIPLoader): each
    takes the keys that match it; the file is refused only when none matches anywhere, and only keys that
    match no export are reported."""
    if len(contexts) == 1:
        patch = contexts[0].patch(lf, log)
        return lambda ctx: patch
    patches = [c.patch(lf, None, partial=True) for c in contexts]
    if not any(p.n_patched() for p in patches):
        contexts[0].patch(lf, log)  # raises, naming the family / keys
    unmatched = sorted(set.intersection(*(set(p.unmatched) for p in patches)))
    if unmatched and log:
        log(f"LoRA {lf.name}: {len(unmatched)} key(s) match no weight of these exports and are not applied: "
            + ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else ""))
    return lambda ctx: next(p for c, p in zip(contexts, patches) if c is ctx)


def load_lora(model, clip, lora, strength_model: float = 1.0, strength_clip: float = 1.0, *,
              log: Callable[[str], None] | None = print):
    """ComfyUI's ``LoraLoader``: ``(model, clip)`` with the LoRA file ``lora`` (a path or a LoraFile) applied.

    Returns new MODEL / CLIP objects; the inputs keep working unchanged. Chain calls to stack LoRAs.
    ``model`` or ``clip`` may be None (like ``LoraLoaderModelOnly``). The MODEL and the CLIP's towers may come
    from different exports (a flow transformer and its text encoders loaded separately).
    """
    strength_model = check_strength("strength_model", strength_model)
    strength_clip = check_strength("strength_clip", strength_clip)
    lf = lora if isinstance(lora, LoraFile) else load_lora_file(lora)
    contexts = _contexts(model, clip)
    if not contexts:
        raise LoraError("LoraLoader: the MODEL / CLIP were not loaded from a ksampler-rt export (CheckpointLoader"
                        "Simple), so a LoRA cannot be applied to them")
    patches = _resolve(lf, contexts, log)
    new_model = model
    if model is not None and strength_model != 0:
        state = getattr(model, "lora", None)
        new_model = _model_with(model, patches(state.target.context) if state else None, strength_model)
    new_clip = clip if clip is None or strength_clip == 0 else _clip_with(clip, patches, strength_clip)
    return new_model, new_clip


def attach(checkpoint_model, towers: Sequence, engines, manifest: dict, export_dir, family: str) -> LoraContext:
    """Called by the checkpoint / component loaders: give the base MODEL (the UNet or flow transformer; None
    for a text-encoder export) and the CLIP towers (named as their models: clip, clip2, clip_l, clip_g) their
    LoRA state. Towers without a LoRA target (T5) are left alone."""
    ctx = LoraContext(engines, manifest, export_dir, family)
    for t in ctx.targets.values():
        t.context = ctx
    denoiser = next((ctx.targets[n] for n in ("unet", "transformer") if n in ctx.targets), None)
    if denoiser is not None and checkpoint_model is not None:
        checkpoint_model.lora = LoraState(denoiser)
    for tower in towers:
        if isinstance(tower.forward, EngineForward) and tower.name in ctx.targets:
            tower.forward.lora = LoraState(ctx.targets[tower.name])
    return ctx
