"""A small CUDA runtime facade (device/pinned memory, streams, copies, graphs) over cuda-python or cupy.

What the TensorRT and ONNX Runtime CUDA backends need; imported lazily. cuda-python is preferred
(``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6); cupy is the fallback.
Not exercised on this project's CPU CI.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from .spec import EngineError

INSTALL = "pip install ksampler-rt[tensorrt]"


class CudaRuntime:
    def __init__(self):
        self._rt = None
        self._cupy = None
        try:
            from cuda.bindings import runtime as rt
            self._rt = rt
        except ImportError:
            try:
                from cuda import cudart as rt
                self._rt = rt
            except ImportError:
                try:
                    import cupy
                    self._cupy = cupy
                except ImportError:
                    raise EngineError(f"the TensorRT backend needs cuda-python or cupy: {INSTALL}") from None

    # cuda-python returns (err, *values)
    def _check(self, result, what):
        if isinstance(result, tuple):
            err, rest = result[0], result[1:]
        else:
            err, rest = result, ()
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise EngineError(f"CUDA error in {what}: {name}")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if self._rt:
            return int(self._check(self._rt.cudaMalloc(nbytes), "cudaMalloc"))
        return int(self._cupy.cuda.runtime.malloc(nbytes))

    def free(self, ptr: int) -> None:
        if not ptr:
            return
        if self._rt:
            self._check(self._rt.cudaFree(ptr), "cudaFree")
        else:
            self._cupy.cuda.runtime.free(ptr)

    def malloc_host(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if self._rt:
            return int(self._check(self._rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        return int(self._cupy.cuda.runtime.mallocHost(nbytes))

    def free_host(self, ptr: int) -> None:
        if not ptr:
            return
        if self._rt:
            self._check(self._rt.cudaFreeHost(ptr), "cudaFreeHost")
        else:
            self._cupy.cuda.runtime.freeHost(ptr)

    def stream(self) -> int:
        if self._rt:
            return int(self._check(self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking),
                                   "cudaStreamCreate"))
        return int(self._cupy.cuda.runtime.streamCreateWithFlags(1))

    def stream_destroy(self, s: int) -> None:
        if self._rt:
            self._check(self._rt.cudaStreamDestroy(s), "cudaStreamDestroy")
        else:
            self._cupy.cuda.runtime.streamDestroy(s)

    def sync(self, s: int) -> None:
        if self._rt:
            self._check(self._rt.cudaStreamSynchronize(s), "cudaStreamSynchronize")
        else:
            self._cupy.cuda.runtime.streamSynchronize(s)

    def htod(self, dst: int, src: int, nbytes: int, s: int) -> None:
        if self._rt:
            self._check(self._rt.cudaMemcpyAsync(dst, src, nbytes, self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, s),
                        "cudaMemcpyAsync H2D")
        else:
            self._cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, 1, s)

    def dtoh(self, dst: int, src: int, nbytes: int, s: int) -> None:
        if self._rt:
            self._check(self._rt.cudaMemcpyAsync(dst, src, nbytes, self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, s),
                        "cudaMemcpyAsync D2H")
        else:
            self._cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, 2, s)

    def dtod(self, dst: int, src: int, nbytes: int, s: int) -> None:
        """Device-to-device ``cudaMemcpyAsync`` on stream ``s`` (ControlNet residuals into the UNet's input
        buffers without touching the host)."""
        if self._rt:
            self._check(self._rt.cudaMemcpyAsync(dst, src, nbytes,
                                                 self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, s),
                        "cudaMemcpyAsync D2D")
        else:
            self._cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, 3, s)  # cudaMemcpyDeviceToDevice

    # graphs: capture the work enqueued on a stream, then replay it with one launch
    def begin_capture(self, s: int) -> None:
        if self._rt:
            self._check(self._rt.cudaStreamBeginCapture(
                s, self._rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
        else:
            self._cupy.cuda.runtime.streamBeginCapture(s, 1)

    def end_capture(self, s: int) -> tuple[object, object]:
        if self._rt:
            graph = self._check(self._rt.cudaStreamEndCapture(s), "cudaStreamEndCapture")
            exe = self._check(self._rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            return graph, exe
        graph = self._cupy.cuda.runtime.streamEndCapture(s)
        exe = self._cupy.cuda.runtime.graphInstantiate(graph)
        return graph, exe

    def launch(self, exe, s: int) -> None:
        if self._rt:
            self._check(self._rt.cudaGraphLaunch(exe, s), "cudaGraphLaunch")
        else:
            self._cupy.cuda.runtime.graphLaunch(exe, s)

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device."""
        if self._rt:
            free, total = self._check(self._rt.cudaMemGetInfo(), "cudaMemGetInfo")
            return int(free), int(total)
        free, total = self._cupy.cuda.runtime.memGetInfo()
        return int(free), int(total)

    def destroy_graph(self, graph, exe) -> None:
        if self._rt:
            self._rt.cudaGraphExecDestroy(exe)
            self._rt.cudaGraphDestroy(graph)
        else:
            self._cupy.cuda.runtime.graphExecDestroy(exe)
            self._cupy.cuda.runtime.graphDestroy(graph)


def same_values(held: np.ndarray, new: np.ndarray) -> bool:
    """Whether ``new`` holds exactly the values of ``held`` (what a device buffer was last given), so that its
    upload can be skipped. A strided probe of 64 elements first: an input that changed (the latents, every
    step) is told apart in a microsecond; only an unchanged one (CFG's text context) pays the full compare."""
    if held.shape != new.shape or held.dtype != new.dtype:
        return False
    h, n = held.reshape(-1), new.reshape(-1)
    step = max(1, h.size // 64)
    if not np.array_equal(h[::step], n[::step]):
        return False
    return bool(np.array_equal(h, n))


def pinned_array(ptr: int, shape, dtype) -> np.ndarray:
    """A numpy view of pinned host memory at ``ptr``."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = (ctypes.c_byte * max(n, 1)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class DeviceScratch:
    """One activation buffer shared by every TensorRT context of a pipeline.

    Models run one after the other, so they can use the same scratch memory (TensorRT's
    ``create_execution_context_without_device_memory`` + ``set_device_memory``). Growing it moves it, which
    invalidates captured CUDA graphs: engines compare ``generation`` before replaying.

    ``lock``: TensorRT documents concurrent use of one context memory by two executions as undefined, and
    each engine has its own stream; so every engine holds this lock from its first copy to its stream sync
    (and while growing or freeing the buffer). Callers on any thread (a Ray replica's worker threads) are
    therefore serialized on the scratch, never run on it at once.
    """

    def __init__(self, cuda: CudaRuntime | None = None):
        self.lock = threading.RLock()
        self.cuda = cuda
        self.ptr = 0
        self.size = 0
        self.generation = 0
        self.users = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.size:
            self.cuda = self.cuda or CudaRuntime()
            if self.ptr:
                self.cuda.free(self.ptr)
            self.ptr = self.cuda.malloc(nbytes)
            self.size = int(nbytes)
            self.generation += 1
        return self.ptr

    def release(self) -> None:
        if self.ptr and self.cuda:
            self.cuda.free(self.ptr)
        self.ptr, self.size = 0, 0
        self.generation += 1
