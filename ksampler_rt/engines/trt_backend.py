"""Native TensorRT (>= 10) backend: plan building (loader side) and the runner.

TensorRT and the CUDA bindings are imported lazily; when missing, the error names the extra
(``pip install ksampler-rt[tensorrt]``). No torch at run time: device memory, copies and CUDA graphs go
through ``ksampler_rt.engines.cuda`` (cuda-python, or cupy).

Written against the documented TensorRT 10 Python API. The pure parts (precision gating, profile
shapes, cache keys) are unit-tested on the CPU; building and running need a GPU and are covered by
tests marked ``tensorrt``.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import Engine, check_io_matches
from .cache import atomic_write_bytes
from .cuda import CudaRuntime, DeviceScratch, pinned_array
from .spec import EngineError, ShapeProfile, TensorSpec

INSTALL = "pip install ksampler-rt[tensorrt]"
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(f"TensorRT is not installed: {INSTALL} (needs TensorRT >= 10 and an NVIDIA GPU)") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old: ksampler-rt needs TensorRT >= 10 ({INSTALL})")
    return trt


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
    (6.1+) both only make sense for an export with Q/DQ nodes, so they are refused otherwise. A strongly
    typed network (required by weight streaming) takes its precision from the ONNX types: no flags.
    """
    if precision not in PRECISIONS:
        raise EngineError(f"precision: received {precision!r}, expected one of {', '.join(PRECISIONS)}")
    cc = _cc(compute_capability)
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
    need = (8, 9) if precision == "fp8" else (6, 1)
    if cc < need:
        raise EngineError(f"{precision} needs compute capability >= {need[0]}.{need[1]}, this GPU has "
                          f"{compute_capability}; use --precision fp16")
    if not quantized_export:
        raise EngineError(f"{precision} needs an export with quantize/dequantize (Q/DQ) nodes (calibrated "
                          f"offline); this export has none; use --precision fp16")
    return [precision.upper(), "FP16"]


def profile_shapes(profiles: Sequence[ShapeProfile]) -> list[dict[str, tuple]]:
    """[{input: (min, opt, max)}] per optimisation profile, as ``IOptimizationProfile.set_shape`` takes them."""
    return [{n: (r.min, r.opt, r.max) for n, r in p.ranges.items()} for p in profiles]


def build_plan(onnx_path: Path, profiles: Sequence[ShapeProfile], precision: str, compute_capability, *,
               refit: bool = False, weight_streaming: bool = False, timing_cache: Path | None = None,
               workspace_bytes: int | None = None, optimization_level: int = 3,
               quantized_export: bool = False, log_level: str = "WARNING") -> bytes:
    """Parse the ONNX file and build a serialized engine (a plan) with one optimisation profile per entry
    of ``profiles``. The timing cache is read before and written back (atomically) after the build."""
    trt = import_tensorrt()
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    net_flags = 0
    if weight_streaming:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also resolves external weight files next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for flag in precision_flags(precision, compute_capability, strongly_typed=weight_streaming,
                                quantized_export=quantized_export):
        config.set_flag(getattr(trt.BuilderFlag, flag))
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
                 "out_shapes")


class TensorRTEngine(Engine):
    """Runs a plan with ``execute_async_v3`` on fixed device buffers.

    One execution context per shape bucket (an exact set of input shapes), created without device
    memory and pointed at the pipeline's shared ``DeviceScratch``. Each bucket has device buffers and
    pinned host staging for every IO tensor; with ``cuda_graph=True`` the H2D copies, the enqueue and the
    D2H copies are captured once per bucket and replayed with one graph launch.
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
        self._buckets: dict[tuple, _Bucket] = {}
        self.engine = self.runtime = self.stream = self.cuda = None
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
        self.scratch.ensure(self._mem_size)
        self.scratch.users += 1
        self.stream = self.cuda.stream()

    def _release(self):
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
            return b
        if len(self._buckets) >= self.max_buckets:
            raise EngineError(f"{self.model}: more than {self.max_buckets} distinct input shapes in use")
        b = _Bucket()
        b.profile = profile_index or 0
        b.context = self._new_context()
        self._bind_scratch(b.context)
        b.scratch_gen = self.scratch.generation
        b.context.set_optimization_profile_async(b.profile, self.stream)
        b.shapes, b.dev, b.host, b.nbytes, b.out_shapes = {}, {}, {}, {}, {}
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

    def _enqueue(self, b: _Bucket):
        for n in self.input_names:
            self.cuda.htod(b.dev[n], b.host[n], b.nbytes[n], self.stream)
        if not b.context.execute_async_v3(self.stream):
            raise EngineError(f"{self.model}: TensorRT execute_async_v3 failed")
        for s in self.outputs:
            self.cuda.dtoh(b.host[s.name], b.dev[s.name], b.nbytes[s.name], self.stream)

    def _run(self, feeds, profile_index):
        if self._weights_key is not None:  # a LoRA view refitted the plan: back to the export's weights
            self._apply_weights(None, {})
        return self._run_bucket(feeds, profile_index)

    def _run_bucket(self, feeds, profile_index):
        b = self._bucket(feeds, profile_index)
        if b.scratch_gen != self.scratch.generation:  # another engine grew the shared scratch: rebind
            self._bind_scratch(b.context)
            b.scratch_gen = self.scratch.generation
            if b.exe is not None:
                self.cuda.destroy_graph(b.graph, b.exe)
                b.graph = b.exe = None
        for n in self.input_names:
            np.copyto(pinned_array(b.host[n], b.shapes[n], feeds[n].dtype), feeds[n])
        if not self.cuda_graph:
            self._enqueue(b)
        elif b.exe is not None:
            self.cuda.launch(b.exe, self.stream)
        else:
            self._enqueue(b)  # first run outside capture: TensorRT finishes its lazy setup here
            self.cuda.sync(self.stream)
            self.cuda.begin_capture(self.stream)
            try:
                self._enqueue(b)
            finally:
                b.graph, b.exe = self.cuda.end_capture(self.stream)
            self.cuda.launch(b.exe, self.stream)
        self.cuda.sync(self.stream)
        return {s.name: pinned_array(b.host[s.name], b.out_shapes[s.name], s.dtype).copy() for s in self.outputs}

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
        return {n: self._base_weights[n] for n in names}

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

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Swap named weights in a plan built with ``refit=True`` (e.g. a LoRA merged on the host)."""
        self.load()
        trt = self.trt
        refitter = trt.Refitter(self.engine, self._logger)
        keep = []
        for name, arr in weights.items():
            arr = np.ascontiguousarray(arr)
            keep.append(arr)
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise EngineError(f"{self.model}: the plan has no refittable weight {name!r} "
                                  f"(was it built with --refit?)")
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise EngineError(f"{self.model}: refit failed; missing weights: {list(missing)[:8]}")
        for b in self._buckets.values():  # be conservative: recapture after a refit
            if b.exe is not None:
                self.cuda.destroy_graph(b.graph, b.exe)
                b.graph = b.exe = None


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
