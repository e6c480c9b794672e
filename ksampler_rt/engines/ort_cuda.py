"""ONNX Runtime with the CUDA (optionally TensorRT) execution provider: IO binding, CUDA graphs, few copies.

Needs the ``onnxruntime-gpu`` wheel instead of ``onnxruntime`` (``ort.GPU_SWAP``). Written against the
documented onnxruntime-gpu 1.31 Python API (``IOBinding``, ``OrtValue``, run option ``gpu_graph_id``,
``InferenceSession.release_captured_graph``, ``onnxruntime.preload_dlls``) and cuda-python's runtime API;
the logic is unit-tested on the CPU against mocks of both (tests/engines/fake_gpu.py).

Per step, a call does:

* **copies only what changed**: each input is compared with the host copy of what its device buffer holds;
  CFG passes the same text context every step (0.46 MiB SD1.5, 1.2 MiB SDXL), so it is uploaded once;
* with cuda-python: **pinned host staging, one stream, one sync**: ORT runs on the engine's own stream
  (CUDA EP option ``user_compute_stream``), the H2D copies and the D2H copies are ``cudaMemcpyAsync`` from /
  to pinned buffers on that stream, the run does not synchronize (run option
  ``disable_synchronize_execution_providers``) and the call synchronizes once at the end. Without
  cuda-python: ``OrtValue.update_inplace`` / ``.numpy()`` (ORT's own blocking copies);
* **CUDA graphs per shape bucket**, batch ranges included (one graph per exact shape set, run option
  ``gpu_graph_id``). More than ``max_buckets`` shapes: the least recently used bucket is dropped and its
  graph released (``release_captured_graph``), a fresh graph id captures the new shape; an onnxruntime
  without that call runs the new shape without a graph. Never an error.

ControlNet on CUDA (issue #21): called with ``keep_on_device=True`` the engine returns its outputs as
:class:`~ksampler_rt.engines.device.DeviceTensor` (no D2H), and it takes DeviceTensor inputs by a
device-to-device copy into the bucket's input buffer (no H2D), so the ControlNet's residuals never leave
the GPU on their way to the UNet; see ``engines/device.py`` for their lifetime.

Threads: ORT does not support running a CUDA-graph session from several threads, so such a session lives on
one dedicated thread (created, captured and replayed there; callers on any thread hand it their feeds).
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .base import Engine, check_io_matches
from .device import DeviceIO, DeviceTensor
from .ort import CUDA_EP, GPU_SWAP, TRT_EP, _ort, check_providers, export_onnx_path, session_source, session_specs
from .spec import EngineError

_PRELOADED = []


def preload_cuda_libraries(ort) -> bool:
    """``onnxruntime.preload_dlls()`` once per process, before the first CUDA session: it loads the CUDA and
    cuDNN libraries pip installed (nvidia-* wheels), which the CUDA EP does not find on its own. Returns
    whether it was called (onnxruntime < 1.21 has no such function)."""
    if _PRELOADED:
        return _PRELOADED[0]
    fn = getattr(ort, "preload_dlls", None)
    if fn is not None:
        try:
            fn()
        except Exception:  # no nvidia-* wheels: the system's CUDA is used, as before
            pass
    _PRELOADED.append(fn is not None)
    return fn is not None


def _cuda_runtime():
    """Our cuda-python / cupy facade, or None (then ORT's own copies are used)."""
    try:
        from .cuda import CudaRuntime

        return CudaRuntime()
    except EngineError:
        return None


class _Bucket:
    """Fixed device buffers + an IO binding for one exact set of input shapes."""

    __slots__ = ("binding", "inputs", "outputs", "graph_id", "run_options", "calls", "held", "host",
                 "out_shapes", "live")


class _SessionThread:
    """One thread that owns a session: every call runs there, whichever thread asks."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ksrt-{name}")
        self.ident = self._pool.submit(threading.get_ident).result()

    def call(self, fn, *args):
        if threading.get_ident() == self.ident:  # already there (e.g. a release from inside a call)
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def close(self):
        self._pool.shutdown(wait=True)


class WeightSessions:
    """Bounds how many weight-variant sessions (LoRA) of one base engine hold device memory at once.

    Each variant is a full second session (the UNet's weights again). ``limit`` None: as many as fit in
    half of the device memory free when the first variant loads, at least 1; the least recently loaded
    variant beyond it is released (it reloads on its next call)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self._live: "OrderedDict[int, Engine]" = OrderedDict()
        self._lock = threading.Lock()

    def resolve_limit(self, model_bytes: int, cuda=None) -> int:
        if self.limit is None:
            free = 0
            if cuda is not None:
                try:
                    free = cuda.mem_get_info()[0]
                except Exception:
                    free = 0
            self.limit = max(1, int(free // 2 // max(model_bytes, 1))) if free else 1
        return self.limit

    def loaded(self, eng: Engine, model_bytes: int, cuda=None) -> list[Engine]:
        """Record that ``eng`` loaded; returns the variants to release."""
        limit = self.resolve_limit(model_bytes, cuda)
        with self._lock:
            self._live[id(eng)] = eng
            self._live.move_to_end(id(eng))
            drop = []
            while len(self._live) > limit:
                _, old = self._live.popitem(last=False)
                drop.append(old)
            return drop

    def released(self, eng: Engine) -> None:
        with self._lock:
            self._live.pop(id(eng), None)

    def __len__(self) -> int:
        return len(self._live)


class OrtCudaEngine(DeviceIO, Engine):
    """ONNX Runtime with the CUDA (optionally TensorRT) execution provider; see the module docstring.

    ``fusion``: the transformer optimizer's model type applied to the LoRA path's source (the cached
    artefact of the ``onnxruntime-cuda`` backend is already fused); None: no fusion step.
    """

    backend = "onnxruntime-cuda"

    def __init__(self, model, inputs, outputs, profiles=None, *, path, device_id: int = 0,
                 cuda_graph: bool = True, tensorrt_ep: bool = False, trt_cache_dir: str | None = None,
                 fp16: bool = False, max_buckets: int = 8, overrides: dict | None = None,
                 fusion: str | None = None, weight_sessions: WeightSessions | None = None,
                 trt_profiles: bool = True, **kw):
        super().__init__(model, inputs, outputs, profiles, source=str(path), **kw)
        self.overrides = dict(overrides or {})
        self._keep = None
        if tensorrt_ep:
            self.backend = "onnxruntime-trt"
            self._set_validator()
        self.path = Path(path)
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        self.tensorrt_ep = tensorrt_ep
        self.trt_cache_dir = trt_cache_dir
        self.trt_profiles = trt_profiles
        self.fp16 = fp16
        self.max_buckets = max_buckets
        self.fusion = fusion
        self.weight_sessions = weight_sessions if weight_sessions is not None else WeightSessions()
        self.session = None
        self.cuda = None
        self.stream = 0
        self._thread: _SessionThread | None = None
        self._buckets: "OrderedDict[tuple, _Bucket]" = OrderedDict()
        self._graph_ids = itertools.count(0)
        self.stats = {"h2d_bytes": 0, "h2d_skipped": 0, "syncs": 0, "runs": 0, "graph_runs": 0,
                      "buckets_evicted": 0, "graphs_released": 0, "thread_ids": set(),
                      # device-resident IO (engines/device.py): DeviceTensors returned, D2D copies of DeviceTensor
                      # inputs, DeviceTensors that had to come to the host (np.asarray / outliving their step)
                      "device_outputs": 0, "dtod": 0, "dtod_bytes": 0, "device_feeds_via_host": 0,
                      "d2h_fallbacks": 0, "d2h_fallback_bytes": 0}

    # --- session ----------------------------------------------------------------------------------
    def providers(self) -> list:
        cuda_opts = {"device_id": str(self.device_id), "cudnn_conv_algo_search": "EXHAUSTIVE",
                     # grow the arena by what is asked, not by powers of two: no 2x over-reservation per bucket
                     "arena_extend_strategy": "kSameAsRequested"}
        if self.stream:  # ORT runs on our stream: copies and kernels in one order, one sync per call
            cuda_opts["user_compute_stream"] = str(int(self.stream))
            cuda_opts["has_user_compute_stream"] = "1"
        else:
            cuda_opts["do_copy_in_default_stream"] = "1"
        if self.cuda_graph:
            cuda_opts["enable_cuda_graph"] = "1"
        providers = []
        if self.tensorrt_ep:
            trt_opts = {"device_id": str(self.device_id), "trt_fp16_enable": "1" if self.fp16 else "0",
                        "trt_engine_cache_enable": "1", "trt_timing_cache_enable": "1"}
            if self.stream:
                trt_opts["user_compute_stream"] = str(int(self.stream))
                trt_opts["has_user_compute_stream"] = "1"
            if self.trt_cache_dir:
                trt_opts["trt_engine_cache_path"] = str(self.trt_cache_dir)
                trt_opts["trt_timing_cache_path"] = str(self.trt_cache_dir)
            if self.cuda_graph:
                trt_opts["trt_cuda_graph_enable"] = "1"
            if self.profiles and self.trt_profiles:
                trt_opts.update(trt_profile_options(self.profiles))
            providers.append((TRT_EP, trt_opts))
        providers.append((CUDA_EP, cuda_opts))
        return providers

    def _session_source(self, so):
        if not self.overrides or not self.fusion:
            return session_source(self.path, self.overrides, so)
        # LoRA on the CUDA EP: weights replaced in the export's own graph, then the same fusions as the
        # cached artefact (fusions pack initializers, so names must be applied before them).
        import onnx

        from .ort_fusion import fuse

        blob, keep = session_source(self.path, self.overrides, so)
        if not isinstance(blob, bytes):
            # external-data weights (exports over 2 GB) go in through add_external_initializers, which a fused
            # graph cannot take by the export's names: that LoRA session runs unfused
            return blob, keep
        model = onnx.load_from_string(blob)
        half = any(t.data_type in (10, 16) for t in model.graph.initializer[:64])  # fp16 / bf16 weights
        return fuse(model, self.model, use_gpu=True, half=half).SerializeToString(), None

    def _load(self):
        if self.cuda_graph:  # a CUDA-graph session is created, captured and replayed on one thread
            self._thread = _SessionThread(self.model)
            try:
                self._thread.call(self._load_here)
            except BaseException:
                self._thread.close()
                self._thread = None
                raise
        else:
            self._load_here()
        if self.overrides:
            # a full copy of the model's weights: its ONNX file and external data files (unet.onnx, unet.onnx.data)
            files = [f for f in self.path.parent.glob(self.path.stem + "*") if f.is_file()]
            size = sum(int(np.asarray(a).nbytes) for a in self.overrides.values())
            model_bytes = max(size, sum(f.stat().st_size for f in files))
            for old in self.weight_sessions.loaded(self, model_bytes, self.cuda):
                if old is not self:
                    old.release()

    def _load_here(self):
        ort = _ort()
        preload_cuda_libraries(ort)
        available = ort.get_available_providers()
        wanted = [TRT_EP, CUDA_EP] if self.tensorrt_ep else [CUDA_EP]
        for p in wanted:
            if p not in available:
                raise EngineError(f"{self.model}: {p} is not available in this onnxruntime ({available}); "
                                  f"install the GPU build: {GPU_SWAP}")
        self.cuda = _cuda_runtime()
        if self.cuda is not None:
            self.stream = self.cuda.stream()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        source, self._keep = self._session_source(so)
        try:
            self.session = ort.InferenceSession(source, sess_options=so, providers=self.providers())
        except Exception as exc:
            hint = (" (CUDA graphs need every node on the GPU; retry with cuda_graph=False)"
                    if self.cuda_graph else "")
            raise EngineError(f"{self.model}: creating the ONNX Runtime GPU session failed: {exc}{hint}") from exc
        check_providers(self.session, wanted, self.model)
        ins, outs = session_specs(self.session)
        check_io_matches(self.model, self.inputs, ins, "inputs", str(self.path))
        check_io_matches(self.model, self.outputs, outs, "outputs", str(self.path))

    def _release(self):
        def drop():
            for b in self._buckets.values():
                self._free_bucket(b)
            self._buckets.clear()  # drops the device OrtValues
            self.session = None
            self._keep = None
            if self.cuda is not None and self.stream:
                self.cuda.stream_destroy(self.stream)
            self.stream = 0

        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.call(drop)
            if threading.get_ident() != thread.ident:
                thread.close()
        else:
            drop()
        self.weight_sessions.released(self)

    def with_weights(self, overrides: dict[str, np.ndarray]) -> "OrtCudaEngine":
        """As :meth:`OrtCpuEngine.with_weights`: a second session over the export's ONNX with ``overrides``
        (the same fusions applied after them). At most ``weight_sessions.limit`` such sessions of this engine
        hold device memory at once (default: what fits in half the free memory). The TensorRT EP builds its
        own engine for it: use the ``tensorrt`` backend to refit instead."""
        if not overrides:
            return self
        raw = export_onnx_path(self.export_dir, self.model)
        eng = OrtCudaEngine(self.model, self.inputs, self.outputs, self.profiles, path=raw,
                            device_id=self.device_id, cuda_graph=self.cuda_graph, tensorrt_ep=self.tensorrt_ep,
                            trt_cache_dir=self.trt_cache_dir, fp16=self.fp16, max_buckets=self.max_buckets,
                            overrides=overrides, request=self.request, export_dir=self.export_dir,
                            fusion=self.fusion, weight_sessions=self.weight_sessions,
                            trt_profiles=self.trt_profiles)
        eng.source = f"{raw} (+{len(overrides)} overridden weights)"
        return eng

    # --- buckets ----------------------------------------------------------------------------------
    def _free_bucket(self, b: _Bucket) -> None:
        self._materialize(b)  # DeviceTensors still pointing at its outputs keep a host copy
        if b.graph_id >= 0 and self.session is not None and hasattr(self.session, "release_captured_graph"):
            self.session.release_captured_graph(b.graph_id)
            self.stats["graphs_released"] += 1
        if self.cuda is not None:
            for p in b.host.values():
                self.cuda.free_host(p)
        b.host = {}

    def _next_graph_id(self) -> int:
        """A fresh graph id, or -1 (no graph) when an evicted graph could not be released: a reused id would
        replay the old graph on the old buffers."""
        if not self.cuda_graph:
            return -1
        if self.stats["buckets_evicted"] and not hasattr(self.session, "release_captured_graph"):
            return -1
        return next(self._graph_ids)

    def _bucket(self, feeds) -> _Bucket:
        ort = _ort()
        key = tuple((n, feeds[n].shape) for n in self.input_names)
        b = self._buckets.get(key)
        if b is not None:
            self._buckets.move_to_end(key)
            return b
        while len(self._buckets) >= self.max_buckets:  # fall back: drop the least recently used shape
            _, old = self._buckets.popitem(last=False)
            self._free_bucket(old)
            self.stats["buckets_evicted"] += 1
        dev = ("cuda", self.device_id)
        b = _Bucket()
        b.calls, b.held, b.host, b.live = 0, {}, {}, []
        b.inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(feeds[n].shape), feeds[n].dtype.type, *dev)
                    for n in self.input_names}
        b.binding = self.session.io_binding()
        for n, v in b.inputs.items():
            b.binding.bind_ortvalue_input(n, v)
            if isinstance(feeds[n], DeviceTensor):  # copied device to device by the run itself
                b.held[n] = None
                continue
            v.update_inplace(np.ascontiguousarray(feeds[n]))
            b.held[n] = np.array(feeds[n], copy=True)
        # One plain run (graph id -1 = no capture) with ORT-allocated outputs tells us their shapes.
        warm = ort.RunOptions()
        warm.add_run_config_entry("gpu_graph_id", "-1")
        for n in self.output_names:
            b.binding.bind_output(n, *dev)
        self.session.run_with_iobinding(b.binding, warm)
        shapes = [tuple(o.shape()) for o in b.binding.get_outputs()]
        b.binding.clear_binding_outputs()
        b.outputs, b.out_shapes = {}, {}
        for spec, shape in zip(self.outputs, shapes):
            v = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(spec.dtype).type, *dev)
            b.binding.bind_ortvalue_output(spec.name, v)
            b.outputs[spec.name] = v
            b.out_shapes[spec.name] = shape
            if self.cuda is not None:
                b.host[spec.name] = self.cuda.malloc_host(int(np.prod(shape)) * np.dtype(spec.dtype).itemsize)
        for n in self.input_names:
            if self.cuda is not None:
                b.host[n] = self.cuda.malloc_host(max(feeds[n].nbytes, 1))
        b.graph_id = self._next_graph_id()
        b.run_options = ort.RunOptions()
        b.run_options.add_run_config_entry("gpu_graph_id", str(b.graph_id))
        if self.cuda is not None:  # the call synchronizes once itself, after its D2H copies
            b.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._buckets[key] = b
        return b

    # --- running ----------------------------------------------------------------------------------
    def _run(self, feeds, profile_index):
        keep = self._outputs_on_device  # set by __call__(keep_on_device=True) under the lock
        if self._thread is not None:
            return self._thread.call(self._run_here, feeds, keep)
        return self._run_here(feeds, keep)

    def _run_here(self, feeds, keep_on_device: bool = False):
        with self._producer_locks(feeds):  # held until this call's sync: see DeviceIO._producer_locks
            return self._run_bucket(feeds, keep_on_device)

    def _run_bucket(self, feeds, keep_on_device: bool):
        from .cuda import pinned_array, same_values

        self.stats["thread_ids"].add(threading.get_ident())
        b = self._bucket(feeds)
        if b.live:  # this run overwrites the outputs DeviceTensors of the last one may still point at
            self._materialize(b)
        for n, v in b.inputs.items():
            a = feeds[n]
            if isinstance(a, DeviceTensor):
                if self._device_feed(b, n, v, a):
                    continue
                a = np.asarray(a)
            a = np.ascontiguousarray(a)
            held = b.held[n]
            if b.calls and held is not None and same_values(held, a):  # the device buffer holds these already
                self.stats["h2d_skipped"] += 1
                continue
            if self.cuda is not None:
                np.copyto(pinned_array(b.host[n], a.shape, a.dtype), a)
                self.cuda.htod(v.data_ptr(), b.host[n], a.nbytes, self.stream)
            else:
                v.update_inplace(a)
            if held is None:
                b.held[n] = np.array(a, copy=True)
            else:
                np.copyto(held, a)
            self.stats["h2d_bytes"] += a.nbytes
        self.session.run_with_iobinding(b.binding, b.run_options)
        b.calls += 1
        self.stats["runs"] += 1
        self.stats["graph_runs"] += b.graph_id >= 0
        if self.cuda is None:
            return {n: v.numpy() for n, v in b.outputs.items()}
        if keep_on_device:
            return self._device_outputs(b)
        return self._download(b, self.outputs)

    def _download(self, b: _Bucket, specs) -> dict[str, np.ndarray]:
        """Bucket ``b``'s outputs named by ``specs`` (``name`` and ``dtype``: TensorSpecs or DeviceTensors) to
        the host through its pinned staging: the D2H copies on our stream, then one sync."""
        from .cuda import pinned_array

        for s in specs:
            nbytes = int(np.prod(b.out_shapes[s.name])) * np.dtype(s.dtype).itemsize
            self.cuda.dtoh(b.host[s.name], b.outputs[s.name].data_ptr(), nbytes, self.stream)
        self.cuda.sync(self.stream)
        self.stats["syncs"] += 1
        return {s.name: pinned_array(b.host[s.name], b.out_shapes[s.name], s.dtype).copy() for s in specs}

    def device_bytes(self) -> dict:
        """Device memory of this engine's IO buffers per bucket (gpu-check)."""
        per = {}
        for key, b in self._buckets.items():
            total = 0
            for v in list(b.inputs.values()) + list(b.outputs.values()):
                shape = v.shape()
                total += int(np.prod(shape)) * np.dtype(_np_type(v)).itemsize
            per["; ".join(f"{n}{list(s)}" for n, s in key)] = total
        return {"io_buffers": sum(per.values()), "buckets": len(per), "per_bucket": per}


def _np_type(v) -> str:
    t = str(v.data_type())  # "tensor(float)"
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(int32)": "int32", "tensor(bfloat16)": "float32", "tensor(double)": "float64"}.get(t, "float32")


def trt_profile_options(profiles) -> dict[str, str]:
    """The TensorRT EP's ``trt_profile_{min,opt,max}_shapes`` for ``profiles`` (one profile per entry)."""
    out = {}
    for key, attr in (("trt_profile_min_shapes", "min"), ("trt_profile_opt_shapes", "opt"),
                      ("trt_profile_max_shapes", "max")):
        out[key] = ",".join(f"{n}:{'x'.join(map(str, getattr(p[n], attr)))}" for p in profiles for n in p.ranges)
    return out
