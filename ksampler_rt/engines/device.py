"""``DeviceTensor``: an engine output left in device memory, handed to another engine without a host round trip.

Issue #21 (ControlNet on CUDA): the ControlNet's residuals go from its output buffers straight into the UNet's
input buffers (``cudaMemcpyAsync`` device to device) instead of D2H + H2D every step. The producing engine
(``OrtCudaEngine`` called with ``keep_on_device=True``) returns these in place of numpy arrays; an engine
that takes device inputs (``OrtCudaEngine.device_inputs``) copies them device to device. Anything else
that needs the values calls ``np.asarray(t)``: an explicit D2H copy, counted in the producer's ``stats``.

Lifetime: a DeviceTensor points into the producer's fixed output buffer of one shape bucket (CUDA graphs
need fixed buffers), which the producer's next run of that bucket overwrites. So before that run (and
before the bucket is evicted or the engine released) the producer copies every DeviceTensor still alive
to the host first (``OrtCudaEngine._materialize``): a tensor kept past its step costs one D2H, never
wrong values. A consumer holds the producer's lock from its copy until its own stream synchronizes, so
the buffer cannot be overwritten while the copy is in flight.

The runtime never imports this: it recognises the type by duck typing (``device_resident`` True, ``shape``,
``dtype``, not an ``np.ndarray``), see ``ksampler_rt.runtime.control``.
"""
from __future__ import annotations

import weakref
from contextlib import ExitStack

import numpy as np


class DeviceTensor:
    """One output of ``owner`` in device ``device_id``'s memory: ``shape``, ``dtype``, ``data_ptr()``;
    ``np.asarray(t)`` copies it to the host (read-only array, cached)."""

    device_resident = True
    __slots__ = ("shape", "dtype", "device_id", "name", "owner", "bucket", "_ptr", "_host", "__weakref__")

    def __init__(self, owner, name: str, ptr: int, shape, dtype, device_id: int = 0, bucket=None):
        self.owner = owner
        self.bucket = bucket  # the producer's shape bucket whose output buffer holds the values
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.device_id = int(device_id)
        self._ptr = int(ptr)
        self._host: np.ndarray | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def data_ptr(self) -> int | None:
        """The device address holding the values, or None once the producer moved them to the host."""
        return self._ptr or None

    @property
    def on_host(self) -> bool:
        return self._host is not None

    # --- for the producing engine -----------------------------------------------------------------
    def _set_host(self, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host, dtype=self.dtype).reshape(self.shape)
        host.flags.writeable = False  # shared by every np.asarray(t): nobody may write into it
        self._host = host

    def _detach(self) -> None:
        """The producer's buffer is about to be reused: from now on only the host copy exists."""
        self._ptr = 0

    # --- host access ------------------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._host is None:
            self.owner._tensor_to_host(self)  # D2H, counted in owner.stats["d2h_fallbacks"]
        out = self._host
        if dtype is not None and np.dtype(dtype) != out.dtype:
            return out.astype(dtype)
        return out.copy() if copy else out

    def __repr__(self) -> str:
        where = "host copy" if self._ptr == 0 else f"cuda:{self.device_id} 0x{self._ptr:x}"
        return f"<DeviceTensor {self.name} {self.dtype.name}{list(self.shape)} {where}>"


class DeviceIO:
    """The DeviceTensor half of ``OrtCudaEngine``: as a producer (``engine(..., keep_on_device=True)``) and as
    a consumer (DeviceTensor feeds copied device to device into the bucket's fixed input buffers).

    Relies on the engine's ``cuda`` (the CUDA facade, None without cuda-python), ``stream``, ``_thread``,
    ``_lock``, ``stats``, ``device_id``, ``outputs``, ``_download`` and its buckets' ``inputs`` / ``outputs`` /
    ``host`` / ``held`` / ``live``. Without cuda-python there is no device copy: ``keep_on_device`` is ignored (numpy
    outputs) and DeviceTensor feeds go through the host."""

    device_inputs = True   # EngineSet.unet_callable may feed DeviceTensors
    device_outputs = True  # controlnet_callable asks for keep_on_device=True
    _outputs_on_device = False

    def __call__(self, keep_on_device: bool = False, **inputs):
        """``Engine.__call__``; ``keep_on_device``: return :class:`DeviceTensor` outputs (left in this engine's
        output buffers) instead of numpy arrays, when cuda-python is there to copy them on."""
        feeds, profile_index = self.validate(inputs)
        with self._lock:
            if not self._loaded:
                self.load()
            # a flag, not an argument: _run keeps the base signature (the bench's CallTimer wraps it)
            self._outputs_on_device = bool(keep_on_device)
            try:
                return self._run(feeds, profile_index)
            finally:
                self._outputs_on_device = False

    def validate(self, inputs: dict):
        """The base validation, DeviceTensors checked by their shape and dtype (zero-stride stand-ins)."""
        inputs = {n: np.asarray(v) if isinstance(v, DeviceTensor) and v.owner is self else v
                  for n, v in inputs.items()}
        device = {n: v for n, v in inputs.items() if isinstance(v, DeviceTensor)}
        if not device:
            return self._validate(inputs)
        stand_ins = {n: np.broadcast_to(np.zeros((), v.dtype), v.shape) for n, v in device.items()}
        feeds, profile_index = self._validate({**inputs, **stand_ins})
        feeds.update(device)
        return feeds, profile_index

    # --- consumer ---------------------------------------------------------------------------------
    def _producer_locks(self, feeds) -> ExitStack:
        """Hold every producer's lock until this call has synchronized: its output buffer cannot be
        overwritten by its next run while our device copy is in flight. Always taken consumer -> producer
        (in id order), never the other way: no lock cycle."""
        stack = ExitStack()
        owners = {id(v.owner): v.owner for v in feeds.values() if isinstance(v, DeviceTensor)}
        for _, owner in sorted(owners.items()):
            stack.enter_context(owner._lock)
        return stack

    def _device_feed(self, b, name: str, buf, t: DeviceTensor) -> bool:
        """``t`` copied device to device into input buffer ``buf`` on our stream; False when it cannot be
        (no cuda-python, another device, already moved to the host): the caller uploads ``np.asarray(t)``."""
        ptr = t.data_ptr()
        if self.cuda is None or ptr is None or t.device_id != self.device_id:
            self.stats["device_feeds_via_host"] += 1
            return False
        self.cuda.dtod(buf.data_ptr(), ptr, t.nbytes, self.stream)
        b.held[name] = None  # the host copy no longer says what the device buffer holds
        self.stats["dtod"] += 1
        self.stats["dtod_bytes"] += t.nbytes
        return True

    # --- producer ---------------------------------------------------------------------------------
    def _device_outputs(self, b) -> dict:
        """The bucket's outputs as DeviceTensors, after one sync (another engine's stream reads them next)."""
        self.cuda.sync(self.stream)
        self.stats["syncs"] += 1
        out = {}
        for spec in self.outputs:
            t = DeviceTensor(self, spec.name, b.outputs[spec.name].data_ptr(), b.out_shapes[spec.name], spec.dtype,
                             self.device_id, bucket=b)
            b.live.append(weakref.ref(t))
            out[spec.name] = t
        self.stats["device_outputs"] += len(out)
        return out

    def _materialize(self, b) -> None:
        """Before bucket ``b``'s outputs are overwritten or freed: DeviceTensors still alive get a host copy."""
        live, b.live = b.live, []
        for ref in live:
            t = ref()
            if t is None:
                continue
            if t._host is None:
                self._fetch(t)
            t._detach()

    def _fetch(self, t: DeviceTensor) -> None:
        """D2H of one DeviceTensor (session thread, under the lock), through its bucket's pinned staging
        (DeviceTensors exist only where cuda-python does: see ``_run_bucket``)."""
        t._set_host(self._download(t.bucket, [t])[t.name])
        self.stats["d2h_fallbacks"] += 1
        self.stats["d2h_fallback_bytes"] += t.nbytes

    def _tensor_to_host(self, t: DeviceTensor) -> None:
        with self._lock:
            if t._host is None:
                if self._thread is not None:
                    self._thread.call(self._fetch, t)
                else:
                    self._fetch(t)
