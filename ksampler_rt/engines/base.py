"""The ``Engine`` interface the sampler runtime talks to: numpy in, numpy out, backend unknown.

Polygraphy's split: a *loader* (``ksampler_rt.engines.build`` / ``loader``) builds or finds the
artefact; an *engine* (one class per backend) owns the runtime objects and runs. The base class does
everything that does not depend on the backend: specs, validation with actionable messages, the
load/release lifecycle.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from .profiles import ProfileRequest, build_hint
from .spec import EngineError, ShapeProfile, TensorSpec, Validator


class UnknownTensorError(EngineError, KeyError):
    """A tensor name the engine does not have (a ``KeyError`` too, for callers that catch that)."""

    __str__ = EngineError.__str__  # KeyError's would print the message in quotes


class Engine:
    """One model (UNet, CLIP, VAE encoder/decoder) on one backend.

    ``engine(**inputs) -> {output name: array}``. Inputs are validated against ``inputs`` (names, dtypes,
    static dims) and, when the engine has them, its shape ``profiles``; the error says what was received,
    what the engine accepts and the ``ksampler-rt build`` command that would accept it.

    Lifecycle: ``with engine: ...`` loads (session / device buffers) and releases on exit; calling an
    engine that is not loaded loads it first. ``release()`` frees device memory; the object can be loaded
    again later.
    """

    backend: str = "?"

    def __init__(self, model: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 profiles: Sequence[ShapeProfile] | None = None, *, request: ProfileRequest | None = None,
                 export_dir: str | None = None, source: str | None = None):
        self.model = model
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.profiles = list(profiles or [])
        self.request = request
        self.export_dir = export_dir
        self.source = source  # the file this engine runs (cached plan / optimized model / raw ONNX)
        self._lock = threading.RLock()
        self._loaded = False
        self._set_validator()

    def _set_validator(self):
        self._validate = Validator(self.model, self.inputs, self.profiles,
                                   build_hint(self.model, self.inputs, self.request, self.export_dir, self.backend))

    # --- introspection --------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def spec(self, name: str) -> TensorSpec:
        for s in self.inputs + self.outputs:
            if s.name == name:
                return s
        raise UnknownTensorError(f"{self.model} tensor: received {name!r}, expected one of "
                                 f"{', '.join(self.input_names + self.output_names)}")

    def describe(self) -> str:
        ins = ", ".join(f"{s.name} {s.dtype}{s.shape_str()}" for s in self.inputs)
        outs = ", ".join(f"{s.name} {s.dtype}{s.shape_str()}" for s in self.outputs)
        prof = "; ".join(p.label for p in self.profiles) or "any shape"
        return f"{self.model} [{self.backend}] ({ins}) -> ({outs}) profiles: {prof}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model} loaded={self._loaded} source={self.source}>"

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> "Engine":
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True
        return self

    def release(self) -> None:
        with self._lock:
            if self._loaded:
                try:
                    self._release()
                finally:
                    self._loaded = False

    def __enter__(self) -> "Engine":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass

    # --- running --------------------------------------------------------------------------------
    def validate(self, inputs: dict) -> tuple[dict[str, np.ndarray], int | None]:
        return self._validate(inputs)

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        feeds, profile_index = self._validate(inputs)
        with self._lock:
            if not self._loaded:
                self.load()
            return self._run(feeds, profile_index)

    def with_weights(self, overrides: dict[str, np.ndarray]) -> "Engine":
        """An engine running this model with some initializers replaced ({ONNX initializer name: array}),
        without re-exporting or rebuilding anything; ``self`` keeps its own weights. Backends that can do it
        override this (ONNX Runtime: a second session; OpenVINO: the model recompiled with replaced constants;
        TensorRT: a refit view of the same plan)."""
        if not overrides:
            return self
        raise EngineError(f"{self.model}: the {self.backend} backend cannot swap weights")

    # --- for backends ---------------------------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _run(self, feeds: dict[str, np.ndarray], profile_index: int | None) -> dict[str, np.ndarray]:
        raise NotImplementedError


def check_io_matches(model: str, expected: Sequence[TensorSpec], actual: Sequence[TensorSpec],
                     what: str, where: str) -> None:
    """The runtime's view of a graph must agree with the export's (names, dtypes, ranks)."""
    exp = {s.name: s for s in expected}
    act = {s.name: s for s in actual}
    if set(exp) != set(act):
        raise EngineError(f"{model}: {where} has {what} {sorted(act)} but the export declares {sorted(exp)}; "
                          f"the cached engine or the export is stale: rebuild it")
    for n, s in exp.items():
        a = act[n]
        if a.rank != s.rank or a.dtype != s.dtype:
            raise EngineError(f"{model} {what[:-1]} {n!r}: {where} has {a.dtype}{a.shape_str()}, the export "
                              f"declares {s.dtype}{s.shape_str()}; rebuild the engine")
