"""Which torch CPU kernels the runtime reproduces: ATen's dispatch capability and MKL's VML code path,
checked against the torch installed here (in-process, and in subprocesses under torch's and MKL's own
environment switches, so every path this CPU can run is covered on one machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ksampler_rt.runtime import conditioning as C
from ksampler_rt.runtime import cpu_capability as cc

AVX512 = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"})
AVX2 = frozenset({"avx2", "fma", "sse4_2"})


@pytest.mark.parametrize("machine, flags, expected", [
    ("x86_64", AVX512, "avx512"),
    ("x86_64", AVX2, "avx2"),
    ("x86_64", frozenset({"avx2"}), "default"),          # AVX2 without FMA: torch stays on DEFAULT
    ("x86_64", frozenset({"sse4_2"}), "default"),
    ("aarch64", AVX512, "default"),
])
def test_hardware_capability_rules(machine, flags, expected):
    assert cc._hardware_capability(machine, flags) == expected


@pytest.mark.parametrize("vendor, flags, expected", [
    ("GenuineIntel", AVX512, "avx512"),
    ("GenuineIntel", AVX2, "avx2"),
    ("GenuineIntel", frozenset({"sse4_2"}), "sse4_2"),
    ("AuthenticAMD", AVX512, "sse4_2"),   # MKL keeps its AVX2/AVX-512 paths for Intel CPUs
    ("AuthenticAMD", AVX2, "sse4_2"),
])
def test_hardware_mkl_path_rules(vendor, flags, expected):
    assert cc._hardware_mkl_path("x86_64", vendor, flags) == expected
    assert cc._hardware_mkl_path("aarch64", vendor, flags) is None


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert cc.aten_capability() == "default"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    assert cc.aten_capability() == "avx2"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "bogus")  # torch ignores unknown values, and so do we
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    hw = cc.mkl_vml_path()
    if hw is None:
        pytest.skip("no MKL code path off x86-64")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
    assert cc.mkl_vml_path() == "sse4_2"
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX512")  # can only lower
    assert cc.mkl_vml_path() == hw


def test_check_capability():
    assert cc.check_capability("avx2") == "avx2"
    assert cc.check_capability(None) == cc.aten_capability()
    with pytest.raises(ValueError, match=r"capability: received 'neon', expected"):
        cc.check_capability("neon")


def test_aten_capability_matches_torch():
    torch = pytest.importorskip("torch")
    assert cc.aten_capability() == torch.backends.cpu.get_cpu_capability().lower()


_PROBE = (
    "import json, math, torch\n"
    "e = -math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128\n"
    "print(json.dumps({'cap': torch.backends.cpu.get_cpu_capability().lower(),"
    " 'freqs': torch.exp(e).numpy().view('int32').tolist()}))\n"
)


def _torch_in_subprocess(**env) -> dict:
    pytest.importorskip("torch")
    full = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_ORDER = ("default", "avx2", "avx512")


@pytest.mark.parametrize("capability", _ORDER)
def test_aten_capability_env_matches_torch(capability, monkeypatch):
    hw = cc._hardware_capability(os.uname().machine, cc.cpu_flags())
    if _ORDER.index(capability) > _ORDER.index(hw):
        pytest.skip(f"ATen's {capability} kernels need a CPU this one is not (it runs {hw})")
    got = _torch_in_subprocess(ATEN_CPU_CAPABILITY=capability)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    assert got["cap"] == capability == cc.aten_capability()


@pytest.mark.parametrize("path", cc.MKL_VML_PATHS)
def test_embedding_frequencies_per_mkl_path(path, monkeypatch):
    """Each MKL path's table is bit-identical with torch's exp on that path (MKL_ENABLE_INSTRUCTIONS
    lowers MKL's path, so a machine checks its own path and every lower one)."""
    hw = cc.mkl_vml_path()
    if hw is None:
        pytest.skip("no MKL on this architecture: torch's exp is ATen's own kernel here")
    if cc.MKL_VML_PATHS.index(path) > cc.MKL_VML_PATHS.index(hw):
        pytest.skip(f"MKL's {path} path needs an Intel CPU with {path.upper()}; this {cc.cpu_vendor() or 'CPU'} "
                    f"runs MKL's {hw} path")
    env_value = {"sse4_2": "SSE4_2", "avx2": "AVX2", "avx512": "AVX512"}[path]
    got = np.asarray(_torch_in_subprocess(MKL_ENABLE_INSTRUCTIONS=env_value)["freqs"], dtype=np.int32).view(np.float32)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", env_value)
    assert cc.mkl_vml_path() == path
    assert np.array_equal(C.frequencies(128), got)
    assert np.array_equal(C.frequencies(128, mkl_path=path), got)
    # MKL's high-accuracy exp stays within 1 ulp of the correctly rounded value on every path
    exact = C.frequencies(128, mkl_path=None)
    assert np.abs(got.view(np.int32).astype(np.int64) - exact.view(np.int32)).max() == 1
