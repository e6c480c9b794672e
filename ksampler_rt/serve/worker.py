"""The execution side of the server: "run one prompt, stream its events back".

The server talks to a :class:`Worker` only through :meth:`Worker.run`, whose arguments and results
are plain JSON-able data (plus ``bytes`` preview frames), so the in-process :class:`LocalWorker`
can later be swapped for a remote one (e.g. a Ray Serve deployment, ``--workers ray``) that
streams the same events over the wire.

Events passed to ``on_event(kind, data)`` are ComfyUI's node-level WebSocket messages:
``execution_cached``, ``executing`` (never the final ``node: null``: the server sends that once the
prompt's history is stored), ``progress``, ``executed``, and ``preview`` whose ``data`` is a
ready-to-send binary WebSocket frame. A run ends by returning a :class:`RunResult`, or by raising
:class:`PromptInterrupted` or :class:`PromptExecutionError`; both carry JSON-able details.
"""
from __future__ import annotations

import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

EventSink = Callable[[str, Any], None]

# Nodes whose time is "sampling": their progress events count as sampling steps.
SAMPLER_CLASSES = frozenset({"KSampler", "KSamplerAdvanced"})


@dataclass
class RunResult:
    """What a finished prompt produced."""

    outputs: dict[str, dict] = field(default_factory=dict)   # node id -> ComfyUI ui dict ({"images": [...]})
    node_seconds: list[tuple[str, str, float]] = field(default_factory=list)  # (node id, class, seconds)
    sampling: list[tuple[str, int, float]] = field(default_factory=list)      # (node id, steps, seconds)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0
    engine_batches: list[tuple[int, int]] = field(default_factory=list)  # (rows, prompts) of UNet calls it led
    batch_wait_s: float = 0.0   # seconds its UNet calls waited for partners (step-level batching)


class PromptExecutionError(Exception):
    """A prompt failed; ``details`` is the body of ComfyUI's ``execution_error`` message."""

    def __init__(self, details: dict, outputs: dict | None = None):
        super().__init__(details.get("exception_message", "execution failed"))
        self.details = details
        self.outputs = outputs or {}

    def __reduce__(self):  # picklable for remote workers
        return (type(self), (self.details, self.outputs))


class PromptInterrupted(Exception):
    """A prompt was interrupted; ``details`` is the body of ``execution_interrupted``."""

    def __init__(self, details: dict, outputs: dict | None = None):
        super().__init__("interrupted")
        self.details = details
        self.outputs = outputs or {}

    def __reduce__(self):
        return (type(self), (self.details, self.outputs))


class Worker(Protocol):
    """Executes prompts. ``concurrency``: how many ``run`` calls the server makes at once (each from its
    own thread, each prompt with its own ``on_event`` and ``is_interrupted``); 1 means one at a time, and a
    worker above 1 must be thread-safe (``free`` may then also overlap a running prompt)."""

    concurrency: int

    def run(self, prompt_id: str, prompt: dict, extra_data: dict, on_event: EventSink,
            is_interrupted: Callable[[], bool]) -> RunResult: ...

    def free(self, unload_models: bool = False, free_memory: bool = False) -> None: ...

    def close(self) -> None: ...


# -- a node-output cache bounded by memory ---------------------------------------------------------
def estimate_nbytes(value: Any, _depth: int = 0) -> int:
    """Bytes held by the numpy arrays inside a node output (models and engines count as 0: the
    pipeline keeps them loaded anyway)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if _depth > 6:
        return 0
    if isinstance(value, Mapping):
        return sum(estimate_nbytes(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(estimate_nbytes(v, _depth + 1) for v in value)
    return 0


class BoundedOutputCache:
    """The executor's node-output cache (same ``get`` / ``put`` / ``clear`` as
    ``workflow.executor.OutputCache``), LRU-bounded by entry count and by array bytes."""

    def __init__(self, max_bytes: int = 1 << 30, max_entries: int = 256):
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: str, value) -> None:
        size = estimate_nbytes(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if size > self.max_bytes or self.max_entries <= 0:
                return
            self._entries[key] = (value, size)
            self.nbytes += size
            while self._entries and (self.nbytes > self.max_bytes or len(self._entries) > self.max_entries):
                _, (_, evicted) = self._entries.popitem(last=False)
                self.nbytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)


# -- the in-process worker ---------------------------------------------------------------------------
def _type_name(exc: BaseException) -> str:
    module = type(exc).__module__
    name = type(exc).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def _current_inputs(prompt: Mapping, node_id: str | None) -> dict:
    """ComfyUI sends the failing node's inputs (formatted); here: its literal values and links."""
    node = prompt.get(node_id) if node_id is not None else None
    if not isinstance(node, Mapping):
        return {}
    out = {}
    for name, value in (node.get("inputs") or {}).items():
        out[name] = [value] if isinstance(value, (str, int, float, bool)) or value is None else [repr(value)]
    return out


class LocalWorker:
    """Runs prompts in this process through a loaded :class:`~ksampler_rt.workflow.pipeline.Pipeline`:
    engines stay loaded between prompts and node outputs of an unchanged graph prefix are reused.

    ``concurrency``: prompts run at once, each on its own thread (default 1). Above 1 the pipeline should
    batch (``Pipeline(max_batch=...)``): the prompts' UNet calls then meet at its gather point
    (:mod:`ksampler_rt.runtime.batching`) and are merged into one engine call per step. ``free`` waits for
    the running prompts before unloading anything."""

    def __init__(self, pipeline, *, cache_bytes: int = 1 << 30, cache_entries: int = 256,
                 preview: bool = False, preview_size: int = 512, concurrency: int = 1):
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency: received {concurrency!r}, expected a positive integer")
        self.pipeline = pipeline
        self.cache = BoundedOutputCache(cache_bytes, cache_entries)
        self.preview = preview
        self.preview_size = preview_size
        self.concurrency = concurrency
        self._gate = threading.Condition()
        self._running = 0
        self._freeing = False

    def run(self, prompt_id: str, prompt: dict, extra_data: dict, on_event: EventSink,
            is_interrupted: Callable[[], bool]) -> RunResult:
        with self._gate:
            while self._freeing:
                self._gate.wait()
            self._running += 1
        try:
            return self._run(prompt_id, prompt, extra_data, on_event, is_interrupted)
        finally:
            with self._gate:
                self._running -= 1
                self._gate.notify_all()

    def _run(self, prompt_id: str, prompt: dict, extra_data: dict, on_event: EventSink,
             is_interrupted: Callable[[], bool]) -> RunResult:
        from ..runtime.batching import Withdrawn, run_scope
        from ..workflow.executor import Interrupted

        start = time.perf_counter()
        state: dict[str, Any] = {"current": None, "t": start}
        executed: list[str] = []
        outputs: dict[str, dict] = {}
        result = RunResult()
        steps: dict[str, list] = {}   # node id -> [count, first progress time, last progress time]
        plan_prompt = prompt

        def close_current(now: float) -> None:
            node = state["current"]
            if node is not None:
                executed.append(node)
                class_type = plan_prompt[node]["class_type"]
                result.node_seconds.append((node, class_type, now - state["t"]))
                if node in steps and class_type in SAMPLER_CLASSES:
                    result.sampling.append((node, steps[node][0], now - state["t"]))
            state["current"] = None

        def sink(kind: str, data: dict) -> None:
            now = time.perf_counter()
            if kind == "executing":
                close_current(now)
                if data.get("node") is None:
                    return  # the server sends the final "executing: null" after storing history
                state["current"], state["t"] = data["node"], now
            elif kind == "execution_cached":
                executed.extend(data.get("nodes", []))
                result.cached = list(data.get("nodes", []))
            elif kind == "progress":
                entry = steps.setdefault(data.get("node"), [0, now, now])
                entry[0] += 1
                entry[2] = now
            elif kind == "executed":
                outputs[data["node"]] = data.get("output")
            on_event(kind, data)

        on_step = self._previewer(plan_prompt, on_event) if self.preview else None
        try:
            plan = self.pipeline.prepare(prompt)
            plan_prompt = plan.prompt
            with run_scope(is_interrupted) as batching:   # this prompt's seat at the UNet gather point
                try:
                    self.pipeline.run_workflow(plan, prompt_id=prompt_id,
                                               extra_pnginfo=extra_data.get("extra_pnginfo"), on_event=sink,
                                               on_step=on_step, is_interrupted=is_interrupted, cache=self.cache)
                finally:
                    result.engine_batches = list(batching.engine_calls)
                    result.batch_wait_s = batching.wait_s
        except (Interrupted, Withdrawn):
            node = state["current"]
            raise PromptInterrupted({
                "prompt_id": prompt_id, "node_id": node,
                "node_type": plan_prompt[node]["class_type"] if node in plan_prompt else None,
                "executed": list(executed)}, outputs) from None
        except Exception as exc:  # noqa: BLE001 -- any failure of one prompt is reported, never raised further
            node = state["current"]
            raise PromptExecutionError({
                "prompt_id": prompt_id, "node_id": node,
                "node_type": plan_prompt[node]["class_type"] if isinstance(plan_prompt, Mapping)
                and node in plan_prompt else None,
                "executed": list(executed),
                "exception_message": str(exc) or type(exc).__name__,
                "exception_type": _type_name(exc),
                "traceback": traceback.format_tb(exc.__traceback__),
                "current_inputs": _current_inputs(plan_prompt, node) if isinstance(plan_prompt, Mapping) else {},
                "current_outputs": list(executed),
            }, outputs) from None
        close_current(time.perf_counter())
        result.outputs = outputs
        result.seconds = time.perf_counter() - start
        return result

    def _previewer(self, prompt: Mapping, on_event: EventSink):
        from .preview import encode_preview_frame, latent_rgb_factors

        families: dict[str, str | None] = {}

        def family_of(node_id: str) -> str | None:
            if node_id not in families:
                families[node_id] = None
                loader = _model_loader_of(prompt, node_id)
                if loader is not None:
                    try:
                        families[node_id] = self._family_of(loader)
                    except Exception:  # noqa: BLE001 -- previews are best effort
                        pass
            return families[node_id]

        def on_step(node_id, value, total, x, denoised):
            if denoised is None:
                return
            try:
                frame = encode_preview_frame(np.asarray(denoised), latent_rgb_factors(family_of(node_id)),
                                             self.preview_size)
            except Exception:  # noqa: BLE001
                return
            on_event("preview", frame)

        return on_step

    def _family_of(self, loader: Mapping) -> str | None:
        """The family of the MODEL a loader node gives (already loaded by the run: served from the cache)."""
        inputs = loader.get("inputs") or {}
        if loader.get("class_type") == "UNETLoader":
            model = self.pipeline.load_component("diffusion_models", (inputs["unet_name"],),
                                                 {"weight_dtype": inputs.get("weight_dtype", "default")})
            model = getattr(model, "value", model)
        else:
            model = self.pipeline.load_checkpoint(inputs["ckpt_name"]).model
        return model.family.name

    def free(self, unload_models: bool = False, free_memory: bool = False) -> None:
        if not (unload_models or free_memory):
            return
        with self._gate:   # never unload engines under a running prompt; new prompts wait meanwhile
            self._freeing = True
            while self._running:
                self._gate.wait()
        try:
            self.cache.clear()  # cached outputs hold the models
            self.pipeline.release()
        finally:
            with self._gate:
                self._freeing = False
                self._gate.notify_all()

    def close(self) -> None:
        self.cache.clear()
        try:
            self.pipeline.release()
        except Exception:  # noqa: BLE001
            pass


def _model_loader_of(prompt: Mapping, node_id: str) -> Mapping | None:
    """The loader node (CheckpointLoaderSimple or UNETLoader) behind a sampler node's ``model`` input,
    following model links upstream (LoraLoader, ModelSamplingFlux...)."""
    seen = set()
    current = node_id
    while current in prompt and current not in seen:
        seen.add(current)
        node = prompt[current]
        inputs = node.get("inputs") or {}
        if isinstance(inputs.get("ckpt_name"), str) or isinstance(inputs.get("unet_name"), str):
            return node
        link = inputs.get("model")
        if not (isinstance(link, list) and len(link) == 2):
            return None
        current = str(link[0])
    return None
