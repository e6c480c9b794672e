"""What a backend is: the ``Backend`` base class and the two jobs it is handed (build, make an engine).

A backend object answers every question the loader, the builder, the cache, the CLI, the server and the
benchmarks used to answer with ``if backend == "..."``: whether it can run here (and why not), which
machine and software facts its artefacts depend on (the cache key's environment), how it turns an
export's ONNX file into a cached artefact, how it makes an ``Engine`` of that artefact, and whether it
runs on the CPU or a CUDA device. One module of ``ksampler_rt.engines.backends`` holds one backend
(a module-level ``BACKEND``); see docs/engines.md, "Adding a backend".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..envinfo import cpu_info, gpu_info
from ..spec import EngineError

if TYPE_CHECKING:  # types only: build.py and loader.py import this package
    from ..base import Engine
    from ..build import BuildOptions
    from ..cache import EngineCache
    from ..loader import LoadOptions
    from ..manifest import ExportManifest, ModelEntry
    from ..profiles import ProfileRequest

DEVICE_TYPES = ("cpu", "cuda")
NO_GPU = {"gpu": None, "compute_capability": None, "driver": None, "cuda": None, "nvidia_driver": None}


@dataclass(frozen=True)
class BuildJob:
    """Everything ``Backend.builder`` needs to build the artefact of one model."""

    manifest: "ExportManifest"
    entry: "ModelEntry"
    options: "BuildOptions"
    precision: str
    profiles: list  # [ShapeProfile]; empty unless the backend is shape-bound or shapes were asked for
    env: dict  # this machine, as ``Backend.environment`` reported it (with "backend")
    cache: "EngineCache"


@dataclass(frozen=True)
class LoadJob:
    """Everything ``Backend.make_engine`` needs to make the engine of one model from its cached artefact."""

    entry: "ModelEntry"
    artefact: Path
    profiles: list  # [ShapeProfile]
    request: "ProfileRequest | None"
    export_dir: str
    options: "LoadOptions"
    cache: "EngineCache"
    shared: object = None  # what ``Backend.open_set`` returned for this EngineSet


class Backend:
    """One way of running an export's models. Subclass it in one module of ``engines/backends/`` and
    assign an instance to the module's ``BACKEND``; the registry finds it.

    Class attributes (override as needed):

    * ``name``: the ``--backend`` value, e.g. ``"onnxruntime-cpu"``.
    * ``device_type``: ``"cpu"`` or ``"cuda"`` (what ``/system_stats`` reports; a ``"cuda"`` backend
      refuses to build on a machine without an NVIDIA GPU).
    * ``order``: position in listings (``BACKENDS``, ``--backend`` choices, ``available_backends()``).
    * ``auto_priority``: ``backend="auto"`` tries available backends by ascending priority; ``None``:
      never picked by auto (only when named).
    * ``shape_bound``: the artefact is built for shape profiles (TensorRT): a shape request is always
      made (defaults filled in) and the profiles are part of the cache key. Otherwise the artefact accepts
      any shape and profiles only restrict the engine at load time.
    * ``builds_on_load``: ``load_engines`` builds a missing artefact by default (seconds); ``False`` when a
      build takes minutes, so the user runs ``ksampler-rt build`` once on purpose.
    * ``supports_refit``: a refittable build exists (``--refit``, weights swapped without a rebuild).
    * ``runtime``: the library's name in messages (``"ONNX Runtime"``).
    """

    name: str = ""
    device_type: str = "cpu"
    order: int = 100
    auto_priority: int | None = None
    shape_bound: bool = False
    builds_on_load: bool = True
    supports_refit: bool = False
    runtime: str = ""

    # --- here or not ----------------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """None when this backend can run on this machine, else why not (with the install command)."""
        raise NotImplementedError

    def environment(self, device_id: int = 0) -> dict:
        """The machine and software facts a built artefact depends on: they are part of its cache key, and
        an entry whose facts differ from this machine's is never loaded. Keys are the library versions and
        ``cpu_facts()`` or ``gpu_facts()``; ``"backend"`` is added by the registry."""
        raise NotImplementedError

    # --- building -------------------------------------------------------------------------------------
    def resolve_precision(self, export_precision: str, requested: str | None) -> str:
        """The precision the artefact is built in. By default the export's own (the graph runs as exported),
        and asking for another one is an error saying how to get it."""
        p = requested or export_precision
        if p != export_precision:
            raise EngineError(f"precision: received {p!r}, expected the export's own precision "
                              f"{export_precision!r} ({self.runtime or self.name} runs the export's own "
                              f"precision); to get {p}, re-export with `--precision {p}` or use "
                              f"--backend tensorrt")
        return p

    def key_options(self, options: "BuildOptions") -> dict:
        """Build options that change the artefact (part of the cache key); none by default."""
        return {}

    def export_key(self, manifest: "ExportManifest") -> dict:
        """Facts of the export (beyond its weights hash and file) that change the artefact, added to the key's
        ``options`` (TensorRT: the exporter revision); none by default."""
        return {}

    def model_precision(self, precision: str, entry: "ModelEntry", manifest: "ExportManifest") -> str:
        """The precision ``entry`` is built in, given the set's ``precision`` (the cache key records it); the
        same by default."""
        return precision

    def check_build(self, env: dict) -> None:
        """Refuse to build on this machine, before anything is built (a CUDA backend without a GPU)."""
        if self.device_type == "cuda" and not env.get("gpu"):
            raise EngineError(f"--backend {self.name} needs an NVIDIA GPU and none was found "
                              f"(use --backend onnxruntime-cpu)")

    def builder(self, job: BuildJob) -> Callable[[Path], dict]:
        """A function ``build(tmp_dir) -> {"artefact": file name, ...}`` writing the artefact files into
        ``tmp_dir`` (the cache checksums and publishes them). Missing libraries are reported here, before
        the build starts."""
        raise NotImplementedError

    # --- loading --------------------------------------------------------------------------------------
    def lookup_options(self, options: "BuildOptions", load: "LoadOptions") -> list["BuildOptions"]:
        """The build options whose cached artefacts ``load_engines`` accepts, best first; the first one is
        what it builds when none is cached."""
        return [options]

    def open_set(self, load: "LoadOptions") -> object:
        """State shared by the engines of one ``EngineSet`` (e.g. TensorRT's activation scratch); None."""
        return None

    def make_engine(self, job: LoadJob) -> "Engine":
        """The (not yet loaded) engine running ``job.artefact``."""
        raise NotImplementedError

    # --- benchmarks -----------------------------------------------------------------------------------
    def bench_variants(self, cores: int) -> list[tuple[str, dict]]:
        """``[(label, LoadOptions fields)]`` worth timing against each other (``bench/engines.py``)."""
        if self.device_type == "cuda":
            return [("cuda-graph", {"cuda_graph": True}), ("no-graph", {"cuda_graph": False})]
        return [(f"threads={cores}", {"threads": cores}), ("threads=1", {"threads": 1})]

    # --- helpers for subclasses -----------------------------------------------------------------------
    @staticmethod
    def cpu_facts() -> dict:
        """CPU model, architecture and the ISA flags optimized layouts depend on."""
        return dict(cpu_info())

    @staticmethod
    def gpu_facts(device_id: int = 0) -> dict:
        """GPU name, compute capability, driver and CUDA versions (all None without a GPU)."""
        return dict(gpu_info(device_id) or NO_GPU)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.device_type})>"


def check_backend(backend: object) -> None:
    """Raise when ``backend`` does not satisfy the interface (the registry calls it on ``register``)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: received {type(backend).__name__}, expected a Backend instance")
    if not isinstance(backend.name, str) or not backend.name or backend.name == "auto":
        raise EngineError(f"backend.name: received {backend.name!r}, expected a non-empty name other than 'auto'")
    if backend.device_type not in DEVICE_TYPES:
        raise EngineError(f"{backend.name}.device_type: received {backend.device_type!r}, expected one of "
                          f"{', '.join(DEVICE_TYPES)}")
    if backend.auto_priority is not None and not isinstance(backend.auto_priority, int):
        raise EngineError(f"{backend.name}.auto_priority: received {backend.auto_priority!r}, expected an int "
                          f"or None")
    for method in ("unavailable_reason", "environment", "builder", "make_engine"):
        if getattr(type(backend), method) is getattr(Backend, method):
            raise EngineError(f"{backend.name}: received a backend without {method}(), expected every method "
                              f"of ksampler_rt.engines.backends.Backend that raises NotImplementedError to be "
                              f"implemented")
