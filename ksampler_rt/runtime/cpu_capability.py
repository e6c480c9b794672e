"""Which ATen CPU kernel set torch would dispatch to on this machine, without importing torch.

The runtime reproduces a few torch CPU float32 kernels bit for bit (randn's Box-Muller, the ``exp``
of the timestep-embedding frequencies). Those kernels differ between the builds torch compiles
every CPU op for (``DEFAULT``, ``AVX2``, ``AVX512``), so the reproduction has to know which one
torch would pick here.

Reference: PyTorch 2.13 ``aten/src/ATen/native/DispatchStub.cpp`` (``compute_cpu_capability``):

* ``ATEN_CPU_CAPABILITY`` in the environment wins when it names a known capability (``avx512``,
  ``avx2``, ``default``; torch does not check the hardware then);
* otherwise, on x86-64, ``AVX512`` when the CPU has avx512vl, avx512bw, avx512dq and fma,
  else ``AVX2`` when it has avx2 and fma, else ``DEFAULT``;
* every other architecture is ``default`` here (aarch64 builds dispatch the DEFAULT kernels for the
  ops this project reproduces).

``torch.backends.cpu.get_cpu_capability()`` reports the same value; the tests compare the two.
A capability is not always the kernel an op runs: an op registered with plain ``REGISTER_DISPATCH``
(randn's ``normal_stub`` among them) has no AVX512 kernel, and ``AVX512`` falls back to its AVX2 one
(see :func:`.generator.kernel_for_capability`).

Not every torch CPU float32 op goes through those kernels: on x86-64, torch's builds link Intel oneMKL
and its contiguous float32 ``exp``/``sin``/``cos`` call MKL's vector maths (VML, high-accuracy mode;
``aten/src/ATen/cpu/vml.h``). MKL picks its own code path at run time, whatever ATen's capability is
(``ATEN_CPU_CAPABILITY=default`` changes nothing there), and the paths round differently in the last
bit. ``mkl_vml_path`` says which one torch's MKL takes here (observed with torch 2.13's MKL 2024.2):

* Intel CPUs: ``avx512`` with AVX-512 (F, BW, DQ, VL), else ``avx2`` with AVX2 and FMA, else ``sse4_2``;
* other vendors (AMD): ``sse4_2`` (MKL does not take its AVX2/AVX-512 paths on non-Intel CPUs; the
  AVX2-only AMD EPYC machines of this project gave exactly the SSE4.2 path's bits);
* ``MKL_ENABLE_INSTRUCTIONS`` can only lower the path (``SSE4_2``, ``AVX`` -> SSE4.2, ``AVX2``,
  ``AVX512``), as MKL itself documents.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache

__all__ = ["CAPABILITIES", "MKL_VML_PATHS", "aten_capability", "check_capability", "cpu_flags", "cpu_vendor",
           "mkl_vml_path"]

CAPABILITIES = ("default", "avx2", "avx512")
MKL_VML_PATHS = ("sse4_2", "avx2", "avx512")
ENV_ATEN = "ATEN_CPU_CAPABILITY"
ENV_MKL = "MKL_ENABLE_INSTRUCTIONS"
_X86 = ("x86_64", "amd64", "i686", "i386")


@lru_cache(maxsize=None)
def _cpuinfo(field: str) -> str:
    """The first ``field`` line's value in /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo", "r", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """The ``vendor_id`` of /proc/cpuinfo (``GenuineIntel``, ``AuthenticAMD``; empty where there is none)."""
    return _cpuinfo("vendor_id")


def _hardware_capability(machine: str, flags: frozenset) -> str:
    if machine.lower() not in _X86:
        return "default"
    if {"avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def aten_capability() -> str:
    """``"default"``, ``"avx2"`` or ``"avx512"``: the ATen CPU capability torch would use here.

    Read on every call (cheap) so a test may set ``ATEN_CPU_CAPABILITY`` as torch users do.
    """
    env = os.environ.get(ENV_ATEN, "").strip().lower()
    if env in CAPABILITIES:
        return env
    return _hardware_capability(platform.machine(), cpu_flags())


def check_capability(value, name: str = "capability") -> str:
    """Validate a capability argument (None = this machine's)."""
    if value is None:
        return aten_capability()
    if value not in CAPABILITIES:
        raise ValueError(f"{name}: received {value!r}, expected one of {', '.join(map(repr, CAPABILITIES))} or None")
    return value


def _hardware_mkl_path(machine: str, vendor: str, flags: frozenset) -> str | None:
    if machine.lower() not in _X86:
        return None
    if vendor != "GenuineIntel":
        return "sse4_2"
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "sse4_2"


_MKL_ENV_LEVEL = {"sse4_2": "sse4_2", "avx": "sse4_2", "avx2": "avx2", "avx512": "avx512",
                  "avx512_e1": "avx512", "avx512_e2": "avx512", "avx512_e3": "avx512", "avx512_e4": "avx512",
                  "avx512_e5": "avx512"}


def mkl_vml_path() -> str | None:
    """``"sse4_2"``, ``"avx2"`` or ``"avx512"``: the MKL VML code path torch's float32 exp/sin/cos take
    here; None off x86-64 (no MKL there: those ops use ATen's own vector kernels)."""
    path = _hardware_mkl_path(platform.machine(), cpu_vendor(), cpu_flags())
    env = _MKL_ENV_LEVEL.get(os.environ.get(ENV_MKL, "").strip().lower())
    if path is None or env is None:
        return path
    return min(path, env, key=MKL_VML_PATHS.index)
