"""Stand-ins for TensorRT, onnxruntime-gpu and cuda-python at their documented interfaces, for the GPU
paths' logic on a machine without a GPU.

"Device" memory is host memory (numpy buffers at real addresses), so copies are real ``memmove``s and a
kernel reads what the copies put there: an engine that skips an upload it needed, or replays a graph over
stale buffers, computes a wrong answer here as it would on a GPU. Graph capture records the kernels
enqueued on the capturing stream and a launch runs them again on the same buffers, as CUDA graphs do.

The model every fake runs: ``out = 2 * sample + timestep[:, None, None, None] + mean(context over T, C)``
(independent reference: :func:`reference`).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import itertools
import threading
import time
import types

import numpy as np

from ksampler_rt.engines.spec import TensorSpec

UNET_INPUTS = [TensorSpec("sample", "float32", ("batch", 4, "height", "width")),
               TensorSpec("timestep", "float32", ("batch",)),
               TensorSpec("encoder_hidden_states", "float32", ("batch", "tokens", 8))]
UNET_OUTPUTS = [TensorSpec("out", "float32", ("batch", 4, "height", "width"))]


def reference(sample, timestep, encoder_hidden_states):
    ctx = encoder_hidden_states.astype(np.float64).mean(axis=(1, 2))
    out = 2.0 * sample.astype(np.float64) + timestep.astype(np.float64)[:, None, None, None] + ctx[:, None, None, None]
    return out.astype(np.float32)


class Memory:
    """Buffers at real addresses, looked up by address."""

    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}

    def alloc(self, nbytes: int) -> int:
        buf = np.zeros(max(int(nbytes), 1), np.uint8)
        ptr = buf.ctypes.data
        self.buffers[ptr] = buf
        return ptr

    def free(self, ptr: int) -> None:
        self.buffers.pop(ptr, None)

    def view(self, ptr: int, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape))
        buf = (ctypes.c_byte * max(n * dtype.itemsize, 1)).from_address(ptr)
        return np.frombuffer(buf, dtype=dtype, count=n).reshape(shape)


class FakeCuda:
    """``ksampler_rt.engines.cuda.CudaRuntime``'s interface; records every call."""

    def __init__(self):
        self.mem = Memory()
        self.calls: list[tuple] = []
        self.copies: list[tuple] = []  # (kind, dst, src, nbytes): which buffers every copy touched
        self._streams = itertools.count(1)
        self.capturing: dict[int, list] = {}
        self.graphs: dict[int, list] = {}
        self._ids = itertools.count(1)
        self.lock = threading.Lock()

    def _log(self, *call):
        with self.lock:
            self.calls.append(call)

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)

    def malloc(self, nbytes):
        self._log("malloc", nbytes)
        return self.mem.alloc(nbytes)

    def malloc_host(self, nbytes):
        self._log("malloc_host", nbytes)
        return self.mem.alloc(nbytes)

    def free(self, ptr):
        self._log("free", ptr)
        self.mem.free(ptr)

    def free_host(self, ptr):
        self._log("free_host", ptr)
        self.mem.free(ptr)

    def stream(self):
        return next(self._streams)

    def stream_destroy(self, s):
        self._log("stream_destroy", s)

    def sync(self, s):
        self._log("sync", s)

    def enqueue(self, s, fn):
        """A kernel on stream ``s``: run now, or recorded when the stream is capturing."""
        if s in self.capturing:
            self.capturing[s].append(fn)
        else:
            fn()

    def _copy(self, kind, dst, src, nbytes, s):
        self._log(kind, nbytes, s)
        with self.lock:
            self.copies.append((kind, dst, src, nbytes))
        self.enqueue(s, lambda: ctypes.memmove(dst, src, nbytes))

    def htod(self, dst, src, nbytes, s):
        self._copy("htod", dst, src, nbytes, s)

    def dtoh(self, dst, src, nbytes, s):
        self._copy("dtoh", dst, src, nbytes, s)

    def dtod(self, dst, src, nbytes, s):
        self._copy("dtod", dst, src, nbytes, s)

    def begin_capture(self, s):
        self._log("begin_capture", s)
        self.capturing[s] = []

    def end_capture(self, s):
        self._log("end_capture", s)
        gid = next(self._ids)
        self.graphs[gid] = self.capturing.pop(s)
        return gid, gid

    def launch(self, exe, s):
        self._log("launch", s)
        for fn in self.graphs[exe]:
            fn()

    def destroy_graph(self, graph, exe):
        self._log("destroy_graph", exe)
        self.graphs.pop(exe, None)

    def mem_get_info(self):
        return 8 << 30, 16 << 30


# ----------------------------------------------------------------------------------------------- TensorRT

class _Enum(types.SimpleNamespace):
    pass


def fake_tensorrt(version: str = "11.0.0", cuda: FakeCuda | None = None, refit_names=(), combined=None):
    """A ``tensorrt`` module. ``version`` 11: no weak-typing precision flags (``BuilderFlag.FP16`` is gone).
    ``refit_names``: what ``Refitter.get_all_weights()`` lists; ``combined``: {name: [names TensorRT also
    needs when ``name`` is refitted]} (``get_missing_weights``)."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    trt.float32, trt.float16, trt.bfloat16 = "float32", "float16", "bfloat16"
    flags = ["REFIT", "WEIGHT_STREAMING", "STRIP_PLAN", "TF32", "OBEY_PRECISION_CONSTRAINTS",
             "PREFER_PRECISION_CONSTRAINTS"]
    if major < 11:
        flags += ["FP16", "BF16", "INT8", "FP8"]
    trt.BuilderFlag = _Enum(**{f: f for f in flags})
    trt.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5)
    trt.MemoryPoolType = _Enum(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ExecutionContextAllocationStrategy = _Enum(USER_MANAGED="USER_MANAGED")
    trt.nptype = lambda t: np.dtype(t).type
    trt.built = []  # (network flags, builder config flags, layers pinned)

    class Logger:
        WARNING = VERBOSE = ERROR = INFO = "level"

        def __init__(self, *a):
            pass

    class Tensor:
        def __init__(self, dtype):
            self.dtype = dtype

    class Layer:
        def __init__(self, name, dtype):
            self.name, self._out = name, [Tensor(dtype)]
            self.precision = None
            self.num_outputs = 1
            self.output_types = {}

        def get_output(self, k):
            return self._out[k]

        def set_output_type(self, k, t):
            self.output_types[k] = t

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.layers = []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        layer_types = [("conv", "float16"), ("attn_upcast", "float32"), ("out", "float16")]

        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.layers = [Layer(n, t) for n, t in OnnxParser.layer_types]
            return True

    class Config:
        def __init__(self):
            self.flags = []
            self.builder_optimization_level = 3

        def set_flag(self, f):
            self.flags.append(f)

        def set_memory_pool_limit(self, *a):
            pass

        def add_optimization_profile(self, p):
            pass

        def create_timing_cache(self, blob):
            return blob

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"timing")

    class Profile:
        def set_shape(self, *a):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            self.network = Network(flags)
            return self.network

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            pinned = [layer.name for layer in network.layers if layer.precision == trt.float32]
            trt.built.append((network.flags, list(config.flags), pinned))
            return b"plan"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.Weights = lambda arr: arr

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.given = engine, {}
            engine.refitters.append(self)

        def get_all_weights(self):
            return list(refit_names)

        def set_named_weights(self, name, w):
            if name not in refit_names:
                return False
            self.given[name] = np.array(w, copy=True)
            return True

        def get_missing_weights(self):
            need = set()
            for n in self.given:
                need |= set((combined or {}).get(n, ()))
            return sorted(need - set(self.given))

        def refit_cuda_engine(self):
            if self.get_missing_weights():
                return False
            self.engine.weights.update(self.given)
            return True

    trt.Refitter = Refitter
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda blob: FakePlan(cuda, refittable=bool(refit_names)))
    return trt


class FakePlan:
    """A deserialized engine of the fake UNet (TensorRT's ``ICudaEngine`` surface the runner uses)."""

    active: dict = {}  # device memory address -> executions using it right now
    overlaps: list = []
    lock = threading.Lock()

    def __init__(self, cuda: FakeCuda, refittable=False, mem_size=1 << 16):
        self.cuda = cuda
        self.refittable = refittable
        self.device_memory_size_v2 = mem_size
        self.names = [s.name for s in UNET_INPUTS + UNET_OUTPUTS]
        self.refitters, self.weights = [], {}
        self.executions = 0

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_shape(self, name):
        return tuple(-1 if isinstance(d, str) else d for d in
                     next(s for s in UNET_INPUTS + UNET_OUTPUTS if s.name == name).shape)

    def get_tensor_mode(self, name):
        return "INPUT" if name in ("sample", "timestep", "encoder_hidden_states") else "OUTPUT"

    def create_execution_context(self, strategy):
        return FakeContext(self)


class FakeContext:
    def __init__(self, plan: FakePlan):
        self.plan, self.shapes, self.addr, self.memory = plan, {}, {}, None

    def set_device_memory(self, ptr, size):
        self.memory = ptr

    def set_optimization_profile_async(self, i, stream):
        pass

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name):
        return self.shapes["sample"]

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def execute_async_v3(self, stream):
        def kernel():
            plan = self.plan
            with FakePlan.lock:
                FakePlan.active[self.memory] = FakePlan.active.get(self.memory, 0) + 1
                if FakePlan.active[self.memory] > 1:
                    FakePlan.overlaps.append(self.memory)
            try:
                time.sleep(0.002)  # long enough for another thread to come in
                mem = plan.cuda.mem
                x = mem.view(self.addr["sample"], self.shapes["sample"], np.float32)
                t = mem.view(self.addr["timestep"], self.shapes["timestep"], np.float32)
                c = mem.view(self.addr["encoder_hidden_states"], self.shapes["encoder_hidden_states"], np.float32)
                mem.view(self.addr["out"], self.shapes["sample"], np.float32)[...] = reference(x, t, c)
                plan.executions += 1
            finally:
                with FakePlan.lock:
                    FakePlan.active[self.memory] -= 1

        self.plan.cuda.enqueue(stream, kernel)
        return True


# ----------------------------------------------------------------------------------------------- ONNX Runtime

def fake_onnxruntime(inputs=UNET_INPUTS, outputs=UNET_OUTPUTS, release=True, compute=None, io=None):
    """An ``onnxruntime`` module with the CUDA EP (``release``: whether sessions have
    ``release_captured_graph``, onnxruntime >= 1.31). ``compute``: ``compute(source, {input: array}) ->
    {output: array}`` for every session (``source``: what the session was created from), instead of the
    fake UNet's :func:`reference`; ``io``: ``io(source) -> (input specs, output specs)`` instead of
    ``inputs`` / ``outputs`` (several models in one process)."""
    ort = types.ModuleType("onnxruntime")
    ort.__spec__ = importlib.machinery.ModuleSpec("onnxruntime", None)  # importlib.util.find_spec works
    ort.__version__ = "1.31.1"
    ort.sessions = []
    ort.preloaded = []
    ort.preload_dlls = lambda *a, **k: ort.preloaded.append(True)
    ort.get_available_providers = lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                           "CPUExecutionProvider"]
    ort.GraphOptimizationLevel = _Enum(ORT_ENABLE_ALL=99, ORT_ENABLE_EXTENDED=2, ORT_ENABLE_BASIC=1,
                                       ORT_DISABLE_ALL=0)
    ort.ExecutionMode = _Enum(ORT_SEQUENTIAL=0)

    class SessionOptions:
        def __init__(self):
            self.config = {}
            self.optimized_model_filepath = ""

        def add_session_config_entry(self, k, v):
            self.config[k] = v

    class RunOptions:
        def __init__(self):
            self.config = {}

        def add_run_config_entry(self, k, v):
            self.config[k] = v

    class OrtValue:
        def __init__(self, arr):
            self.arr = arr

        @staticmethod
        def ortvalue_from_shape_and_type(shape, dtype, device="cpu", device_id=0):
            return OrtValue(np.zeros(shape, dtype))

        @staticmethod
        def ortvalue_from_numpy(a, *dev):
            return OrtValue(np.array(a))

        def data_ptr(self):
            return self.arr.ctypes.data

        def update_inplace(self, a):
            ort.update_inplace_calls.append(a.nbytes)
            self.arr[...] = a

        def numpy(self):
            return self.arr.copy()

        def shape(self):
            return list(self.arr.shape)

        def data_type(self):
            return "tensor(float)"

    ort.update_inplace_calls = []

    class Binding:
        def __init__(self):
            self.inputs, self.outputs, self.out_names = {}, {}, []

        def bind_ortvalue_input(self, n, v):
            self.inputs[n] = v

        def bind_output(self, n, *dev):
            self.out_names.append(n)

        def bind_ortvalue_output(self, n, v):
            self.outputs[n] = v

        def get_outputs(self):
            return [self.outputs[n] for n in self.out_names] if self.out_names else list(self.outputs.values())

        def clear_binding_outputs(self):
            self.outputs, self.out_names = {}, []

    class InferenceSession:
        def __init__(self, source, sess_options=None, providers=None):
            self.source, self.options, self.provider_options = source, sess_options, providers
            self.graphs: dict[int, Binding] = {}
            self.threads: set = set()
            self.released: list[int] = []
            self.runs = []
            self.cuda_graph = any(isinstance(p, tuple) and p[1].get("enable_cuda_graph") == "1"
                                  for p in providers or [])
            opts = {p[0]: p[1] for p in providers or [] if isinstance(p, tuple)}
            self.trt = opts.get("TensorrtExecutionProvider")
            if self.trt is not None and getattr(sess_options, "optimized_model_filepath", ""):
                # what ORT answers when asked to save a graph the TensorRT EP compiled
                raise RuntimeError("Unable to serialize model as it contains compiled nodes. Please disable "
                                   "any execution providers which generate compiled nodes.")
            ort.sessions.append(self)

        def get_providers(self):
            return [p[0] if isinstance(p, tuple) else p for p in self.provider_options]

        def _io(self):
            return io(self.source) if io is not None else (inputs, outputs)

        def get_inputs(self):
            return [types.SimpleNamespace(name=s.name, type=f"tensor({'float' if s.dtype == 'float32' else s.dtype})",
                                          shape=list(s.shape)) for s in self._io()[0]]

        def get_outputs(self):
            return [types.SimpleNamespace(name=s.name, type="tensor(float)", shape=list(s.shape))
                    for s in self._io()[1]]

        def io_binding(self):
            return Binding()

        def _compute(self, b: Binding):
            if compute is not None:
                for n, a in compute(self.source, {k: v.arr for k, v in b.inputs.items()}).items():
                    if n in b.outputs:
                        b.outputs[n].arr[...] = a
                    else:
                        b.outputs[n] = OrtValue(np.array(a, np.float32))
                return
            x, t, c = (b.inputs[n].arr for n in ("sample", "timestep", "encoder_hidden_states"))
            out = reference(x, t, c)
            if "out" in b.outputs:
                b.outputs["out"].arr[...] = out
            else:
                b.outputs["out"] = OrtValue(out)

        def run_with_iobinding(self, b: Binding, run_options=None):
            self.threads.add(threading.get_ident())
            gid = int((run_options.config if run_options else {}).get("gpu_graph_id", "0"))
            self.runs.append(gid)
            if self.cuda_graph and gid >= 0:
                captured = self.graphs.get(gid)
                if captured is None:
                    self.graphs[gid] = b  # capture: the graph is tied to these buffers from now on
                    captured = b
                self._compute(captured)  # a replay reads the captured buffers, whatever is bound now
            else:
                self._compute(b)

        def run(self, names, feeds):
            self.threads.add(threading.get_ident())
            if self.trt is not None and self.trt.get("trt_engine_cache_enable") == "1":
                from pathlib import Path

                shape = "x".join(map(str, feeds["sample"].shape)) if "sample" in feeds else "any"
                (Path(self.trt["trt_engine_cache_path"]) / f"TensorrtExecutionProvider_{shape}.engine").write_bytes(
                    b"engine")
            b = Binding()
            b.inputs = {n: OrtValue(np.asarray(a)) for n, a in feeds.items()}
            self._compute(b)
            return [b.outputs["out"].arr]

    if release:
        def release_captured_graph(self, graph_annotation_id=0):
            self.released.append(graph_annotation_id)
            self.graphs.pop(graph_annotation_id, None)

        InferenceSession.release_captured_graph = release_captured_graph

    ort.SessionOptions, ort.RunOptions, ort.OrtValue, ort.InferenceSession = (SessionOptions, RunOptions, OrtValue,
                                                                              InferenceSession)
    return ort


def unet_feeds(rng, b=2, h=8, w=8, tokens=77):
    return {"sample": rng.standard_normal((b, 4, h, w)).astype(np.float32),
            "timestep": np.full((b,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((b, tokens, 8)).astype(np.float32)}


# ----------------------------------------------------------------------------------------------- precisions

def round_to(a, precision: str) -> np.ndarray:
    """``a`` (float32) rounded to ``precision``'s mantissa and range, returned as float32: fp16 through numpy's
    float16 (values past 65504 become inf, as on a GPU); bf16 by rounding the float32 bit pattern to its top
    16 bits (nearest, ties to even); fp32 unchanged."""
    a = np.asarray(a, np.float32)
    if precision == "fp16":
        with np.errstate(over="ignore"):
            return a.astype(np.float16).astype(np.float32)
    if precision == "bf16":
        u = a.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32)
    return a.copy()


def precision_unet_reference(sample, timestep, encoder_hidden_states):
    """The precision fakes' UNet: a contraction (so a short Euler run stays bounded) that uses every input."""
    ctx = encoder_hidden_states.astype(np.float64).mean(axis=(1, 2))
    out = 0.5 * sample.astype(np.float64) + 1e-3 * timestep.astype(np.float64)[:, None, None, None] \
        + ctx[:, None, None, None]
    return out.astype(np.float32)


class FakePrecisionUnet:
    """A UNet engine computing :func:`precision_unet_reference` with its output rounded to ``precision``."""

    def __init__(self, precision: str):
        self.precision = precision
        self.inputs, self.outputs, self.output_names = UNET_INPUTS, UNET_OUTPUTS, ["out"]
        self.calls = 0

    def __call__(self, **feeds):
        self.calls += 1
        f = {k: np.asarray(v, np.float32) for k, v in feeds.items()}
        return {"out": round_to(precision_unet_reference(f["sample"], f["timestep"], f["encoder_hidden_states"]),
                                self.precision)}


class FakePrecisionVae:
    """A VAE decoder whose first activation is ``3000 * latent``, normalized over the image before ``tanh``:
    in fp16 the activation overflows (inf) once ``|latent| > 21.8``, and the normalization turns +inf and -inf
    into NaN everywhere -- how the SDXL VAE's group norms spread an fp16 overflow."""

    def __init__(self, precision: str):
        self.precision = precision
        self.inputs = [TensorSpec("latent", "float32", ("batch", 4, "height", "width"))]
        self.output_names = ["image"]
        self.released = False

    def __call__(self, latent):
        h = round_to(np.asarray(latent, np.float32) * np.float32(3000.0), self.precision)
        with np.errstate(invalid="ignore"):
            out = np.tanh((h - h.mean()) / np.float32(6000.0))
        return {"image": round_to(out, self.precision)}

    def release(self):
        self.released = True
