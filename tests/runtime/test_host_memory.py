"""glibc allocator thresholds (ksampler_rt.runtime.host_memory): counted in page faults, not seconds."""
import json
import subprocess
import sys

import pytest

from ksampler_rt.runtime import host_memory

# A fresh process runs 200 "steps", each holding a few numpy temporaries of 512 KB (two [1,4,128,128]
# latents) at once and freeing them, as a CFG sampling step does, and reports the minor page faults the
# loop cost. With glibc's defaults the freed top of the heap exceeds the (dynamic) trim threshold and is
# returned to the system every step, so the next step faults its pages in again.
_PROBE = r"""
import json, resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from ksampler_rt.runtime.host_memory import tune_host_allocator
    assert tune_host_allocator()
x = np.ones((2, 4, 128, 128), np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    a = x * 2.0
    b = a - x
    c = b * 0.5
    d = c + a
    del a, b, c, d
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"faults": after - before}))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True,
                         env={"KSAMPLER_RT_MALLOC_TUNING": "1", "PATH": "/usr/bin:/bin"}).stdout
    return json.loads(out.strip().splitlines()[-1])["faults"]


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")


@glibc_only
def test_tuned_allocator_reuses_freed_temporaries():
    # glibc defaults: the freed heap top is trimmed every step and faulted in again
    plain = _faults("plain")
    tuned = _faults("tuned")
    assert plain > 200 * 100, plain  # hundreds of pages per step
    assert tuned < 2000, tuned       # the first step's pages, then reuse


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv("KSAMPLER_RT_MALLOC_TUNING", "0")
    assert host_memory.tune_host_allocator() is False
    monkeypatch.setattr(host_memory, "_applied", None)


def test_child_environment_matches_the_thresholds():
    env = host_memory.allocator_env()
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) == host_memory.MMAP_THRESHOLD == 32 << 20
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) == host_memory.TRIM_THRESHOLD
