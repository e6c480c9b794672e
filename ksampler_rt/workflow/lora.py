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
* LoCon: the kohya layout on convolutions (4-D down/up).

Keys are mapped onto ONNX initializers with the export manifest's
``initializer_map[model][torch parameter name]``: exact, no fuzzy matching. Keys that match nothing are
reported by name (``LoraPatch.unmatched``, logged); a LoRA where nothing matches, or where shapes do not
fit, is refused with the family its keys indicate / the key and both shapes. The base engines are never
modified: a LoRA MODEL / CLIP runs ``engine.with_weights(merged)`` (ONNX Runtime: a second session over
the export's ONNX; TensorRT: a refit view of the same plan), cached per (LoRA set, strengths).
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

STRENGTH_MIN, STRENGTH_MAX = -100.0, 100.0
DEFAULT_CACHE_SIZE = 4  # merged weight sets (= LoRA engines) kept per base engine

_FAMILY_LABEL = {"sd15": "SD1.x", "sd1": "SD1.x", "sd2": "SD2.x", "sd2-v": "SD2.x", "sdxl": "SDXL",
                 "sdxl-refiner": "SDXL refiner"}
# width of the cross-attention context (attn2.to_k input) -> family; the tiny fixtures' widths included
_CONTEXT_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner",
                   32: "sd15", 48: "sd2", 96: "sdxl"}
# text-encoder hidden width (q_proj input) -> family (SD1.x clip_l vs SD2.x clip_h; tiny 32 / 48)
_TE_FAMILY = {768: "sd15", 1024: "sd2", 32: "sd15", 48: "sd2"}

_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# (suffix, role), longest first within each layout
_ROLES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)


class LoraError(ValueError):
    """A LoRA that cannot be applied to this checkpoint (the base engines stay usable)."""


# ----------------------------------------------------------------------------------------- reading

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as float32 numpy arrays for float dtypes, metadata). Reads BF16 without torch."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise LoraError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise LoraError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoraError(f"{path}: not a safetensors file ({exc})") from None
        data = f.read()
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        raw = data[lo:hi]
        if dtype == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _ST_DTYPES:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise LoraError(f"{path}: tensor {name!r} has dtype {dtype}, which ksampler-rt does not read")
        arr = arr.reshape(shape)
        out[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.copy()
    return out, dict(meta)


@dataclass(eq=False)
class LoraModule:
    """One patched layer of a LoRA file."""

    name: str                       # the file's key stem, e.g. lora_unet_down_blocks_0_..._to_q
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    mid: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta_shape(self) -> tuple[int, ...]:
        """Shape of up @ down before it is fitted onto the weight (for messages)."""
        down = self.down if self.mid is None else self._tucker_down()
        return (int(self.up.shape[0]),) + tuple(int(d) for d in down.shape[1:])

    def _tucker_down(self) -> np.ndarray:
        # LoCon "Tucker" decomposition: down [r, in, 1, 1], mid [r, r, kh, kw] -> an effective down
        # [r, in, kh, kw] (out-rank index first): down_eff[o, i] = sum_r mid[o, r] * down[r, i]
        d = self.down.reshape(self.down.shape[0], -1)                 # [r_in, in]
        mid = self.mid                                                # [r_out, r_in, kh, kw]
        return np.einsum("orhw,rc->ochw", mid, d)

    def delta(self, weight_shape: Sequence[int]) -> np.ndarray:
        """scale * (up @ down) reshaped to ``weight_shape`` (float32); ValueError when it does not fit."""
        down = self.down if self.mid is None else self._tucker_down()
        up2 = self.up.reshape(self.up.shape[0], -1)
        down2 = down.reshape(down.shape[0], -1)
        if up2.shape[1] != down2.shape[0]:
            raise ValueError(f"lora_up {list(self.up.shape)} and lora_down {list(self.down.shape)} have "
                             f"different ranks")
        d = up2.astype(np.float32) @ down2.astype(np.float32)
        if d.size != int(np.prod(weight_shape)):
            raise ValueError(f"up @ down is {list(self.delta_shape())}")
        return d.reshape(tuple(weight_shape)) * np.float32(self.scale)


def parse_lora_keys(tensors: dict[str, np.ndarray]) -> tuple[dict[str, LoraModule], list[str]]:
    """Group a LoRA state dict into modules; returns (modules by stem, keys of unknown layouts)."""
    modules: dict[str, LoraModule] = {}
    unknown = []
    for key, value in tensors.items():
        for suffix, role in _ROLES:
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                m = modules.setdefault(stem, LoraModule(stem))
                if role == "alpha":
                    m.alpha = float(np.asarray(value, np.float64).reshape(-1)[0])
                else:
                    setattr(m, role, value)
                break
        else:
            unknown.append(key)
    for stem, m in list(modules.items()):
        if m.down is None or m.up is None:  # an alpha (or half a pair) alone patches nothing
            del modules[stem]
            unknown.extend(k for k in tensors if k.startswith(stem + ".") or k.startswith(stem + "_lora"))
    return modules, sorted(set(unknown))


@dataclass(eq=False)
class LoraFile:
    """A LoRA file, parsed once (``load_lora_file``)."""

    path: Path
    modules: dict[str, LoraModule]
    unknown_keys: list[str]
    metadata: dict = field(default_factory=dict)
    key: tuple = ()

    @property
    def name(self) -> str:
        return self.path.name


_FILES: "OrderedDict[tuple, LoraFile]" = OrderedDict()
_FILES_LOCK = threading.Lock()


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read and parse a LoRA ``.safetensors`` (cached by path, size and modification time)."""
    path = Path(path).expanduser()
    if not path.is_file():
        folder = path.parent
        listing = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") if folder.is_dir() else []
        raise FileNotFoundError(f"LoRA file {str(path)!r} not found; {folder} has: "
                                f"{', '.join(listing) or '(no .safetensors files)'}")
    path = path.resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _FILES_LOCK:
        if key in _FILES:
            _FILES.move_to_end(key)
            return _FILES[key]
    tensors, meta = read_safetensors(path)
    modules, unknown = parse_lora_keys(tensors)
    lf = LoraFile(path, modules, unknown, meta, key)
    with _FILES_LOCK:
        _FILES[key] = lf
        while len(_FILES) > 8:
            _FILES.popitem(last=False)
    return lf


# ------------------------------------------------------------------------------------ key mapping

def _indicated_family(lf: LoraFile) -> tuple[str | None, str]:
    """(family, why) from a LoRA's keys and shapes, or (None, "")."""
    stems = list(lf.modules)
    if any(s.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for s in stems):
        return "sdxl", "it has SDXL's two text-encoder key sets (lora_te1_ / lora_te2_)"
    for s, m in lf.modules.items():
        if "attn2" in s and "to_k" in s and m.down is not None and m.down.ndim >= 2:
            width = int(m.down.shape[1])
            fam = _CONTEXT_FAMILY.get(width)
            if fam:
                return fam, f"its cross-attention keys take a {width}-wide text context ({s})"
    for s, m in lf.modules.items():
        if ("lora_te_" in s or s.startswith("text_encoder.")) and "q_proj" in s and m.down is not None:
            width = int(m.down.shape[1])
            fam = _TE_FAMILY.get(width)
            if fam:
                return fam, f"its text-encoder keys are {width} wide ({s})"
    if any(s.startswith("lora_unet_input_blocks_") for s in stems):
        return "sdxl", "its UNet keys use the LDM layout kohya writes for SDXL (lora_unet_input_blocks_...)"
    return None, ""


def _same_family(a: str | None, b: str | None) -> bool:
    return _FAMILY_LABEL.get(a or "", a) == _FAMILY_LABEL.get(b or "", b)


class KeyIndex:
    """LoRA key stem -> (model, torch parameter name of the weight) for one export."""

    def __init__(self, manifest: dict):
        self.family = manifest.get("family")
        init_map = manifest.get("initializer_map") or {}
        if "unet" not in init_map:
            raise LoraError("this export's manifest has no initializer_map for the UNet: re-export it with this "
                            "ksampler-rt to use LoRAs")
        self.models = [m for m in init_map if m in ("unet", "clip", "clip2")]
        self.init_map = init_map
        self.dotted: dict[str, dict[str, str]] = {}   # model -> module path -> param name
        self.flat: dict[str, dict[str, str]] = {}     # model -> module path with "_" -> param name
        for model in self.models:
            dotted, flat = {}, {}
            for pname in init_map[model]:
                if not pname.endswith(".weight"):
                    continue
                module = pname[: -len(".weight")]
                if module.startswith("text_model."):
                    module = module[len("text_model."):]
                dotted[module] = pname
                flat[module.replace(".", "_")] = pname
            self.dotted[model], self.flat[model] = dotted, flat
        self.ldm_flat: dict[str, str] = {}  # LDM-layout UNet module with "_" -> diffusers param name
        try:
            from ..export.ldm_writer import unet_to_ldm

            names = list(init_map["unet"])
            blocks = {int(n.split(".")[3]) for n in names if n.startswith("down_blocks.0.resnets.")}
            ldm = unet_to_ldm({n: None for n in names}, {"layers_per_block": max(blocks) + 1 if blocks else 2})
            inverse = {}
            for ldm_name, diff_name in zip(ldm, names):
                inverse[ldm_name] = diff_name
            for ldm_name, diff_name in inverse.items():
                if ldm_name.endswith(".weight") and diff_name.endswith(".weight"):
                    self.ldm_flat[ldm_name[: -len(".weight")].replace(".", "_")] = diff_name
        except Exception:  # the LDM names are a convenience; diffusers names always work
            self.ldm_flat = {}

    def _te_model(self, which: str) -> str | None:
        if which in ("te", "te1"):
            return "clip" if "clip" in self.models else None
        return "clip2" if "clip2" in self.models else None

    def lookup(self, stem: str) -> tuple[str, str] | None:
        if stem.startswith("lora_unet_"):
            flat = stem[len("lora_unet_"):]
            p = self.flat["unet"].get(flat) or self.ldm_flat.get(flat)
            return ("unet", p) if p else None
        for which in ("te1", "te2", "te"):
            prefix = f"lora_{which}_"
            if stem.startswith(prefix):
                model = self._te_model(which)
                flat = stem[len(prefix):]
                if flat.startswith("text_model_"):
                    flat = flat[len("text_model_"):]
                p = self.flat[model].get(flat) if model else None
                return (model, p) if p else None
        s = stem
        if s.startswith("base_model.model."):
            s = s[len("base_model.model."):]
        for prefix, model in (("unet.", "unet"), ("text_encoder_2.", "clip2"), ("text_encoder.", "clip"),
                              ("lora_unet.", "unet")):
            if s.startswith(prefix):
                s = s[len(prefix):]
                break
        else:
            model = "unet"
        if model != "unet" and model not in self.models:
            return None
        s = s.replace(".processor.", ".")
        head, _, last = s.rpartition(".")
        if model == "unet" and last == "to_out":  # old diffusers attention processors: to_out_lora = to_out.0
            s += ".0"
        elif model != "unet" and last in _TE_PROJ:  # ... and their text-encoder names: to_q_lora = q_proj
            s = f"{head}.{_TE_PROJ[last]}"
        if s.startswith("text_model."):
            s = s[len("text_model."):]
        p = self.dotted[model].get(s)
        return (model, p) if p else None


@dataclass
class LoraPatch:
    """A LoRA file resolved against one export: which initializer each module patches."""

    lora: LoraFile
    targets: dict[str, list[tuple[str, LoraModule]]]   # model -> [(torch param name, module)]
    unmatched: list[str]                                # key stems / keys that patch nothing here

    def n_patched(self, model: str | None = None) -> int:
        return sum(len(v) for m, v in self.targets.items() if model is None or m == model)


def resolve_lora(lf: LoraFile, manifest: dict, weight_shape: Callable[[str, str], tuple]) -> LoraPatch:
    """Match ``lf`` to an export; raises LoraError for a foreign family, nothing matching, or bad shapes."""
    index = KeyIndex(manifest)
    targets: dict[str, list] = {}
    unmatched = list(lf.unknown_keys)
    mismatches = []
    for stem, m in lf.modules.items():
        hit = index.lookup(stem)
        if hit is None:
            unmatched.append(stem)
            continue
        model, pname = hit
        shape = weight_shape(model, pname)
        try:
            ok = m.delta_shape()
            if int(np.prod(ok)) != int(np.prod(shape)) or m.up.reshape(m.up.shape[0], -1).shape[1] != m.down.shape[0]:
                raise ValueError
        except ValueError:
            mismatches.append((stem, list(m.up.shape), list(m.down.shape), model, pname, list(shape)))
            continue
        targets.setdefault(model, []).append((pname, m))
    if mismatches or not targets:
        fam, why = _indicated_family(lf)
        if fam and not _same_family(fam, index.family):
            raise LoraError(f"LoRA {lf.name} is made for {_FAMILY_LABEL.get(fam, fam)} ({why}), but this checkpoint "
                            f"is {_FAMILY_LABEL.get(index.family, index.family)}; the base model is unchanged")
    if mismatches:
        lines = "; ".join(f"{stem}: lora_up {up} @ lora_down {down} does not fit {model} weight {pname!r} of shape "
                          f"{shape}" for stem, up, down, model, pname, shape in mismatches[:6])
        more = f" (and {len(mismatches) - 6} more)" if len(mismatches) > 6 else ""
        raise LoraError(f"LoRA {lf.name}: shape mismatch: {lines}{more}; the base model is unchanged")
    if not targets:
        shown = ", ".join(sorted(unmatched)[:8]) or "(the file has no LoRA keys)"
        raise LoraError(f"LoRA {lf.name}: none of its {len(lf.modules)} modules match a weight of this "
                        f"{_FAMILY_LABEL.get(index.family, index.family)} export (e.g. {shown}); supported layouts: "
                        f"kohya lora_unet_/lora_te_, diffusers/PEFT unet./text_encoder. with lora_A/lora_B")
    return LoraPatch(lf, targets, sorted(unmatched))


# ------------------------------------------------------------------------------- weights on engines

class WeightTarget:
    """One base engine (UNet or a text encoder) of an export, and its LoRA variants.

    ``engine_for(stack)`` returns the engine for a LoRA stack ``((LoraPatch, strength), ...)``: the base
    engine itself when every strength is 0, else ``base.with_weights(merged)``, cached per
    (LoRA files, strengths) in an LRU of ``cache_size`` entries. Nothing is exported, built or written.
    """

    def __init__(self, engine, model: str, manifest: dict, export_dir: str | os.PathLike,
                 cache_size: int = DEFAULT_CACHE_SIZE):
        self.engine, self.model, self.manifest = engine, model, manifest
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
            for pname, module in patch.targets.get(self.model, ()):
                shape = self.weight_shape(pname)
                d = module.delta(shape) * np.float32(strength)
                deltas[pname] = deltas[pname] + d if pname in deltas else d
        out = {}
        for pname, d in deltas.items():
            base = self.base_weight(pname)
            out[self.init_map[pname]] = (base.astype(np.float32) + d).astype(base.dtype)
        self.merges += 1
        return out

    def engine_for(self, stack):
        active = tuple((p, float(s)) for p, s in stack if s != 0 and p.n_patched(self.model))
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
            for name in ("unet", "clip", "clip2"):
                eng = getattr(engines, name, None)
                if eng is not None and name in manifest["initializer_map"]:
                    self.targets[name] = WeightTarget(eng, name, manifest, export_dir)
        self._patches: dict[tuple, LoraPatch] = {}
        self._lock = threading.Lock()

    def patch(self, lf: LoraFile, log: Callable[[str], None] | None = None) -> LoraPatch:
        with self._lock:
            if lf.key in self._patches:
                return self._patches[lf.key]
        if not self.targets:
            raise LoraError(f"{self.export_dir}: the export has no initializer_map; re-export it to use LoRAs")

        def shape(model, pname):
            if model not in self.targets:  # resolve_lora counts the key as unmatched
                raise KeyError(f"model: received {model!r}, expected one of {sorted(self.targets)}")
            return self.targets[model].weight_shape(pname)

        patch = resolve_lora(lf, self.manifest, shape)
        if patch.unmatched and log:
            log(f"LoRA {lf.name}: {len(patch.unmatched)} key(s) match no weight of this export and are not applied: "
                + ", ".join(patch.unmatched[:20]) + (" ..." if len(patch.unmatched) > 20 else ""))
        with self._lock:
            self._patches[lf.key] = patch
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
    new.lora = LoraState(state.target, stack)
    return new


def _clip_with(clip, patch: LoraPatch, strength: float):
    towers = []
    for tower in clip.towers:
        fwd = tower.forward
        state = getattr(fwd, "lora", None)
        if state is None:
            raise LoraError("this CLIP was not loaded from a ksampler-rt export, so a LoRA cannot be applied to it")
        stack = state.stack + ((patch, strength),)
        towers.append(replace(tower, forward=EngineForward(state.target.engine_for(stack),
                                                            LoraState(state.target, stack))))
    return replace(clip, towers=tuple(towers))


def load_lora(model, clip, lora, strength_model: float = 1.0, strength_clip: float = 1.0, *,
              log: Callable[[str], None] | None = print):
    """ComfyUI's ``LoraLoader``: ``(model, clip)`` with the LoRA file ``lora`` (a path or a LoraFile) applied.

    Returns new MODEL / CLIP objects; the inputs keep working unchanged. Chain calls to stack LoRAs.
    ``model`` or ``clip`` may be None (like ``LoraLoaderModelOnly``).
    """
    strength_model = check_strength("strength_model", strength_model)
    strength_clip = check_strength("strength_clip", strength_clip)
    lf = lora if isinstance(lora, LoraFile) else load_lora_file(lora)
    ctx = None
    if model is not None and getattr(model, "lora", None) is not None:
        ctx = model.lora.target.context
    elif clip is not None and clip.towers and getattr(clip.towers[0].forward, "lora", None) is not None:
        ctx = clip.towers[0].forward.lora.target.context
    if ctx is None:
        raise LoraError("LoraLoader: the MODEL / CLIP were not loaded from a ksampler-rt export (CheckpointLoader"
                        "Simple), so a LoRA cannot be applied to them")
    patch = ctx.patch(lf, log)
    new_model = model if model is None or strength_model == 0 else _model_with(model, patch, strength_model)
    new_clip = clip if clip is None or strength_clip == 0 else _clip_with(clip, patch, strength_clip)
    return new_model, new_clip


def attach(checkpoint_model, towers: Sequence, engines, manifest: dict, export_dir, family: str) -> LoraContext:
    """Called by ``load_checkpoint``: give the base MODEL and the CLIP towers their LoRA state."""
    ctx = LoraContext(engines, manifest, export_dir, family)
    for t in ctx.targets.values():
        t.context = ctx
    if "unet" in ctx.targets:
        checkpoint_model.lora = LoraState(ctx.targets["unet"])
    for tower in towers:
        if isinstance(tower.forward, EngineForward) and tower.name in ctx.targets:
            tower.forward.lora = LoraState(ctx.targets[tower.name])
    return ctx
