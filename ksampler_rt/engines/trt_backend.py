"""Native TensorRT (10.x and 11.x) backend: plan building (loader side) and the runner.

TensorRT and the CUDA bindings are imported lazily; when missing, the error names the extra
(``pip install ksampler-rt[tensorrt]``). No torch at run time: device memory, copies and CUDA graphs go
through ``ksampler_rt.engines.cuda`` (cuda-python, or cupy).

Written against the documented TensorRT 10 and 11 Python APIs. Precision: TensorRT 11 removed the
weak-typing builder flags (``BuilderFlag.FP16`` ...), so on 11 every network is built *strongly typed*
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): each tensor keeps the type the export gave it (an
fp16 UNet with fp32 upcast attention, an fp32 SDXL VAE). On 10 the flag path stays (it can also convert
an fp32 export to fp16), and the layers the export kept in fp32 are pinned to fp32 so that the fp16 flag
cannot run them in half precision. The pure parts (precision gating, network flags, fp32 pinning, refit
bookkeeping, bucket and scratch logic) are unit-tested on the CPU against mocked TensorRT / CUDA objects
(tests/engines/fake_gpu.py); building and running for real need a GPU (tests marked ``tensorrt``).

Threads: the engines of one ``EngineSet`` share one activation scratch (``DeviceScratch``); a call holds
the scratch's lock from its first copy to its sync, so engines are safe to call from any thread (TensorRT
documents concurrent use of one context's device memory as undefined).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import Engine, check_io_matches
from .cache import atomic_write_bytes
from .cuda import CudaRuntime, DeviceScratch, pinned_array, same_values
from .spec import EngineError, ShapeProfile, TensorSpec

INSTALL = "pip install ksampler-rt[tensorrt]"
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
QUANTIZED = ("fp8", "int8")  # built only from an export with Q/DQ nodes (manifest "quantized")
SUPPORTED_MAJORS = (10, 11)  # keep in step with pyproject's [tensorrt] pin (tensorrt>=10,<12)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(f"TensorRT is not installed: {INSTALL} (needs TensorRT >= 10 and an NVIDIA GPU)") from None
    major = trt_major(trt)
    if major < SUPPORTED_MAJORS[0]:
        raise EngineError(f"TensorRT {trt.__version__} is too old: ksampler-rt needs TensorRT >= 10 ({INSTALL})")
    if major > SUPPORTED_MAJORS[-1]:
        raise EngineError(f"tensorrt: received version {trt.__version__}, expected a major version in "
                          f"{', '.join(map(str, SUPPORTED_MAJORS))} ({INSTALL} installs one)")
    return trt


def trt_major(trt) -> int:
    """The major version of the ``tensorrt`` module (``"10.13.0.35"`` -> 10)."""
    return int(str(trt.__version__).split(".")[0])


def uses_strong_typing(major: int, weight_streaming: bool = False) -> bool:
    """Whether a plan is built strongly typed: always on TensorRT >= 11 (the weak-typing precision flags are
    gone), on 10 only for weight streaming (which requires it)."""
    return major >= 11 or weight_streaming


def pin_fp32_layers(network, trt) -> list[str]:
    """On the flag path (TensorRT 10, FP16/BF16 flag set), pin every layer whose outputs the export typed
    float32 (the SDXL VAE kept in fp32, SD2's upcast attention inside an fp16 UNet) to fp32, so that the
    global flag cannot run them in half precision and overflow. Returns the pinned layers' names.

    ``OBEY_PRECISION_CONSTRAINTS`` is set by the caller when anything was pinned. A network whose tensors are
    all fp32 (an fp32 export converted with ``--precision fp16``) is left alone: that conversion is what
    was asked for."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    half = (trt.float16, getattr(trt, "bfloat16", trt.float16))
    typed_half = any(layer.get_output(k).dtype in half for layer in layers for k in range(layer.num_outputs))
    if not typed_half:
        return []
    pinned = []
    for layer in layers:
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if outs and all(t.dtype == trt.float32 for t in outs):
            layer.precision = trt.float32
            for k in range(len(outs)):
                layer.set_output_type(k, trt.float32)
            pinned.append(layer.name)
    return pinned


def _cc(compute_capability) -> tuple[int, int]:
    try:
        major, minor = str(compute_capability).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, AttributeError):
        return (0, 0)


def precision_flags(precision: str, compute_capability, *, strongly_typed: bool = False,
                    quantized_export: bool = False) -> list[str]:
    """``trt.BuilderFlag`` names for ``precision`` on a GPU of ``compute_capability`` (pure logic).

    fp16 on any GPU TensorRT 10 supports; bf16 from Ampere (8.0); fp8 from Ada/Hopper (8.9) and int8
    (6.1+) both only make sense for an export with Q/DQ nodes (``ksampler_rt.export.quantize``), so they are
    refused otherwise, strongly typed or not. A strongly typed network (TensorRT 11, weight streaming) takes
    its precision from the ONNX types -- the Q/DQ nodes for fp8 / int8, as TensorRT's "Explicit Quantization"
    guide recommends ("precision-control build flags are not required"): no flags.
    """
    if precision not in PRECISIONS:
        raise EngineError(f"precision: received {precision!r}, expected one of {', '.join(PRECISIONS)}")
    cc = _cc(compute_capability)
    if precision in QUANTIZED:  # gated whatever the typing: a strongly typed build still needs the GPU and Q/DQ
        need = (8, 9) if precision == "fp8" else (6, 1)
        if cc < need:
            raise EngineError(f"{precision} needs compute capability >= {need[0]}.{need[1]}, this GPU has "
                              f"{compute_capability}; use --precision fp16")
        if not quantized_export:
            raise EngineError(qdq_refusal(precision))
    if strongly_typed:
        return []
    if precision == "fp32":
        return []
    if precision == "fp16":
        if cc < (5, 3):
            raise EngineError(f"fp16 needs compute capability >= 5.3, this GPU has {compute_capability}")
        return ["FP16"]
    if precision == "bf16":
        if cc < (8, 0):
            raise EngineError(f"bf16 needs an Ampere or newer GPU (compute capability >= 8.0), this GPU has "
                              f"{compute_capability}; use --precision fp16")
        return ["BF16"]
    # TensorRT 10's weakly typed path: the FP8 / INT8 flag lets the Q/DQ-wrapped layers run quantized, FP16
    # the layers between them (an fp32 export's other layers would otherwise stay fp32)
    return [precision.upper(), "FP16"]


def qdq_refusal(precision: str) -> str:
    """Why ``precision`` (fp8 / int8) is refused for an export without Q/DQ nodes."""
    return (f"{precision} needs an export with quantize/dequantize (Q/DQ) nodes (calibrated "
            f"offline); this export has none; use --precision fp16")


def profile_shapes(profiles: Sequence[ShapeProfile]) -> list[dict[str, tuple]]:
    """[{input: (min, opt, max)}] per optimisation profile, as ``IOptimizationProfile.set_shape`` takes them."""
    return [{n: (r.min, r.opt, r.max) for n, r in p.ranges.items()} for p in profiles]


def build_plan(onnx_path: Path, profiles: Sequence[ShapeProfile], precision: str, compute_capability, *,
               refit: bool = False, weight_streaming: bool = False, timing_cache: Path | None = None,
               workspace_bytes: int | None = None, optimization_level: int = 3,
               quantized_export: bool = False, log_level: str = "WARNING", log=None) -> bytes:
    """Parse the ONNX file and build a serialized engine (a plan) with one optimisation profile per entry
    of ``profiles``. The timing cache is read before and written back (atomically) after the build.

    TensorRT 11 (or weight streaming): a strongly typed network, precision from the ONNX types (``precision``
    must then be the export's, see ``TensorRT.resolve_precision``). TensorRT 10: the builder flags of
    ``precision``, with the export's fp32 layers pinned (:func:`pin_fp32_layers`)."""
    trt = import_tensorrt()
    strong = uses_strong_typing(trt_major(trt), weight_streaming)
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    net_flags = 0
    if strong:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also resolves external weight files next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    flags = precision_flags(precision, compute_capability, strongly_typed=strong, quantized_export=quantized_export)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if flags and set(flags) & {"FP16", "BF16"}:
        pinned = pin_fp32_layers(network, trt)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            if log:
                log(f"{Path(onnx_path).name}: {len(pinned)} layers kept in fp32 as exported")
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)  # weights can be swapped later (LoRA) without a rebuild
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(optimization_level)
    for shapes in profile_shapes(profiles):
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    blob = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


class _Bucket:
    __slots__ = ("context", "profile", "dev", "host", "shapes", "nbytes", "graph", "exe", "scratch_gen",
                 "out_shapes", "uploaded")


class TensorRTEngine(Engine):
    """Runs a plan with ``execute_async_v3`` on fixed device buffers.

    One execution context per shape bucket (an exact set of input shapes), created without device
    memory and pointed at the pipeline's shared ``DeviceScratch``. Each bucket has device buffers and
    pinned host staging for every IO tensor. A call copies only the inputs that changed since the bucket's
    last call (CFG passes the same text context every step), enqueues (or, with ``cuda_graph=True``,
    replays the graph captured around ``execute_async_v3``), copies the outputs back and synchronizes once,
    all on one stream. More than ``max_buckets`` shapes: the least recently used bucket is freed (its graph
    too) instead of failing.
    """

    backend = "tensorrt"

    def __init__(self, model, inputs, outputs, profiles=None, *, path, scratch: DeviceScratch | None = None,
                 cuda_graph: bool = True, weight_streaming_budget: int | None = None, max_buckets: int = 8, **kw):
        super().__init__(model, inputs, outputs, profiles, source=str(path), **kw)
        self.path = Path(path)
        self.scratch = scratch
        self.cuda_graph = cuda_graph
        self.weight_streaming_budget = weight_streaming_budget
        self.max_buckets = max_buckets
        self._buckets: "OrderedDict[tuple, _Bucket]" = OrderedDict()
        self.engine = self.runtime = self.stream = self.cuda = None
        self.stats = {"h2d_bytes": 0, "h2d_skipped": 0, "graph_captures": 0, "graph_replays": 0,
                      "buckets_evicted": 0, "syncs": 0}
        # Which weights the plan holds now: None = the export's own; else the key of a TensorRTWeightView,
        # whose overridden names are in _weights_names (refit back to base values when another set is needed).
        self._weights_key = None
        self._weights_names: frozenset = frozenset()
        self._base_weights: dict[str, np.ndarray] = {}

    # --- lifecycle --------------------------------------------------------------------------------
    def _load(self):
        trt = import_tensorrt()
        self.trt = trt
        self.cuda = CudaRuntime()
        if self.scratch is None:
            self.scratch = DeviceScratch(self.cuda)
        self.scratch.cuda = self.scratch.cuda or self.cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {self.path} (built by another TensorRT version "
                              f"or corrupt); rebuild it with `ksampler-rt build {self.export_dir or 'EXPORT_DIR'} "
                              f"--backend tensorrt --force`")
        if self.weight_streaming_budget is not None:
            self.engine.weight_streaming_budget_v2 = int(self.weight_streaming_budget)
        ins, outs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name
            spec = TensorSpec(name, dtype, tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(name)))
            (ins if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append(spec)
        check_io_matches(self.model, self.inputs, ins, "inputs", str(self.path))
        # The plan's IO dtypes are what callers must feed (an fp16 build of an fp32 export keeps fp32 IO).
        self.inputs = [next(s for s in ins if s.name == e.name) for e in self.inputs]
        self.outputs = outs
        self._set_validator()
        self._mem_size = int(getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size)
        with self.scratch.lock:
            self.scratch.ensure(self._mem_size)
            self.scratch.users += 1
        self.stream = self.cuda.stream()

    def _release(self):
        with self.scratch.lock if self.scratch is not None else _NULL_LOCK:
            for b in self._buckets.values():
                self._free_bucket(b)
            self._buckets.clear()
            if self.stream:
                self.cuda.stream_destroy(self.stream)
            self.stream = None
            self.engine = self.runtime = None
            if self.scratch is not None:
                self.scratch.users -= 1
                if self.scratch.users <= 0:
                    self.scratch.release()

    def _free_bucket(self, b: _Bucket):
        if b.exe is not None:
            self.cuda.destroy_graph(b.graph, b.exe)
        for p in b.dev.values():
            self.cuda.free(p)
        for p in b.host.values():
            self.cuda.free_host(p)
        b.context = None

    def device_bytes(self) -> dict:
        """Device memory this engine holds: its buckets' IO buffers and the shared scratch (gpu-check)."""
        io = sum(sum(b.nbytes.values()) for b in self._buckets.values())
        return {"io_buffers": io, "buckets": len(self._buckets),
                "scratch": self.scratch.size if self.scratch is not None else 0}

    # --- buckets ----------------------------------------------------------------------------------
    def _new_context(self):
        trt = self.trt
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:
            return self.engine.create_execution_context(strategy.USER_MANAGED)
        return self.engine.create_execution_context_without_device_memory()

    def _bind_scratch(self, ctx):
        try:
            ctx.set_device_memory(self.scratch.ptr, self.scratch.size)  # TensorRT >= 10.1
        except TypeError:
            ctx.device_memory = self.scratch.ptr

    def _bucket(self, feeds, profile_index) -> _Bucket:
        key = tuple(feeds[n].shape for n in self.input_names)
        b = self._buckets.get(key)
        if b is not None:
            self._buckets.move_to_end(key)
            return b
        while len(self._buckets) >= self.max_buckets:  # free the least recently used shape, do not fail
            _, old = self._buckets.popitem(last=False)
            self._free_bucket(old)
            self.stats["buckets_evicted"] += 1
        b = _Bucket()
        b.profile = profile_index or 0
        b.context = self._new_context()
        self._bind_scratch(b.context)
        b.scratch_gen = self.scratch.generation
        b.context.set_optimization_profile_async(b.profile, self.stream)
        b.shapes, b.dev, b.host, b.nbytes, b.out_shapes, b.uploaded = {}, {}, {}, {}, {}, {}
        for n in self.input_names:
            b.context.set_input_shape(n, tuple(feeds[n].shape))
            b.shapes[n] = tuple(feeds[n].shape)
        for s in self.outputs:
            shape = tuple(b.context.get_tensor_shape(s.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.model}: TensorRT could not infer the shape of output {s.name!r}")
            b.shapes[s.name] = shape
            b.out_shapes[s.name] = shape
        for s in self.inputs + self.outputs:
            nbytes = int(np.prod(b.shapes[s.name])) * np.dtype(s.dtype).itemsize
            b.nbytes[s.name] = nbytes
            b.dev[s.name] = self.cuda.malloc(nbytes)
            b.host[s.name] = self.cuda.malloc_host(nbytes)
            b.context.set_tensor_address(s.name, b.dev[s.name])
        b.graph = b.exe = None
        self._buckets[key] = b
        return b

    def _upload(self, b: _Bucket, feeds) -> None:
        """Stage and copy the inputs that differ from what the bucket's device buffers hold (pinned memory,
        asynchronous on the engine's stream). The comparison is against the pinned staging copy of the last
        upload, so an array changed in place is still uploaded."""
        for n in self.input_names:
            staged = pinned_array(b.host[n], b.shapes[n], feeds[n].dtype)
            if b.uploaded.get(n) and same_values(staged, feeds[n]):
                self.stats["h2d_skipped"] += 1
                continue
            np.copyto(staged, feeds[n])
            self.cuda.htod(b.dev[n], b.host[n], b.nbytes[n], self.stream)
            self.stats["h2d_bytes"] += b.nbytes[n]
            b.uploaded[n] = True

    def _execute(self, b: _Bucket):
        if not b.context.execute_async_v3(self.stream):
            raise EngineError(f"{self.model}: TensorRT execute_async_v3 failed")

    def _run(self, feeds, profile_index):
        if self._weights_key is not None:  # a LoRA view refitted the plan: back to the export's weights
            self._apply_weights(None, {})
        return self._run_bucket(feeds, profile_index)

    def _run_bucket(self, feeds, profile_index):
        # The scratch lock serializes every engine sharing the activation memory, whichever thread calls.
        with self.scratch.lock:
            b = self._bucket(feeds, profile_index)
            if b.scratch_gen != self.scratch.generation:  # another engine grew the shared scratch: rebind
                self._bind_scratch(b.context)
                b.scratch_gen = self.scratch.generation
                if b.exe is not None:
                    self.cuda.destroy_graph(b.graph, b.exe)
                    b.graph = b.exe = None
            self._upload(b, feeds)
            if not self.cuda_graph:
                self._execute(b)
            elif b.exe is not None:
                self.cuda.launch(b.exe, self.stream)
                self.stats["graph_replays"] += 1
            else:
                # First run outside capture (TensorRT finishes its lazy setup), then capture the enqueue
                # alone: copies stay outside the graph, so unchanged inputs can be skipped on replay.
                self._execute(b)
                self.cuda.begin_capture(self.stream)
                try:
                    self._execute(b)
                finally:
                    b.graph, b.exe = self.cuda.end_capture(self.stream)
                self.stats["graph_captures"] += 1
            for s in self.outputs:
                self.cuda.dtoh(b.host[s.name], b.dev[s.name], b.nbytes[s.name], self.stream)
            self.cuda.sync(self.stream)  # the one sync of the call
            self.stats["syncs"] += 1
            return {s.name: pinned_array(b.host[s.name], b.out_shapes[s.name], s.dtype).copy()
                    for s in self.outputs}

    # --- refit (LoRA) -----------------------------------------------------------------------------
    def with_weights(self, overrides: dict[str, np.ndarray]) -> "Engine":
        """A view of this plan with ``overrides`` ({ONNX initializer name: array}): calling it refits the plan
        with only the weights that differ from what it holds now (nothing is rebuilt); calling this engine
        again refits the overridden names back to the export's values. The plan must be built with
        ``ksampler-rt build --backend tensorrt --refit``."""
        if not overrides:
            return self
        return TensorRTWeightView(self, overrides)

    def _export_weights(self, names) -> dict[str, np.ndarray]:
        missing = [n for n in names if n not in self._base_weights]
        if missing:
            import onnx
            from onnx import numpy_helper

            from .ort import export_onnx_path

            path = export_onnx_path(self.export_dir, self.model)
            model = onnx.load(str(path), load_external_data=False)
            want = set(missing)
            for t in model.graph.initializer:
                if t.name in want:
                    self._base_weights[t.name] = numpy_helper.to_array(t, base_dir=str(path.parent))
        return {n: self._base_weights[n] for n in names if n in self._base_weights}

    def _apply_weights(self, key, overrides: dict[str, np.ndarray]) -> None:
        """Refit so that the plan holds the export's weights with ``overrides`` on top (only changed names)."""
        if key == self._weights_key:
            return
        if not getattr(self.engine, "refittable", False):
            raise EngineError(f"{self.model}: this TensorRT plan was built without refit support, so its weights "
                              f"cannot be swapped (LoRA); rebuild it once with `ksampler-rt build "
                              f"{self.export_dir or 'EXPORT_DIR'} --backend tensorrt --refit --force`")
        restore = sorted(self._weights_names - set(overrides))
        weights = dict(self._export_weights(restore))
        weights.update(overrides)
        self._weights_key = None  # unknown state if the refit fails half-way
        self.refit(weights)
        self._weights_key = key
        self._weights_names = frozenset(overrides)

    def refit(self, weights: dict[str, np.ndarray], max_rounds: int = 4) -> None:
        """Swap named weights in a plan built with ``refit=True`` (e.g. a LoRA merged on the host).

        Names are the ONNX initializer names, which the ONNX parser keeps for the plan's refittable weights
        (``Refitter.get_all_weights()``); a name the plan does not list is an error naming the nearest ones
        (a weight that reaches a layer only through a Transpose / Cast is folded by the parser and may not keep
        its name: such LoRA targets cannot be refitted by name). TensorRT requires every weight it combined
        with a changed one (e.g. conv weight + bias, fused GEMMs): ``get_missing_weights()`` is asked after
        each round and supplied with the export's values until it is empty; otherwise a clear error, never a
        silent ``refit_cuda_engine() == False``."""
        self.load()
        trt = self.trt
        refitter = trt.Refitter(self.engine, self._logger)
        known = set(refitter.get_all_weights())
        unknown = sorted(n for n in weights if n not in known)
        if unknown:
            raise EngineError(f"{self.model} refit weights: received {unknown[:8]}, expected names the plan can "
                              f"refit ({len(known)} listed by Refitter.get_all_weights(), e.g. "
                              f"{sorted(known)[:4]}); a weight folded through a Transpose/Cast by the ONNX parser "
                              f"loses its name; rebuild with --refit from the same export")
        keep = []

        def supply(name, arr):
            arr = np.ascontiguousarray(arr)
            keep.append(arr)  # TensorRT reads the host memory during refit_cuda_engine
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise EngineError(f"{self.model}: TensorRT refused weight {name!r} (shape {arr.shape}, "
                                  f"dtype {arr.dtype}); was the plan built with --refit from this export?")

        for name, arr in weights.items():
            supply(name, arr)
        given = set(weights)
        for _ in range(max_rounds):
            missing = [n for n in refitter.get_missing_weights() if n not in given]
            if not missing:
                break
            base = self._export_weights(missing)
            absent = sorted(set(missing) - set(base))
            if absent:
                raise EngineError(f"{self.model}: refit needs weights {absent[:8]} that the export's ONNX does not "
                                  f"hold by that name; rebuild the plan without --refit and export again")
            for name, arr in base.items():
                supply(name, arr)
            given |= set(base)
        still = list(refitter.get_missing_weights())
        if still:
            raise EngineError(f"{self.model}: refit still misses weights {still[:8]} after {max_rounds} rounds")
        with self.scratch.lock if self.scratch is not None else _NULL_LOCK:
            if not refitter.refit_cuda_engine():
                raise EngineError(f"{self.model}: TensorRT refit_cuda_engine() failed (all weights were supplied; "
                                  f"see the TensorRT log above)")
            for b in self._buckets.values():  # be conservative: recapture after a refit
                if b.exe is not None:
                    self.cuda.destroy_graph(b.graph, b.exe)
                    b.graph = b.exe = None


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_LOCK = _NullLock()


_VIEW_IDS = itertools.count(1)


class TensorRTWeightView(Engine):
    """The plan of a :class:`TensorRTEngine` with some weights overridden (see ``with_weights``).

    Shares the base engine's plan, contexts and buffers: a call takes the base engine's lock, refits the
    plan to this view's weights if it holds others (only the names that differ), and runs.
    """

    backend = "tensorrt"

    def __init__(self, base: TensorRTEngine, overrides: dict[str, np.ndarray]):
        super().__init__(base.model, base.inputs, base.outputs, base.profiles, request=base.request,
                         export_dir=base.export_dir, source=f"{base.source} (refit view)")
        self.base = base
        self.overrides = {n: np.ascontiguousarray(a) for n, a in overrides.items()}
        self._lock = base._lock
        self._key = ("view", next(_VIEW_IDS))

    def _load(self):
        self.base.load()
        self.inputs, self.outputs = self.base.inputs, self.base.outputs
        self._set_validator()

    def _release(self):
        pass  # the base engine owns the plan and the buffers

    def _run(self, feeds, profile_index):
        self.base.load()
        self.base._apply_weights(self._key, self.overrides)
        return self.base._run_bucket(feeds, profile_index)
