"""The package and the tests carry no unused imports or variables, undefined names or syntax errors
(ruff's pyflakes rules F and E9), so dead code cannot pile up between stops."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (it is in the [test] extra)")
    return [exe]


def test_pyflakes_clean():
    res = subprocess.run(_ruff() + ["check", "--select", "F,E9", "--output-format", "concise", "--no-cache",
                                    "ksampler_rt", "tests", "examples"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
