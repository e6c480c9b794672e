"""The runtime must drive engines without torch: importing it may not load torch, export or engines."""
import subprocess
import sys


def test_runtime_imports_without_torch():
    code = (
        "import sys, ksampler_rt.runtime as rt\n"
        "from ksampler_rt.runtime import (Model, ksampler, ksampler_advanced, prepare_noise, calculate_sigmas,"
        " SAMPLER_NAMES, SCHEDULER_NAMES)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'ksampler_rt.export', 'ksampler_rt.engines'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing ksampler_rt.runtime loaded: {out.stdout.strip()}"


def test_public_names_are_comfyui_ordered_tuples():
    from ksampler_rt.runtime import SAMPLER_NAMES, SCHEDULER_NAMES

    assert isinstance(SAMPLER_NAMES, tuple) and isinstance(SCHEDULER_NAMES, tuple)
    assert SAMPLER_NAMES[:4] == ("euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp")
    assert SAMPLER_NAMES[-3:] == ("ddim", "uni_pc", "uni_pc_bh2")
    assert SCHEDULER_NAMES == ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                               "normal", "linear_quadratic", "kl_optimal")


# ---------------------------------------------------------------------------------------------
# the runtime's import graph: one way only, and modules of one job each
# ---------------------------------------------------------------------------------------------
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

RUNTIME = Path(__file__).resolve().parents[2] / "ksampler_rt" / "runtime"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = ("ksampler_rt", "runtime") + path.relative_to(RUNTIME).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_modules() -> dict:
    return {_module_name(p): p for p in sorted(RUNTIME.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict) -> set:
    """Runtime modules ``name`` imports, at any level (function-level imports included).
    ``from P import x`` counts as importing P.x when that is a module, else P."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, tuple(a.name for a in node.names))]
        else:
            continue
        for base, names in targets:
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            found.update(subs)
            if not names or len(subs) < len(names):  # a plain import, or names from the module
                found.add(base)
    found.discard(name)
    return {m for m in found if m in modules}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_parser_sees_cycles_and_function_level_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    mods = {"ksampler_rt.runtime.x": None, "ksampler_rt.runtime.y": None, "ksampler_rt.runtime": None}
    src = tmp_path / "x.py"
    src.write_text("import numpy\nfrom . import y\n\ndef f():\n    from .y import thing\n    from . import z\n")
    assert _imports("ksampler_rt.runtime.x", src, mods) == {"ksampler_rt.runtime.y", "ksampler_rt.runtime"}


def test_runtime_has_no_import_cycles():
    modules = _runtime_modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["ksampler_rt.runtime.noise_sources"] >= {"ksampler_rt.runtime.generator",
                                                         "ksampler_rt.runtime.brownian"}
    assert _cycles(graph) == []


def test_noise_stack_is_layered():
    """numpy reference maths <- compiled kernels <- generators <- noise sources: no layer imports
    one above it."""
    modules = _runtime_modules()
    order = ["randn_reference", "randn_numpy", "_jit_kernels", "jit", "generator", "brownian", "lookahead",
             "noise_sources", "noise"]
    names = [f"ksampler_rt.runtime.{m}" for m in order]
    for i, name in enumerate(names):
        above = set(names[i + 1:])
        assert not (_imports(name, modules[name], modules) & above), name


def test_runtime_modules_stay_small():
    lines = {name: len(path.read_text().splitlines()) for name, path in _runtime_modules().items()}
    too_long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert too_long == {}, f"runtime modules over {MAX_LINES} lines: {too_long}"
