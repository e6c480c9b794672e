"""OpenVINO on the CPU (``openvino-cpu``): the export's graph compiled by OpenVINO's CPU plugin.

``openvino`` is an optional dependency (``pip install 'ksampler-rt[openvino]'``). The cached artefact
(``ksampler-rt build --backend openvino-cpu``) is the export converted once to OpenVINO IR
(``model.xml`` + ``model.bin``, fp32 weights kept as they are: ``compress_to_fp16=False``); reading the IR
is faster than parsing the ONNX file and its weights are memory-mapped.

OpenVINO compiles best for static shapes, so the engine keeps the model as read (dynamic dims) and
compiles one static copy per *input-shape signature* (batch / resolution / token count), lazily on the
first call with that signature, in a small LRU (``max_compiled``: default 2, or
``$KSAMPLER_RT_OV_MAX_COMPILED``; each compiled model holds its own repacked weights, so the bound is a
memory bound too). Each compiled model has one reused
``InferRequest``. Compile settings: ``INFERENCE_NUM_THREADS`` (the same default as ONNX Runtime CPU:
``$KSAMPLER_RT_ORT_THREADS`` or the usable cores), ``PERFORMANCE_HINT=LATENCY``, no CPU pinning and
``INFERENCE_PRECISION_HINT`` set from the engine's precision (``ksampler-rt build --precision``, see
``ksampler_rt.engines.precision``): ``f32`` by default -- an fp32 export computes in fp32 (OpenVINO would
otherwise pick bf16 on CPUs with AMX / AVX-512 BF16) -- ``bf16`` / ``f16`` when asked for, and ``f32`` for
``int8`` (NNCF int8 weight compression at build time, activations in fp32). The compiled model's precision
is checked after compiling: a CPU that cannot run the hint is an error, never a silent fallback.

OpenVINO's own model cache (``CACHE_DIR``) is off by default (measured on the development box, a 220M-
parameter UNet: a cache hit compiles in about half the time, but the first compile is slower, each
signature costs a model-sized blob on disk and the process holds ~40 % more memory); set
``$KSAMPLER_RT_OV_MODEL_CACHE=1`` (``<engine cache>/openvino``) or a directory to turn it on.
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .base import Engine, check_io_matches
from .ort import default_cpu_threads, export_onnx_path
from .spec import EngineError, TensorSpec

INSTALL = "pip install 'ksampler-rt[openvino]'"
MODEL_CACHE_ENV = "KSAMPLER_RT_OV_MODEL_CACHE"
MAX_COMPILED_ENV = "KSAMPLER_RT_OV_MAX_COMPILED"

#: ``--precision`` -> OpenVINO's INFERENCE_PRECISION_HINT (int8 = int8-compressed weights, fp32 activations)
INFERENCE_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
#: The artefact's record of the precision it was built in (written by the openvino-cpu builder).
PRECISION_FILE = "precision.json"


def default_max_compiled() -> int:
    """Compiled shape signatures kept per engine: ``$KSAMPLER_RT_OV_MAX_COMPILED``, else 2. Each holds its own
    repacked copy of the weights (an fp32 SD1.5 UNet: ~3.4 GB), so this bounds memory; a sampling run uses
    one signature per model, a second covers e.g. a batch change without recompiling back and forth."""
    env = os.environ.get(MAX_COMPILED_ENV, "").strip()
    if not env:
        return 2
    try:
        value = int(env)
    except ValueError:
        raise EngineError(f"${MAX_COMPILED_ENV}: received {env!r}, expected a positive integer") from None
    if value < 1:
        raise EngineError(f"${MAX_COMPILED_ENV}: received {value}, expected a positive integer")
    return value


def import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise EngineError(f"the openvino-cpu backend needs OpenVINO: openvino is not installed ({INSTALL})") \
            from exc
    except Exception as exc:  # noqa: BLE001 -- a broken install (missing shared library, ...)
        raise EngineError(f"the openvino-cpu backend needs OpenVINO: openvino does not load "
                          f"({type(exc).__name__}: {exc}); reinstall it ({INSTALL})") from exc
    return openvino


def openvino_unavailable_reason() -> str | None:
    """None when OpenVINO imports and its Core lists a CPU device, else why not (for ``available_backends``)."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return f"openvino is not installed ({INSTALL})"
    return _probe_cpu_device()


@functools.lru_cache(maxsize=1)
def _probe_cpu_device() -> str | None:
    # cached: importing openvino and creating a Core costs ~0.3 s and ~70 MB the first time, and
    # available_backends() runs for every backend pick and every /system_stats
    try:
        import openvino

        devices = openvino.Core().available_devices
    except Exception as exc:  # noqa: BLE001 -- a broken install is "not available", said why
        return f"openvino does not load ({type(exc).__name__}: {exc})"
    if "CPU" not in devices:
        return f"openvino lists no CPU device (devices: {devices})"
    return None


def model_cache_dir(engine_cache_root) -> str | None:
    """Where OpenVINO's compiled-blob cache goes: ``$KSAMPLER_RT_OV_MODEL_CACHE`` = 1 -> under the engine
    cache root, a path -> that path, unset / 0 -> no cache."""
    v = os.environ.get(MODEL_CACHE_ENV, "").strip()
    if not v or v.lower() in ("0", "false", "no", "off"):
        return None
    if v.lower() in ("1", "true", "yes", "on"):
        return str(Path(engine_cache_root) / "openvino") if engine_cache_root else None
    return str(Path(v).expanduser())


def _dtype_name(element_type) -> str:
    return np.dtype(element_type.to_dtype()).name


def _port_name(port, wanted: set[str]) -> str:
    names = port.get_names()
    for n in sorted(names):
        if n in wanted:
            return n
    return port.get_any_name()


def model_specs(model, inputs, outputs) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The OpenVINO model's IO as TensorSpecs (names chosen among a port's names to match the export's)."""
    def conv(ports, expected):
        wanted = {s.name for s in expected}
        out = []
        for p in ports:
            ps = p.get_partial_shape()
            shape = tuple(d.get_length() if d.is_static else None for d in ps) if ps.rank.is_static else ()
            out.append(TensorSpec(_port_name(p, wanted), _dtype_name(p.get_element_type()), shape))
        return out

    return conv(model.inputs, inputs), conv(model.outputs, outputs)


def override_constants(model, overrides: dict[str, np.ndarray], where: str) -> list[str]:
    """Replace the Constant nodes named like ONNX initializers by ``overrides`` ({name: array}) in ``model``
    (before compiling, so every compile-time transformation sees the new values). OpenVINO's ONNX frontend
    keeps an initializer's name on its Constant's output, and ``save_model`` keeps it in the IR. Returns the
    names not found (nothing is replaced then)."""
    from openvino import op

    consts = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Constant":
            for n in node.output(0).get_names():
                if n in consts and n in overrides:
                    raise EngineError(f"{where}: weight {n!r} names two constants; cannot override it")
                consts[n] = node
    missing = sorted(set(overrides) - set(consts))
    if missing:
        return missing
    for name, value in overrides.items():
        old = consts[name]
        dtype = old.get_element_type().to_dtype()
        arr = np.ascontiguousarray(value, dtype=dtype)
        shape = tuple(old.get_output_shape(0))
        if arr.shape != shape:
            raise EngineError(f"{where}: weight {name!r} has shape {shape}, the override has {arr.shape}")
        others = old.output(0).get_names() - {name}
        if others - set(overrides):
            raise EngineError(f"{where}: weight {name!r} shares its constant with {sorted(others)[:4]}; "
                              f"cannot override it alone")
        new = op.Constant(arr)
        new.set_friendly_name(old.get_friendly_name())
        old.output(0).replace(new.output(0))  # moves the consumers and the tensor names
    return []


class _Compiled:
    __slots__ = ("compiled", "request", "names", "seconds")


class OpenVinoCpuEngine(Engine):
    """OpenVINO's CPU plugin. ``path``: the cached IR (``model.xml``) or an ONNX file.

    ``overrides`` ({ONNX initializer name: array}, e.g. LoRA-merged weights) replace those constants in the
    model read from ``path`` (or, when ``path`` lacks one of the names, from the export's own ONNX file)
    before anything is compiled; see :meth:`with_weights`.
    """

    backend = "openvino-cpu"

    def __init__(self, model, inputs, outputs, profiles=None, *, path, threads: int | None = None,
                 max_compiled: int | None = None, model_cache: str | None = None,
                 overrides: dict | None = None, precision: str = "fp32", **kw):
        super().__init__(model, inputs, outputs, profiles, source=str(path), **kw)
        if precision not in INFERENCE_HINTS:
            raise EngineError(f"{model} precision: received {precision!r}, expected one of "
                              f"{', '.join(INFERENCE_HINTS)} (openvino-cpu)")
        self.path = Path(path)
        self.precision = precision
        self.threads = threads
        self.max_compiled = max(1, int(max_compiled if max_compiled is not None else default_max_compiled()))
        self.model_cache = model_cache
        self.overrides = dict(overrides or {})
        self.core = None
        self.ov_model = None  # as read: dynamic dims, reshaped per signature on a clone
        self._compiled: "OrderedDict[tuple, _Compiled]" = OrderedDict()
        self._in_ports: dict[str, int] = {}
        self._out_names: list[str] = []
        self.compiles = 0  # how many static compiles ran (tests / benchmarks)

    # --- lifecycle ------------------------------------------------------------------------------
    def config(self) -> dict:
        # ENABLE_CPU_PINNING off: OpenVINO pins its threads to the first cores it is given, so two processes
        # (Ray replicas with $KSAMPLER_RT_ORT_THREADS each, or a shared box) would pile onto the same cores;
        # measured on the shared development box, unpinned was faster too (tiny UNet: 106 vs 142 ms median).
        cfg = {"INFERENCE_NUM_THREADS": int(self.threads or default_cpu_threads()),
               "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": INFERENCE_HINTS[self.precision],
               "ENABLE_CPU_PINNING": False}
        if self.model_cache:
            cfg["CACHE_DIR"] = str(self.model_cache)
        return cfg

    def _read(self, path: Path):
        try:
            return self.core.read_model(str(path))
        except Exception as exc:
            raise EngineError(f"{self.model}: OpenVINO could not read {path}: {exc}") from exc

    def _load(self):
        ov = import_openvino()
        self.core = ov.Core()
        read_from = self.path
        model = self._read(read_from)
        if self.overrides:
            missing = override_constants(model, self.overrides, str(self.path))
            if missing and self.export_dir:
                raw = export_onnx_path(self.export_dir, self.model)
                if raw.resolve() != self.path.resolve():
                    read_from = raw
                    model = self._read(raw)
                    missing = override_constants(model, self.overrides, str(raw))
            if missing:
                raise EngineError(f"{self.model}: {self.path.name} has no weight(s) {missing[:8]}")
        ins, outs = model_specs(model, self.inputs, self.outputs)
        check_io_matches(self.model, self.inputs, ins, "inputs", str(read_from))
        check_io_matches(self.model, self.outputs, outs, "outputs", str(read_from))
        self._in_ports = {s.name: i for i, s in enumerate(ins)}
        self._out_names = [s.name for s in outs]
        self.ov_model = model

    def _release(self):
        self._compiled.clear()  # drops requests and compiled models (their weights)
        self.ov_model = None
        self.core = None

    @property
    def signatures(self) -> list[tuple]:
        """The input-shape signatures currently compiled, least recently used first."""
        return list(self._compiled)

    def with_weights(self, overrides: dict[str, np.ndarray]) -> "OpenVinoCpuEngine":
        """A new engine running the same model with ``overrides`` ({ONNX initializer name: array}) in place
        of those weights. This engine (and the cached IR) is untouched and stays usable; nothing is written
        to the engine cache. The new model is read and compiled on first use (or ``load()``)."""
        if not overrides:
            return self
        if self.precision == "int8":
            # the int8 IR's weights are compressed constants: overriding them would mean running the raw fp32
            # export instead, a silent change of precision
            raise EngineError(f"{self.model}: received weight overrides (e.g. a LoRA) for an int8 openvino-cpu "
                              f"engine, expected an fp32 / bf16 / fp16 engine (build with --precision bf16)")
        eng = OpenVinoCpuEngine(self.model, self.inputs, self.outputs, self.profiles, path=self.path,
                                threads=self.threads, max_compiled=self.max_compiled, model_cache=None,
                                overrides=overrides, precision=self.precision, request=self.request,
                                export_dir=self.export_dir)
        eng.source = f"{self.path} (+{len(overrides)} overridden weights)"
        return eng

    # --- running --------------------------------------------------------------------------------
    def _compile(self, key: tuple) -> _Compiled:
        import time

        t0 = time.perf_counter()
        model = self.ov_model.clone()
        shapes = {self._in_ports[name]: list(shape) for name, shape in key}
        try:
            model.reshape(shapes)
            compiled = self.core.compile_model(model, "CPU", self.config())
        except Exception as exc:
            sig = ", ".join(f"{n} {tuple(s)}" for n, s in key)
            raise EngineError(f"{self.model}: OpenVINO could not compile for the input shapes {sig}: {exc}") \
                from exc
        prec = compiled.get_property("INFERENCE_PRECISION_HINT")
        want = INFERENCE_HINTS[self.precision]
        # get_type_name(): "f32" / "bf16" / "f16" (to_dtype() maps bf16 to float16, so it cannot tell them apart)
        if prec.get_type_name() != want:
            raise EngineError(f"{self.model}: OpenVINO compiled with inference precision {prec}, expected {want} "
                              f"({self.precision}); this CPU does not run it natively")
        c = _Compiled()
        c.compiled = compiled
        c.request = compiled.create_infer_request()
        c.names = self._out_names
        c.seconds = time.perf_counter() - t0
        self.compiles += 1
        return c

    def _get(self, feeds) -> _Compiled:
        key = tuple((n, tuple(feeds[n].shape)) for n in self.input_names)
        c = self._compiled.get(key)
        if c is not None:
            self._compiled.move_to_end(key)
            return c
        # evict before compiling: peak memory stays at max_compiled copies of the weights
        while len(self._compiled) >= self.max_compiled:
            self._compiled.popitem(last=False)
        c = self._compile(key)
        self._compiled[key] = c
        return c

    def _run(self, feeds, profile_index):
        c = self._get(feeds)
        inputs = {self._in_ports[n]: np.ascontiguousarray(a) for n, a in feeds.items()}
        # share_inputs: the request reads the (contiguous, validated) arrays in place during this
        # synchronous call; share_outputs=False: the results are copies owned by the caller.
        res = c.request.infer(inputs, share_inputs=True, share_outputs=False)
        out = {}
        for i, name in enumerate(c.names):
            arr = res[c.compiled.outputs[i]]
            out[name] = arr if arr.flags.owndata or arr.base is None else np.array(arr)
        return out
