"""The backends, one module each, and the registry everything else iterates over.

Every module of this package whose name does not start with ``_`` (and is not ``base``) is imported the
first time the registry is asked anything, and its module-level ``BACKEND`` (a :class:`Backend`) is
registered: adding a backend is adding one file here (docs/engines.md, "Adding a backend"). Code that
defines a backend elsewhere (a plugin, a test) calls :func:`register`.

    from ksampler_rt.engines.backends import get_backend, registered
    get_backend("openvino-cpu").device_type      # "cpu"
    [b.name for b in registered()]               # listing order
"""
from __future__ import annotations

import importlib
import pkgutil
import threading

from ..spec import EngineError
from .base import Backend, BuildJob, LoadJob, check_backend

__all__ = ["Backend", "BuildJob", "LoadJob", "auto_order", "available_backends", "backend_names",
           "device_type", "environment", "get_backend", "pick_backend", "register", "registered", "unregister"]

_REGISTRY: dict[str, Backend] = {}
_LOCK = threading.RLock()
_discovered = False


def _discover() -> None:
    """Import this package's backend modules once and register their ``BACKEND``."""
    global _discovered
    if _discovered:
        return
    with _LOCK:
        if _discovered:
            return
        for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if mod.name.startswith("_") or mod.name == "base":
                continue
            module = importlib.import_module(f"{__name__}.{mod.name}")
            backend = getattr(module, "BACKEND", None)
            if backend is None:
                raise EngineError(f"{module.__name__}: received a backend module without BACKEND, expected "
                                  f"BACKEND = <a Backend instance> (or a name starting with '_' for a helper)")
            if _REGISTRY.get(backend.name) is not backend:
                _register(backend, replace=False)
        _discovered = True


def _register(backend: Backend, replace: bool) -> Backend:
    check_backend(backend)
    if backend.name in _REGISTRY and not replace:
        raise EngineError(f"register: received a second backend named {backend.name!r}, expected a new name "
                          f"(or replace=True)")
    _REGISTRY[backend.name] = backend
    return backend


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Add ``backend`` to the registry (after checking it satisfies the interface); returns it."""
    with _LOCK:
        _discover()
        return _register(backend, replace)


def unregister(name: str) -> Backend:
    """Remove and return the backend called ``name``."""
    with _LOCK:
        _discover()
        if name not in _REGISTRY:
            raise EngineError(f"unregister: received {name!r}, expected one of {', '.join(_REGISTRY)}")
        return _REGISTRY.pop(name)


def registered() -> tuple[Backend, ...]:
    """Every registered backend, in listing order."""
    _discover()
    with _LOCK:
        return tuple(sorted(_REGISTRY.values(), key=lambda b: (b.order, b.name)))


def backend_names() -> tuple[str, ...]:
    """The ``--backend`` values (without ``auto``), in listing order."""
    return tuple(b.name for b in registered())


def auto_order() -> tuple[str, ...]:
    """The backends ``backend="auto"`` tries, first choice first."""
    return tuple(b.name for b in sorted((b for b in registered() if b.auto_priority is not None),
                                        key=lambda b: (b.auto_priority, b.order, b.name)))


def get_backend(name: str) -> Backend:
    """The backend called ``name``; an unknown name is an error listing the known ones."""
    _discover()
    with _LOCK:
        backend = _REGISTRY.get(name)
    if backend is None:
        raise EngineError(f"backend: received {name!r}, expected auto or one of {', '.join(backend_names())}")
    return backend


def available_backends() -> dict[str, str | None]:
    """{backend: None if usable here, else the reason it is not}, in listing order."""
    return {b.name: b.unavailable_reason() for b in registered()}


def pick_backend(backend: str) -> str:
    """``backend`` itself when it is usable here, or for ``"auto"`` the first usable one of
    :func:`auto_order`; anything else is an error saying why."""
    if backend == "auto":
        reasons = {}
        for name in auto_order():
            why = get_backend(name).unavailable_reason()
            if why is None:
                return name
            reasons[name] = why
        raise EngineError("backend: received 'auto', expected at least one usable backend, and none is: "
                          + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    why = get_backend(backend).unavailable_reason()
    if why:
        raise EngineError(f"backend {backend} is not available: {why}")
    return backend


def device_type(backend: str) -> str:
    """``"cpu"`` or ``"cuda"``: where ``backend`` runs (``"cpu"`` for ``"auto"`` or an unknown name, which
    run nothing)."""
    try:
        return get_backend(backend).device_type
    except EngineError:
        return "cpu"


def environment(backend: str, device: int = 0) -> dict:
    """The part of a cache key that says which machine and software a build of ``backend`` is valid for."""
    b = get_backend(backend)
    env = dict(b.environment(device))
    env["backend"] = b.name
    return env
