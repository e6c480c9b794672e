"""Tensor specs, shape profiles and the validation every engine does before it runs.

A ``TensorSpec`` is what the ONNX graph declares (a dim is an int, or ``None`` / a name when it is
dynamic). A ``ShapeProfile`` is what a built engine accepts: for each input a (min, opt, max) shape,
the same thing TensorRT calls an optimisation profile. Backends that accept any shape the graph
allows (ONNX Runtime without ``--shapes``) have no profile and are validated against the specs only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np


# ONNX TensorProto element types and ORT's type strings -> numpy dtype names.
_ONNX_ELEM = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
              10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16"}
_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16",
            "double": "float64", "long": "int64", "int": "int32", "bf16": "bfloat16"}


class EngineError(ValueError):
    """An error meant for the user (the CLI prints it as one line, exit code 2)."""


class SpecError(EngineError):
    """Inputs that do not match what the engine accepts."""


def normalize_dtype(dtype) -> str:
    """'tensor(float)', 1, 'fp16', np.float32 ... -> numpy dtype name ('float32')."""
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        try:
            return _ONNX_ELEM[int(dtype)]
        except KeyError:
            raise EngineError(f"dtype: received ONNX element type {dtype}, expected one of "
                              f"{sorted(_ONNX_ELEM)} ({', '.join(sorted(set(_ONNX_ELEM.values())))})") from None
    if isinstance(dtype, str):
        s = dtype.strip().lower()
        if s in _ORT_TYPES:
            return _ORT_TYPES[s]
        s = _ALIASES.get(s, s)
        if s == "bfloat16":
            return s
        return np.dtype(s).name
    return np.dtype(dtype).name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints, or None / str for dynamic dims

    def __post_init__(self):
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        dims = []
        for d in self.shape:
            if isinstance(d, (int, np.integer)) and int(d) > 0:
                dims.append(int(d))
            elif isinstance(d, str) and d.strip():
                dims.append(d.strip())
            else:  # None, 0, -1, "" all mean "dynamic, unnamed"
                dims.append(None)
        object.__setattr__(self, "shape", tuple(dims))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def shape_str(self) -> str:
        return "(" + ", ".join(str(d) if d is not None else "?" for d in self.shape) + ")"

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d.get("shape") or ()))


@dataclass(frozen=True)
class ShapeRange:
    min: tuple
    opt: tuple
    max: tuple

    def __post_init__(self):
        for attr in ("min", "opt", "max"):
            object.__setattr__(self, attr, tuple(int(v) for v in getattr(self, attr)))
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise EngineError(f"shape range: received min={self.min} opt={self.opt} max={self.max}, expected "
                              f"three shapes of the same rank")
        for lo, o, hi in zip(self.min, self.opt, self.max):
            if not (1 <= lo <= o <= hi):
                raise EngineError(f"shape range: received min={self.min} opt={self.opt} max={self.max}, expected "
                                  f"1 <= min <= opt <= max in every dim")

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max))

    def describe(self) -> str:
        return "(" + ", ".join(str(lo) if lo == hi else f"{lo}..{hi}"
                               for lo, hi in zip(self.min, self.max)) + ")"

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class ShapeProfile:
    """Per-input (min, opt, max) shapes plus a human label ('512x512 static')."""

    ranges: Mapping[str, ShapeRange]
    label: str = ""

    def __getitem__(self, name: str) -> ShapeRange:
        return self.ranges[name]

    def __contains__(self, name: str) -> bool:
        return name in self.ranges

    @property
    def is_static(self) -> bool:
        return all(r.is_static for r in self.ranges.values())

    def canonical(self) -> str:
        """Stable text used in cache keys."""
        return ";".join(f"{n}:{'x'.join(map(str, r.min))}/{'x'.join(map(str, r.opt))}/"
                        f"{'x'.join(map(str, r.max))}" for n, r in sorted(self.ranges.items()))

    def to_json(self) -> dict:
        return {"label": self.label, "inputs": {n: r.to_json() for n, r in self.ranges.items()}}

    @classmethod
    def from_json(cls, d: Mapping | None) -> "ShapeProfile | None":
        if not d:
            return None
        return cls({n: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
                    for n, r in d["inputs"].items()}, d.get("label", ""))


# --- parsing the CLI's --shapes / --batch ------------------------------------------------------------

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+)\s*$")


def parse_shapes(text: str | Iterable | None) -> list[tuple[int, int]]:
    """'512x512,768x1024' -> [(512, 512), (768, 1024)] as (width, height), as ComfyUI writes them."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if isinstance(item, (tuple, list)):
            w, h = int(item[0]), int(item[1])
        else:
            if not str(item).strip():
                continue
            m = _SHAPE_RE.match(str(item))
            if not m:
                raise EngineError(f"shapes: received {item!r}, expected WIDTHxHEIGHT, e.g. 512x512")
            w, h = int(m.group(1)), int(m.group(2))
        if w <= 0 or h <= 0:
            raise EngineError(f"shapes: received {w}x{h}, expected a positive width and height")
        out.append((w, h))
    return out


def parse_range(text: str | int | Sequence[int] | None, what: str = "batch") -> tuple[int, int] | None:
    """'1-4' -> (1, 4); '2' -> (2, 2)."""
    if text is None:
        return None
    if isinstance(text, (int, np.integer)):
        return int(text), int(text)
    if isinstance(text, (tuple, list)):
        lo, hi = int(text[0]), int(text[-1])
    else:
        m = re.match(r"^\s*(\d+)\s*(?:(?:-|\.\.)\s*(\d+))?\s*$", str(text))
        if not m:
            raise EngineError(f"{what}: received {text!r}, expected N or MIN-MAX, e.g. 1-4")
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
    if not 1 <= lo <= hi:
        raise EngineError(f"{what}: received {lo}-{hi}, expected MIN-MAX with 1 <= MIN <= MAX")
    return lo, hi


# --- validation ----------------------------------------------------------------------------------------

def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + (",)" if len(shape) == 1 else ")")


class Validator:
    """Checks a feed dict against specs (names, dtypes, ranks, static dims) and the profiles' ranges.

    An engine may carry several profiles (one per shape bucket); a feed is accepted when one profile
    holds every input, and ``__call__`` returns the feeds with that profile's index (None without
    profiles). ``hint(spec, shape)`` turns an offending shape into the build command that would
    accept it; it returns None when it has no advice.
    """

    def __init__(self, model: str, inputs: Sequence[TensorSpec],
                 profiles: Sequence[ShapeProfile] | None = None, hint=None):
        self.model = model
        self.inputs = list(inputs)
        self.profiles = list(profiles or [])
        self.hint = hint
        self._by_name = {s.name: s for s in self.inputs}

    def accepted(self, spec: TensorSpec) -> str:
        parts = []
        for p in self.profiles:
            if spec.name in p:
                parts.append(p[spec.name].describe() + (f" ({p.label})" if p.label else ""))
        if parts:
            return "this engine's profile accepts " + " or ".join(parts)
        return f"this engine accepts {spec.shape_str()} (? = any size)"

    def _reject(self, spec: TensorSpec, shape: tuple) -> SpecError:
        msg = f"{self.model} input {spec.name!r}: received shape {_fmt_shape(shape)}, {self.accepted(spec)}"
        advice = self.hint(spec, shape) if callable(self.hint) and len(shape) == spec.rank else None
        return SpecError(msg + (f"; {advice}" if advice else ""))

    def __call__(self, feeds: Mapping[str, object]) -> tuple[dict[str, np.ndarray], int | None]:
        names = ", ".join(self._by_name)
        unknown = [k for k in feeds if k not in self._by_name]
        if unknown:
            raise SpecError(f"{self.model}: unexpected input {unknown[0]!r} (this engine takes {names})")
        missing = [k for k in self._by_name if k not in feeds]
        if missing:
            raise SpecError(f"{self.model}: missing input {missing[0]!r} (this engine takes {names})")
        out: dict[str, np.ndarray] = {}
        shapes: dict[str, tuple] = {}
        bound: dict[str, tuple[int, str]] = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            if not isinstance(value, np.ndarray):
                raise SpecError(f"{self.model} input {spec.name!r}: received {type(value).__name__}, "
                                f"expected a numpy array of dtype {spec.dtype} and shape {spec.shape_str()}")
            if value.dtype.name != spec.dtype:
                raise SpecError(f"{self.model} input {spec.name!r}: received dtype {value.dtype.name}, "
                                f"this engine expects {spec.dtype}")
            shape = tuple(int(s) for s in value.shape)
            ok = len(shape) == spec.rank and 0 not in shape and all(
                d is None or isinstance(d, str) or d == s for d, s in zip(spec.shape, shape))
            if ok and self.profiles:
                ok = any(spec.name not in p or p[spec.name].contains(shape) for p in self.profiles)
            if not ok:
                raise self._reject(spec, shape)
            for d, s in zip(spec.shape, shape):  # the same named dim must agree across inputs
                if isinstance(d, str):
                    if d in bound and bound[d][0] != s:
                        raise SpecError(
                            f"{self.model} input {spec.name!r}: dim {d!r} is {s} but input "
                            f"{bound[d][1]!r} has {d}={bound[d][0]}; they must be equal")
                    bound.setdefault(d, (s, spec.name))
            out[spec.name] = value
            shapes[spec.name] = shape
        if not self.profiles:
            return out, None
        for i, p in enumerate(self.profiles):
            if all(n not in p or p[n].contains(s) for n, s in shapes.items()):
                return out, i
        # Every input fits some profile, but no single profile fits them all.
        desc = "; ".join(f"{n} {_fmt_shape(s)}" for n, s in shapes.items())
        labels = ", ".join(p.label or f"profile {i}" for i, p in enumerate(self.profiles))
        raise SpecError(f"{self.model}: received {desc}: no single profile of this engine accepts that "
                        f"combination (profiles: {labels})")
