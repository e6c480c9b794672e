"""LoRA files: reading ``.safetensors`` without torch and grouping the keys into low-rank modules.

The layouts and the merge rule are described in :mod:`.lora` and docs/lora.md.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

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

    def delta(self, weight_shape: Sequence[int], rows: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
        """scale * (up @ down) reshaped to ``weight_shape`` (float32); ValueError when it does not fit.
        ``rows``: only these row ranges of the product, concatenated (a fused LoRA layer patching one of the
        separate layers it stands for, see :mod:`.flow_lora`)."""
        down = self.down if self.mid is None else self._tucker_down()
        up2 = self.up.reshape(self.up.shape[0], -1)
        down2 = down.reshape(down.shape[0], -1)
        if up2.shape[1] != down2.shape[0]:
            raise ValueError(f"lora_up {list(self.up.shape)} and lora_down {list(self.down.shape)} have "
                             f"different ranks")
        if rows is not None:  # rows of up @ down = those rows of up, times down
            up2 = np.concatenate([up2[a:b] for a, b in rows])
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


def _pattern_value(patterns: dict, module: str):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name it ends (whole
    dotted components), as peft.utils.other.get_pattern_key."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def apply_adapter_metadata(modules: dict[str, LoraModule], meta: dict) -> None:
    """The scale of diffusers-saved PEFT LoRAs: ``save_lora_weights`` keeps each component's LoraConfig in
    the safetensors metadata (``lora_adapter_metadata`` = JSON {"transformer.r": 4, "transformer.lora_alpha": 8,
    ...}), and ``load_lora_weights`` scales by lora_alpha / r (/ sqrt(r) with use_rslora). Modules with an
    ``.alpha`` key of their own keep it. ComfyUI 0.3.64 does not read this metadata (scale 1 there); the issue
    names diffusers as the reference."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        packed = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return
    configs: dict[str, dict] = {}
    for k, v in packed.items():
        component, _, name = str(k).partition(".")
        configs.setdefault(component, {})[name] = v
    for stem, m in modules.items():
        component, _, module = stem.partition(".")
        cfg = configs.get(component)
        if m.alpha is not None or cfg is None or "lora_alpha" not in cfg:
            continue
        r = _pattern_value(cfg.get("rank_pattern"), module) or cfg.get("r") or m.rank
        alpha = _pattern_value(cfg.get("alpha_pattern"), module) or cfg["lora_alpha"]
        scale = float(alpha) / (math.sqrt(float(r)) if cfg.get("use_rslora") else float(r))
        m.alpha = scale * m.rank


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
    apply_adapter_metadata(modules, meta)
    lf = LoraFile(path, modules, unknown, meta, key)
    with _FILES_LOCK:
        _FILES[key] = lf
        while len(_FILES) > 8:
            _FILES.popitem(last=False)
    return lf
