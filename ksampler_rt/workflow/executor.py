"""Run a validated workflow: each needed node once, in topological order.

The executor is shared by ``ksampler-rt run``, the Python ``Pipeline`` and the server. It emits
ComfyUI's execution events through ``on_event(type, data)`` (``executing``, ``progress``,
``executed``, ``execution_cached``) and can reuse outputs of an unchanged prefix of the graph
between prompts through an :class:`OutputCache`.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .graph import Plan, is_link
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .spec import NodeSpec


def resolve_input(input_dir, name: str) -> Path:
    """A file of the input folder by name; never anything outside it (``..``, absolute paths, symlinks out)."""
    root = Path(input_dir).resolve()
    shown = name if len(name) <= 200 else name[:200] + "..."
    try:
        if "\x00" in name:
            raise ValueError("NUL byte")
        path = (root / name).resolve()
        inside = root in path.parents
        exists = inside and path.is_file()
    except (OSError, ValueError):  # a name the file system refuses (too long, NUL): no server path in the message
        raise ValueError(f"image: received {shown!r}, expected the name of a file in the input folder") from None
    if not inside:
        raise ValueError(f"image: received {shown!r}, expected a file inside the input folder")
    if not exists:
        raise FileNotFoundError(f"image: received {shown!r}, expected a file of the input folder (it is not there)")
    return path


class Interrupted(Exception):
    """Raised between sampling steps when the run was interrupted."""


EventSink = Callable[[str, dict], None]


@dataclass
class ExecutionContext:
    """What nodes may use: checkpoints, folders, progress reporting, interruption."""

    load_checkpoint: Callable[[str], Any]
    output_dir: Path
    input_dir: Path
    temp_dir: Path
    prompt: dict | None = None
    extra_pnginfo: dict | None = None
    prompt_id: str | None = None
    on_event: EventSink | None = None
    is_interrupted: Callable[[], bool] = lambda: False
    on_step: Callable[[str, int, int, Any, Any], None] | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS   # LoadImage's cap (width x height x frames)
    # load_component(folder, names, options): UNETLoader / DualCLIPLoader / TripleCLIPLoader / VAELoader's
    # separate components ("diffusion_models", "text_encoders", "vae"); None: checkpoints only
    load_component: Callable[[str, tuple, dict], Any] | None = None
    # load_controlnet(control_net_name): ControlNetLoader's network (registry folder "controlnet"); None: none
    load_controlnet: Callable[[str], Any] | None = None

    def input_path(self, name: str) -> Path:
        return resolve_input(self.input_dir, name)

    def check_interrupt(self) -> None:
        if self.is_interrupted():
            raise Interrupted("interrupted")

    def send_binary(self, frame: bytes) -> None:
        """A ready binary WebSocket frame for the client (the ``preview`` event; SaveImageWebsocket's images)."""
        if self.on_event:
            self.on_event("preview", frame)

    def progress(self, node_id: str, value: int, total: int, x=None, denoised=None) -> None:
        if self.on_event:
            self.on_event("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node_id})
        if self.on_step:
            self.on_step(node_id, value, total, x, denoised)


def _signature(prompt: Mapping, node_id: str, memo: dict) -> str:
    """A key for a node's output: a digest of its class, widget values and its inputs' keys, recursively
    (computed with an explicit stack: a chain of thousands of nodes needs no Python recursion)."""
    stack = [node_id]
    while stack:
        current = stack[-1]
        if current in memo:
            stack.pop()
            continue
        inputs = prompt[current].get("inputs") or {}
        missing = [str(v[0]) for v in inputs.values() if is_link(v) and str(v[0]) not in memo]
        if missing:
            stack.extend(missing)
            continue
        parts = {name: ["link", memo[str(value[0])], value[1]] if is_link(value) else value
                 for name, value in sorted(inputs.items())}
        # a digest, not the text: a node's key embeds its inputs' keys, so text keys would grow with the depth
        # of the graph (exponentially, with JSON escaping each level)
        text = json.dumps([prompt[current]["class_type"], parts], sort_keys=True, default=str)
        memo[current] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        stack.pop()
    return memo[node_id]


class OutputCache:
    """Node outputs kept between prompts, keyed by the node's full input signature (LRU, bounded)."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple] = OrderedDict()

    def get(self, key: str):
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, key: str, value: tuple) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class ExecutionResult:
    outputs: dict[str, Any] = field(default_factory=dict)   # node id -> output tuple
    ui: dict[str, dict] = field(default_factory=dict)        # output node id -> {"images": [...]}
    cached: list[str] = field(default_factory=list)


# Nodes whose results depend on files or the outside world are never served from the cache.
_UNCACHEABLE = {"SaveImage", "PreviewImage", "LoadImage", "SaveImageWebsocket"}


def execute(plan: Plan, specs: Mapping[str, NodeSpec], ctx: ExecutionContext,
            cache: OutputCache | None = None) -> ExecutionResult:
    result = ExecutionResult()
    memo: dict[str, str] = {}
    emit = ctx.on_event or (lambda kind, data: None)
    hits: dict[str, tuple] = {}  # taken now: later puts in this run may evict them from the cache
    if cache is not None:
        for node_id in plan.order:
            class_type = plan.prompt[node_id]["class_type"]
            value = None if class_type in _UNCACHEABLE else cache.get(_signature(plan.prompt, node_id, memo))
            if value is not None:
                hits[node_id] = value
                result.cached.append(node_id)
        emit("execution_cached", {"nodes": list(result.cached), "prompt_id": ctx.prompt_id})
    for node_id in plan.order:
        class_type = plan.prompt[node_id]["class_type"]
        spec = specs[class_type]
        if node_id in hits:
            result.outputs[node_id] = hits[node_id]
            continue
        ctx.check_interrupt()
        emit("executing", {"node": node_id, "display_node": node_id, "prompt_id": ctx.prompt_id})
        kwargs = {}
        for name, value in plan.inputs[node_id].items():
            if is_link(value):
                kwargs[name] = result.outputs[str(value[0])][value[1]]
            else:
                kwargs[name] = value
        out = spec.run(ctx, node_id, **kwargs)
        if isinstance(out, dict) and "ui" in out:
            result.outputs[node_id] = ()
            if not out["ui"]:
                continue  # ComfyUI sends "executed" and keeps history outputs only for a non-empty ui
            result.ui[node_id] = out["ui"]
            emit("executed", {"node": node_id, "display_node": node_id, "output": out["ui"], "prompt_id": ctx.prompt_id})
        else:
            result.outputs[node_id] = out
            if cache is not None and class_type not in _UNCACHEABLE:
                cache.put(_signature(plan.prompt, node_id, memo), out)
    emit("executing", {"node": None, "display_node": None, "prompt_id": ctx.prompt_id})
    return result
