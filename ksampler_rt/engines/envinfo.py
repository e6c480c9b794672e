"""Machine facts a built engine is tied to: GPU, driver, CUDA, library versions, CPU (each backend picks its own).

Everything here is best effort and cheap; nothing imports torch. GPU facts come from cuda-python,
then cupy, then ``nvidia-smi``; a value that cannot be read is ``None`` (and so is part of the key).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import platform
import shutil
import subprocess


def module_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return getattr(importlib.import_module(name), "__version__", None)
    except Exception:  # a broken install is "not available"
        return None


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """CPU model and the ISA flags ONNX Runtime's optimized layouts depend on (NCHWc block size)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
    have = sorted(set(flags.split()) & set(wanted))
    return {"cpu": name, "arch": platform.machine(), "isa": ",".join(have)}


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python
        return cudart
    except ImportError:
        return None


def _fmt_cuda_version(v: int | None) -> str | None:
    return None if not v else f"{v // 1000}.{(v % 1000) // 10}"


@functools.lru_cache(maxsize=8)
def gpu_info(device: int = 0) -> dict | None:
    """{'gpu', 'compute_capability', 'driver', 'cuda'} of ``device``, or None without a GPU."""
    cudart = _cudart()
    if cudart is not None:
        try:
            err, n = cudart.cudaGetDeviceCount()
            if int(err) == 0 and n > device:
                err, prop = cudart.cudaGetDeviceProperties(device)
                name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
                _, drv = cudart.cudaDriverGetVersion()
                _, rt = cudart.cudaRuntimeGetVersion()
                return {"gpu": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}",
                        "driver": _fmt_cuda_version(drv), "cuda": _fmt_cuda_version(rt),
                        "nvidia_driver": _smi_driver()}
            if int(err) == 0:
                return None
        except Exception:
            pass
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            n = cupy.cuda.runtime.getDeviceCount()
            if n > device:
                p = cupy.cuda.runtime.getDeviceProperties(device)
                return {"gpu": p["name"].decode().strip("\x00 "),
                        "compute_capability": f"{p['major']}.{p['minor']}",
                        "driver": _fmt_cuda_version(cupy.cuda.runtime.driverGetVersion()),
                        "cuda": _fmt_cuda_version(cupy.cuda.runtime.runtimeGetVersion()),
                        "nvidia_driver": _smi_driver()}
            return None
        except Exception:
            pass
    return _smi_gpu(device)


def _smi(query: str) -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def _smi_driver() -> str | None:
    rows = _smi("driver_version")
    return rows[0] if rows else None


def _smi_gpu(device: int) -> dict | None:
    rows = _smi("name,compute_cap,driver_version")
    if not rows or len(rows) <= device:
        return None
    name, cc, drv = (s.strip() for s in (rows[device].split(",") + ["", "", ""])[:3])
    return {"gpu": name, "compute_capability": cc or None, "driver": None, "cuda": None,
            "nvidia_driver": drv or None}


def openvino_version() -> str | None:
    """OpenVINO's full build string (``2026.4.1-22982-...``), None when it is not installed."""
    if importlib.util.find_spec("openvino") is None:
        return None
    try:
        import openvino

        return openvino.get_version()
    except Exception:  # a broken install is "not available"
        return None


def environment(backend: str, device: int = 0) -> dict:
    """The part of a cache key that says which machine and software a build of ``backend`` is valid for.

    Each backend says it (``Backend.environment``); this is :func:`ksampler_rt.engines.backends.environment`,
    kept here for callers of earlier versions (imported on call: the backends use this module's facts)."""
    from .backends import environment as backend_environment

    return backend_environment(backend, device)


def short_hash(data: bytes, n: int = 16) -> str:
    return hashlib.sha256(data).hexdigest()[:n]
