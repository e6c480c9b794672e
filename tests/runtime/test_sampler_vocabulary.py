"""One float32 vocabulary for the samplers and schedulers (lint-style, on the source).

Helpers that reproduce a torch operation in float32 (torch.linspace, torch.lerp, the half-log-SNR
conversions, expm1-based phi functions, scalar exp / log wrappers) live once, in
``ksampler_rt/runtime/samplers/common.py``. Copies in the sampler modules drifted apart before
(three linspace emulations, float32 ``np.expm1`` against libm ``expm1``), so this test parses the
sampler modules and the schedulers with ``ast`` and fails when one defines its own copy, calls
``np.linspace`` / ``np.expm1`` itself, or re-implements SEEDS-2. It also keeps the registry out of
an import circle: the sampler modules take :class:`SamplerSpec` from ``spec.py``, never from the
registry that imports them.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "ksampler_rt" / "runtime"
SAMPLERS_DIR = PKG / "samplers"
COMMON = SAMPLERS_DIR / "common.py"
# every module that does sampler / scheduler arithmetic, except common.py itself
CHECKED = sorted(p for p in SAMPLERS_DIR.glob("*.py") if p.name != "common.py") + [PKG / "schedulers.py"]

# names (leading underscores stripped) that mean "a private copy of a common.py helper"
VOCABULARY = [
    (re.compile(r"linspace"), "common.torch_linspace"),
    (re.compile(r"lerp"), "common.lerp"),
    (re.compile(r"half_log_snr|log_snr"), "common.sigma_to_half_log_snr / half_log_snr_to_sigma"),
    (re.compile(r"^phi_?\d(_h)?$|^ei_h_phi"), "common.phi1 / phi2 / ei_h_phi_1 / ei_h_phi_2"),
    (re.compile(r"expm1"), "common.expm1 / ei_h_phi_1"),
    (re.compile(r"^(exp|log|sqrt|fma|fma32|f32)$"), "common.exp / log / sqrt / fma32 / f32"),
    (re.compile(r"seeds"), "stochastic.sample_seeds_2 / sample_seeds_3"),
]
# where a SEEDS sampler is allowed to be defined
SEEDS_HOME = {("stochastic.py", "sample_seeds_2"), ("stochastic.py", "sample_seeds_3")}
# numpy calls a sampler must not make itself: ComfyUI's linspaces are torch float32 ones, its expm1s are
# on 0-d tensors (libm), while numpy's float32 expm1 is its own SIMD code (~20 % of values 1+ ulp off)
FORBIDDEN_CALLS = {("np", "linspace"), ("numpy", "linspace"), ("np", "expm1"), ("numpy", "expm1")}


def _common_names() -> set[str]:
    tree = ast.parse(COMMON.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def vocabulary_violations(source: str, filename: str, common_names: set[str], sampler: bool = True) -> list[str]:
    """Every private copy of a common.py helper in ``source`` and, for a sampler module, every forbidden
    numpy call (the schedulers may call np.linspace: ComfyUI's beta scheduler is numpy float64)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            name = getattr(node, "name", None)
            if name is None:
                continue
            bare = name.lstrip("_")
            if (filename, name) in SEEDS_HOME:
                continue
            if bare in common_names:
                found.append(f"{filename}:{node.lineno} defines {name}(), a copy of common.{bare}")
                continue
            for pattern, helper in VOCABULARY:
                if pattern.search(bare):
                    found.append(f"{filename}:{node.lineno} defines {name}(); use {helper}")
                    break
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if sampler and isinstance(owner, ast.Name) and (owner.id, node.func.attr) in FORBIDDEN_CALLS:
                found.append(f"{filename}:{node.lineno} calls {owner.id}.{node.func.attr}; use common.py's helpers")
    return found


def test_common_defines_the_vocabulary_once():
    names = _common_names()
    for helper in ("torch_linspace", "lerp", "sigma_to_half_log_snr", "half_log_snr_to_sigma", "ei_h_phi_1",
                   "ei_h_phi_2", "phi1", "phi2", "exp", "expm1", "log", "sqrt", "fma32"):
        assert helper in names, helper
    defs = [n.name for n in ast.parse(COMMON.read_text()).body if isinstance(n, ast.FunctionDef)]
    assert len(defs) == len(set(defs)), "common.py defines a helper twice"


@pytest.mark.parametrize("path", CHECKED, ids=[p.name for p in CHECKED])
def test_no_private_copy_of_a_common_helper(path):
    sampler = path.parent == SAMPLERS_DIR
    assert vocabulary_violations(path.read_text(), path.name, _common_names(), sampler) == []


@pytest.mark.parametrize("snippet, expected", [
    ("def _lerp(a, b, w):\n    return a + w * (b - a)\n", "copy of common.lerp"),
    ("def _torch_linspace(a, b, n):\n    pass\n", "copy of common.torch_linspace"),
    ("def _linspace_f32(a, b, n):\n    pass\n", "torch_linspace"),
    ("def _half_log_snr(s):\n    pass\n", "half_log_snr"),
    ("def _phi1_h(h):\n    pass\n", "phi1"),
    ("def _phi2(t):\n    pass\n", "copy of common.phi2"),
    ("def _exp(v):\n    pass\n", "copy of common.exp"),
    ("def _neg_expm1_sqrt(v):\n    pass\n", "expm1"),
    ("def _seeds_2_phi2(model, x):\n    pass\n", "sample_seeds_2"),
    ("import numpy as np\nt = np.linspace(0, 1, 5)\n", "np.linspace"),
    ("import numpy as np\ny = np.expm1(np.float32(-0.5))\n", "np.expm1"),
])
def test_the_checker_flags_each_kind_of_copy(snippet, expected):
    """The checker itself: each pattern the review found is caught (so the test above can fail)."""
    found = vocabulary_violations(snippet, "somesampler.py", _common_names())
    assert len(found) == 1 and expected in found[0], found


def test_sample_seeds_2_lives_in_stochastic_only():
    homes = {(p.name, n.name) for p in CHECKED for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.FunctionDef) and "seeds" in n.name}
    assert homes == SEEDS_HOME


def test_exp_heun_samplers_call_seeds_2():
    """ComfyUI's exp_heun_2_x0(_sde) are sample_seeds_2(r=1, solver_type="phi_2"); so are ours."""
    tree = ast.parse((SAMPLERS_DIR / "classic.py").read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("sample_exp_heun")):
        calls = [c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
        assert calls == ["sample_seeds_2"], (fn.name, calls)


def _imported_modules(path: Path) -> set[str]:
    """The module paths ``path`` imports from, at any depth (function bodies too), relative ones with
    their leading dots: ``.spec``, ``.samplers.common``, ``numpy``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.update([base] if node.module else [base + a.name for a in node.names])
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_import_circle_through_the_registry():
    """registry imports the sampler modules; none of them (nor spec / common, nor the schedulers)
    imports the registry back, and spec / common import no sampler module."""
    for path in CHECKED + [COMMON]:
        if path.name in ("registry.py", "__init__.py"):
            continue
        assert not [m for m in _imported_modules(path) if m.endswith("registry")], path.name
    for path in (SAMPLERS_DIR / "spec.py", COMMON):
        # a sampler module is a sibling (".x"); runtime modules above ("..fused_jit") are allowed
        assert not [m for m in _imported_modules(path) if m.startswith(".") and not m.startswith("..")], path.name
