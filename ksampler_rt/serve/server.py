"""A ComfyUI-compatible HTTP / WebSocket server on aiohttp, executing prompts with ksampler-rt.

Same endpoints, JSON bodies and WebSocket messages as ComfyUI's ``server.py`` (0.3.64) for the
API a client needs (``/prompt``, ``/history``, ``/view``, ``/queue``, ``/interrupt``,
``/object_info``, ``/upload/image``, ``/system_stats``, ``/ws``), plus ``/metrics``.

Threading: the event loop owns the queue, the history and the sockets. Up to ``worker.concurrency``
prompts run at once (for the in-process worker 1, or ``max_batch`` with step-level batching on), each in a thread of the server's pool calling
:meth:`Worker.run`; they are started in queue order, and every prompt hands its events back to the
loop with ``call_soon_threadsafe`` tagged with its own run, so HTTP never waits on inference and
WebSocket messages stay attributed to their prompt. Each running prompt has its own interrupt flag.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import json
import logging
import mimetypes
import os
import platform
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from ..workflow.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixels
from .durable_queue import QueueJournal
from .frontend import UI_MISSING, UI_OFF, add_frontend_routes, add_static_routes, find_web_root
from . import jobs
from .history import History
from .internal import LogBuffer, add_internal_routes
from .security import AccessPolicy
from .userdata import UserStore, add_user_routes
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .prompt_queue import PromptQueue, QueueFull, QueueItem
from .worker import LocalWorker, PromptExecutionError, PromptInterrupted, RunResult

log = logging.getLogger("ksampler_rt.serve")

COMFYUI_VERSION = "0.3.64"   # the ComfyUI behaviour this server reproduces
_FOLDER_TYPES = ("output", "input", "temp")
_FORCE_DOWNLOAD = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    models_dir: str | None = None
    output_dir: str = "output"
    input_dir: str = "input"
    temp_dir: str | None = None
    state_dir: str | None = None          # default: <output_dir>/.ksampler-rt
    backend: str = "auto"
    max_queue: int = 100                  # waiting prompts; more answer 429
    max_history: int = 10000
    cache_mb: float = 1024.0              # node-output cache bound (arrays), MiB
    cache_entries: int = 256
    preview: bool = False
    preview_size: int = 512
    max_upload_mb: float = 100.0          # multipart uploads (ComfyUI's --max-upload-size)
    max_body_mb: float = 16.0             # JSON request bodies
    ws_backlog: int = 4096                # queued messages per WebSocket client before it is dropped
    preload: list[str] = field(default_factory=list)
    ui: bool = True                       # serve ComfyUI's frontend at / (when comfyui-frontend-package is installed)
    auth_token: str | None = None         # required on every route and the WebSocket when set
    allow_hosts: list[str] = field(default_factory=list)    # Host names besides loopback / the bound address
    allow_origins: list[str] = field(default_factory=list)  # browser Origins besides the server's own
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS         # uploads and LoadImage: width x height x frames
    max_prompt_id: int = 128              # longest client-chosen prompt_id
    max_json_depth: int = 64              # deepest nesting of a JSON body
    max_batch: int = 1                    # > 1: UNet rows per engine call, prompts run at once (batching on)
    batch_wait_ms: float | None = None    # longest wait for batch partners (None: runtime.batching's default)


def error_body(kind: str, message: str, details: str | None = None, extra: dict | None = None,
               node_errors: dict | None = None) -> dict:
    """ComfyUI's error JSON: ``{"error": {type, message, details, extra_info}, "node_errors"}``."""
    return {"error": {"type": kind, "message": message, "details": details if details is not None else message,
                      "extra_info": extra or {}}, "node_errors": node_errors or {}}


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=partial(json.dumps, default=str))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnsafePath(Exception):
    """A client-supplied name that would leave its folder (status: 400 or 403)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _clean_subfolder(subfolder: str) -> tuple[str, ...]:
    if "\x00" in subfolder:
        raise UnsafePath("subfolder: received a NUL byte, expected a relative folder", 400)
    if len(subfolder) > _MAX_SUBFOLDER_CHARS:
        raise UnsafePath(f"subfolder: received {len(subfolder)} characters, expected at most {_MAX_SUBFOLDER_CHARS}",
                         400)
    text = subfolder.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UnsafePath(f"subfolder: received {subfolder!r}, expected a relative folder", 403)
    parts = tuple(p for p in PurePosixPath(text).parts if p not in ("", "."))
    for part in parts:
        if part == ".." or part.startswith("."):
            raise UnsafePath(f"subfolder: received {subfolder!r}, expected a folder inside the served one "
                             "(no '..' or hidden names)", 403)
    return parts


_MAX_NAME_BYTES = 255       # a file name on every common file system
_MAX_SUBFOLDER_CHARS = 1024


def _shown(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _clean_filename(filename: str) -> str:
    if not filename or "\x00" in filename:
        raise UnsafePath("filename: received an empty name or a NUL byte, expected a file name", 400)
    if len(filename.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        raise UnsafePath(f"filename: received {len(filename)} characters, expected a name of at most "
                         f"{_MAX_NAME_BYTES} bytes", 400)
    if filename[0] in "/\\" or ".." in filename or "/" in filename or "\\" in filename or filename.startswith("."):
        raise UnsafePath(f"filename: received {_shown(filename)}, expected a plain file name (no '/', '..' or "
                         "leading '.')", 400)
    return filename


def safe_path(root: Path, subfolder: str, filename: str | None) -> Path:
    """``root/subfolder/filename`` if it stays inside ``root`` after resolving symlinks."""
    parts = _clean_subfolder(subfolder or "")
    name = _clean_filename(filename) if filename is not None else None
    root_real = root.resolve()
    candidate = root_real.joinpath(*parts)
    if name is not None:
        candidate = candidate / name
    try:
        real = candidate.resolve()
    except (OSError, RuntimeError):  # a name the file system refuses; the message names no server path
        raise UnsafePath("subfolder/filename: received a path the file system refuses, expected a short "
                         "relative name", 400) from None
    if real != root_real and root_real not in real.parents:
        raise UnsafePath(f"subfolder/filename: received {_shown(subfolder + '/' + (filename or ''))}, which "
                         "resolves outside the served folder; expected a file inside it", 403)
    return candidate


@dataclass
class _Run:
    item: QueueItem
    sid: str | None
    messages: list = field(default_factory=list)
    last_node: str | None = None
    states: dict = field(default_factory=dict)   # progress_state: node id -> state dict
    interrupted: threading.Event = field(default_factory=threading.Event)   # this prompt's /interrupt

    @property
    def prompt_id(self) -> str:
        return self.item.prompt_id


class _Client:
    """One WebSocket connection: its own send queue, so a slow client never stalls the others."""

    def __init__(self, sid: str, ws: web.WebSocketResponse, backlog: int):
        self.sid = sid
        self.ws = ws
        self.feature_flags: dict = {}
        self.dropped = False
        self.queue: asyncio.Queue = asyncio.Queue(backlog)
        self.task = asyncio.ensure_future(self._pump())

    def push(self, payload) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped = True
            log.warning("websocket client %s is not reading; disconnecting it", self.sid)
            self.task.cancel()
            asyncio.ensure_future(self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too slow"))

    async def _pump(self) -> None:
        try:
            while True:
                payload = await self.queue.get()
                if isinstance(payload, (bytes, bytearray)):
                    await self.ws.send_bytes(bytes(payload))
                else:
                    await self.ws.send_str(payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a broken connection ends its pump, nothing else
            log.debug("websocket %s: send failed (%s)", self.sid, exc)


class PromptServer:
    """The server. ``await start()`` binds and starts the worker loop; ``await stop()`` ends both."""

    def __init__(self, config: ServerConfig | None = None, *, pipeline=None, worker=None):
        self.config = config or ServerConfig()
        c = self.config
        if pipeline is None:
            from ..workflow.pipeline import Pipeline

            output_dir = Path(c.output_dir).resolve()
            temp_dir = Path(c.temp_dir).resolve() if c.temp_dir else output_dir.parent / "temp"
            pipeline = Pipeline(c.models_dir, backend=c.backend, output_dir=output_dir,
                                input_dir=Path(c.input_dir).resolve(), temp_dir=temp_dir, log=log.info,
                                max_batch=c.max_batch, batch_wait_ms=c.batch_wait_ms)
        elif worker is None and c.max_batch > 1 and hasattr(pipeline, "max_batch"):
            pipeline.max_batch = c.max_batch   # a pipeline built by the caller (e.g. --fake-checkpoint)
            if c.batch_wait_ms is not None:
                pipeline.batch_wait_ms = float(c.batch_wait_ms)
        self.pipeline = pipeline
        # /view and /upload serve exactly the folders the nodes read and write.
        self.output_dir = Path(pipeline.output_dir).resolve()
        self.input_dir = Path(pipeline.input_dir).resolve()
        self.temp_dir = Path(pipeline.temp_dir).resolve()
        self.state_dir = Path(c.state_dir).resolve() if c.state_dir else self.output_dir / ".ksampler-rt"
        for folder in (self.output_dir, self.input_dir, self.temp_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.worker = worker or LocalWorker(pipeline, cache_bytes=int(c.cache_mb * 1024 * 1024),
                                            cache_entries=c.cache_entries, preview=c.preview,
                                            preview_size=c.preview_size, concurrency=max(1, int(c.max_batch)))
        # Prompts run at once: the worker's ``concurrency`` (a worker without one runs one at a time).
        self.concurrency = max(1, int(getattr(self.worker, "concurrency", 1) or 1))
        self.metrics = Metrics()
        self.metrics.concurrency.set(self.concurrency)
        self.history = History(self.state_dir, c.max_history)
        for warning in self.history.load_warnings:
            log.warning("history: %s", warning)
        if hasattr(pipeline, "max_image_pixels"):
            pipeline.max_image_pixels = c.max_image_pixels
        self.policy = AccessPolicy(c.host, list(c.allow_hosts), list(c.allow_origins), c.auth_token or None)
        self.users = UserStore(self.state_dir / "user")
        self.users.initialise()
        self.journal = QueueJournal(self.state_dir)
        self.orphans: dict[str, list[tuple[str, dict]]] = {}   # client id -> messages of prompts lost in a crash
        self.logs = LogBuffer()
        self.web_root = find_web_root() if c.ui else None
        self._ui_missing = UI_OFF if not c.ui else UI_MISSING
        self.queue: PromptQueue | None = None
        self.number = 0
        self.clients: dict[str, _Client] = {}
        self.runs: dict[str, _Run] = {}   # the running prompts by id, in start order
        # As many threads as prompts in flight: ``free`` and ``--preload`` queue behind running prompts.
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="ksampler-rt-worker")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self.port: int | None = None
        self.max_body = int(c.max_body_mb * 1024 * 1024)
        self.app = self._make_app()

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        log.addHandler(self.logs)   # /internal/logs: the server's own lines, INFO and up
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
        self.queue = PromptQueue(self.config.max_queue, self._queue_changed)
        self._recover_queue()   # on the loop: it fills the queue, which only the loop touches
        self.queue.journal = self.journal
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 -- the bound port when port=0
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        for name in self.config.preload:
            await self._loop.run_in_executor(self._executor, self.pipeline.load_checkpoint, name)
        self._scheduler = asyncio.ensure_future(self._schedule())
        if not _is_loopback(self.config.host) and not self.policy.token:
            log.warning("listening on %s without --auth-token: anyone who can reach this address can run "
                        "prompts and read outputs", self.config.host)
        log.info("ksampler-rt serve: http://%s:%s", self.config.host, self.port)
        return self.port

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self.queue is not None:
            self.queue.wipe(keep_on_disk=True)   # the pending prompts run again at the next start
        self.interrupt()
        if self._scheduler is not None:
            if self.runs:  # let the running prompts stop between steps and be recorded
                deadline = time.monotonic() + timeout
                while self.runs and time.monotonic() < deadline:
                    self.interrupt()
                    await asyncio.sleep(0.02)
            self._scheduler.cancel()
            try:
                await self._scheduler
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for client in list(self.clients.values()):
            client.task.cancel()
            try:
                await asyncio.wait_for(client.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown"), 2)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        self.clients.clear()
        if self._runner is not None:
            await self._runner.cleanup()
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                None, partial(self._executor.shutdown, wait=True, cancel_futures=True)), timeout)
        except asyncio.TimeoutError:
            log.warning("the worker thread did not stop within %s s", timeout)
        try:
            self.worker.close()
        except Exception:  # noqa: BLE001
            pass
        log.removeHandler(self.logs)

    def _recover_queue(self) -> None:
        """Queue again what the queue log says was pending; record what was running when the last process
        ended (a crash: a clean stop finishes its running prompts) as failed, in the history and for the
        client that submitted it when it reconnects."""
        pending, lost = self.journal.recover()
        for warning in self.journal.warnings:
            log.warning("queue: %s", warning)
        now = int(time.time() * 1000)
        for record in lost:
            prompt_id = record["prompt_id"]
            message = ("the server process ended while this prompt was running (killed or crashed); it did not "
                       "finish and is not run again")
            item = QueueItem(float(record["number"]), 0, prompt_id, record["prompt"], record["extra_data"],
                             list(record.get("outputs") or []))
            messages = [("execution_start", {"prompt_id": prompt_id, "timestamp": now}),
                        ("execution_error", {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
                                             "exception_message": message, "exception_type": "ServerRestarted",
                                             "traceback": [], "current_inputs": {}, "current_outputs": [],
                                             "timestamp": now})]
            if prompt_id not in self.history:
                self.history.add(prompt_id, {"prompt": item.as_comfy(), "outputs": {},
                                             "status": {"status_str": "error", "completed": False, "messages": messages},
                                             "meta": {}})
            sid = record["extra_data"].get("client_id")
            if isinstance(sid, str) and sid:
                self.orphans.setdefault(sid, []).extend(messages + [("executing", {"node": None,
                                                                                  "prompt_id": prompt_id})])
            log.warning("prompt %s was running when the server stopped last; recorded as failed", prompt_id)
        self.journal.recover()  # the same state: the lost prompts are done now, the pending ones are re-put below
        for prompt_id in [r["prompt_id"] for r in lost]:
            self.journal.done(prompt_id)
        limit, self.queue.max_pending = self.queue.max_pending, 1 << 62   # all of them, whatever --max-queue is now
        for record in pending:
            self.journal.delete(record["prompt_id"])
            item = QueueItem(float(record["number"]), self.queue.next_seq(), record["prompt_id"], record["prompt"],
                             record["extra_data"], list(record.get("outputs") or []))
            self.queue.journal = self.journal
            self.queue.put(item)
            self.number = max(self.number, int(item.number) + 1)
        self.queue.journal = None
        self.queue.max_pending = limit
        self.journal.compact()
        if pending:
            log.info("queue: %d prompt(s) pending from the last run queued again", len(pending))

    # -- messages -------------------------------------------------------------------------------------
    def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """Like ComfyUI's ``send_sync`` on the loop: to ``sid`` only, or to everyone when None."""
        payload = bytes(data) if isinstance(data, (bytes, bytearray)) else json.dumps(
            {"type": event, "data": data}, default=str)
        if sid is None:
            targets = list(self.clients.values())
        else:
            targets = [self.clients[sid]] if sid in self.clients else []
        for client in targets:
            client.push(payload)

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.queue.remaining() if self.queue is not None else 0}}

    def _queue_changed(self) -> None:
        self.metrics.queue_pending.set(len(self.queue))
        self.metrics.queue_running.set(len(self.queue.running))
        self.send("status", {"status": self.queue_info()})

    def _add_message(self, run: _Run, event: str, data: dict, broadcast: bool = False) -> None:
        """ComfyUI's PromptExecutor.add_message: kept in the history status, sent to the client."""
        data = {**data, "timestamp": int(time.time() * 1000)}
        run.messages.append((event, data))
        if run.sid is not None or broadcast:
            self.send(event, data, run.sid)

    def _progress_state(self, run: _Run, node: str | None, state: str, value: float | None = None,
                        maximum: float | None = None) -> None:
        """ComfyUI's ``progress_state`` message: every started node of the prompt with its state."""
        if node is None:
            return
        entry = run.states.setdefault(node, {"value": 0, "max": 1, "state": "pending", "node_id": node,
                                             "prompt_id": run.item.prompt_id, "display_node_id": node,
                                             "parent_node_id": None, "real_node_id": node})
        entry["state"] = state
        if maximum is not None:
            entry["max"] = maximum
        entry["value"] = entry["max"] if state == "finished" else (value if value is not None else 0)
        self.send("progress_state", {"prompt_id": run.item.prompt_id, "nodes": run.states}, run.sid)

    def _on_worker_event(self, run: _Run, kind: str, data: Any) -> None:
        if kind == "execution_cached":
            self._add_message(run, kind, data)
        elif kind == "executing":
            self._progress_state(run, run.last_node, "finished")
            run.last_node = data.get("node")
            self._progress_state(run, run.last_node, "running", 0, 1)
            self.send(kind, data, run.sid)
        elif kind == "progress":
            self._progress_state(run, data.get("node"), "running", data.get("value"), data.get("max"))
            self.send(kind, data, run.sid)
        elif kind == "executed":
            if run.sid is not None:
                self.send(kind, data, run.sid)
        elif kind == "preview":
            self.send(kind, data, run.sid)
        else:  # progress and anything newer
            self.send(kind, data, run.sid)

    # -- running prompts -------------------------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop the running prompt ``prompt_id`` (between two sampling steps or before its next node), or
        every running prompt when None. False when that prompt is not running (nothing happens)."""
        if prompt_id is None:
            for run in list(self.runs.values()):
                run.interrupted.set()
            return bool(self.runs)
        run = self.runs.get(prompt_id)
        if run is None:
            return False
        run.interrupted.set()
        return True

    async def _schedule(self) -> None:
        """Keep up to ``concurrency`` prompts running, started in queue order."""
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                await slots.acquire()
                try:
                    item = await self.queue.get()
                except BaseException:
                    slots.release()
                    raise
                # Registered before anything else runs on the loop: /queue, /interrupt and a reconnecting
                # WebSocket see the prompt as running from the moment it left the pending list.
                sid = item.extra_data.get("client_id")
                run = self.runs[item.prompt_id] = _Run(item, sid if isinstance(sid, str) and sid else None)
                task = asyncio.ensure_future(self._run_one(run, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in list(tasks):
                task.cancel()

    async def _run_one(self, run: _Run, slots: asyncio.Semaphore) -> None:
        try:
            await self._execute(run)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 -- the server survives anything one prompt does
            log.exception("prompt %s: unexpected server error", run.prompt_id)
        finally:
            self._finish(run)
            slots.release()

    def _finish(self, run: _Run) -> None:
        if self.runs.get(run.prompt_id) is run:
            del self.runs[run.prompt_id]
        self.queue.done(run.item)

    async def _execute(self, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        item = run.item
        started = time.perf_counter()
        self.metrics.stage.labels("queue_wait").observe(started - item.submitted)
        self._add_message(run, "execution_start", {"prompt_id": item.prompt_id})

        def on_event(kind: str, data: Any) -> None:  # called on the worker thread
            loop.call_soon_threadsafe(self._on_worker_event, run, kind, data)

        outputs: dict = {}
        result: RunResult | None = None
        status = "error"
        try:
            result = await loop.run_in_executor(
                self._executor, self.worker.run, item.prompt_id, item.prompt, item.extra_data, on_event,
                run.interrupted.is_set)
            outputs = result.outputs
            status = "success"
            self._progress_state(run, run.last_node, "finished")
            self._add_message(run, "execution_success", {"prompt_id": item.prompt_id})
        except PromptInterrupted as exc:
            outputs, status = exc.outputs, "interrupted"
            self._add_message(run, "execution_interrupted", exc.details, broadcast=True)
        except PromptExecutionError as exc:
            outputs = exc.outputs
            self._add_message(run, "execution_error", exc.details)
        except Exception as exc:  # noqa: BLE001 -- a worker that broke is reported like a node error
            log.exception("prompt %s: worker failed", item.prompt_id)
            self._add_message(run, "execution_error", {
                "prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
                "exception_message": str(exc) or type(exc).__name__, "exception_type": type(exc).__name__,
                "traceback": [], "current_inputs": {}, "current_outputs": []})
        executed = time.perf_counter()
        self.metrics.stage.labels("execute").observe(executed - started)
        self.metrics.prompts.labels(status).inc()
        if result is not None:
            self.metrics.observe_run(result)
        entry = {
            "prompt": item.as_comfy(),
            "outputs": outputs or {},
            "status": {"status_str": "success" if status == "success" else "error",
                       "completed": status == "success", "messages": run.messages},
            "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                     for node in (outputs or {})},
        }
        try:
            await loop.run_in_executor(None, self.history.add, item.prompt_id, entry)
        except Exception:  # noqa: BLE001 -- a full disk must not stop the queue
            log.exception("prompt %s: could not persist history", item.prompt_id)
        self.metrics.stage.labels("history").observe(time.perf_counter() - executed)
        self.metrics.stage.labels("total").observe(time.perf_counter() - item.submitted)
        self._finish(run)  # after the history entry is stored: a prompt leaving the queue has its history
        if run.sid is not None:
            self.send("executing", {"node": None, "prompt_id": item.prompt_id}, run.sid)

    # -- HTTP helpers -----------------------------------------------------------------------------------
    async def _read_json(self, request: web.Request, *, allow_empty: bool = False):
        """The JSON body, bounded by ``max_body_mb``; a web.Response on failure."""
        if request.content_length is not None and request.content_length > self.max_body:
            return _json(error_body("request_too_large", f"request body: received {request.content_length} bytes, "
                                    f"expected at most {self.max_body} (--max-body-mb)"), 413)
        body = bytearray()
        while True:
            chunk = await request.content.read(1 << 16)
            if not chunk:
                break
            body += chunk
            if len(body) > self.max_body:
                return _json(error_body("request_too_large", f"request body: received more than "
                                        f"{self.max_body} bytes, expected at most {self.max_body} (--max-body-mb)"),
                                 413)
        if not body.strip():
            if allow_empty:
                return {}
            return _json(error_body("invalid_json", "the request body is empty, expected a JSON object"), 400)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _json(error_body("invalid_json", f"the request body is not valid JSON ({exc})"), 400)
        except RecursionError:
            data = None
            depth = None
        else:
            depth = _json_depth(data, self.config.max_json_depth)
        if depth is None or depth > self.config.max_json_depth:
            return _json(error_body("invalid_json", f"the request body: received JSON nested deeper than "
                                    f"{self.config.max_json_depth} levels, expected at most "
                                    f"{self.config.max_json_depth}"), 400)
        return data

    def _prompt_id_problem(self, prompt_id) -> str | None:
        """Why a client-chosen prompt_id is refused (None: it is fine). Ids key the history, file names of
        clients and WebSocket messages: a bounded printable string, never one in use."""
        limit = self.config.max_prompt_id
        if not isinstance(prompt_id, str):
            return f"prompt_id: received a JSON {type(prompt_id).__name__}, expected a string"
        if len(prompt_id) > limit:
            return f"prompt_id: received {len(prompt_id)} characters, expected at most {limit}"
        if not prompt_id.isprintable() or prompt_id != prompt_id.strip():
            return (f"prompt_id: received {prompt_id!r}, expected printable characters without leading or trailing "
                    "spaces")
        if self.queue.contains(prompt_id) or prompt_id in self.history:
            return (f"prompt_id: received {prompt_id!r}, which is already queued, running or in the history; "
                    "expected a new id")
        return None

    def _folder(self, kind: str | None) -> Path | None:
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(kind or "output")

    # -- the application --------------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        @web.middleware
        async def errors(request: web.Request, handler):
            try:
                return await handler(request)
            except web.HTTPException:
                raise
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 -- details (paths, values) go to the log, not to the client
                log.exception("%s %s failed", request.method, request.path)
                return _json(error_body("server_error", "the server failed on this request; the server log has "
                                        "the details"), 500)

        # Host / Origin / token first: nothing runs for a request that may not be here.
        app = web.Application(client_max_size=int(self.config.max_upload_mb * 1024 * 1024),
                              middlewares=[self.policy.middleware(), errors])
        r = web.RouteTableDef()
        add_user_routes(r, self.users, self.max_body, self._read_json)
        add_frontend_routes(r, self.web_root, self._ui_missing)
        add_internal_routes(r, self.logs, self._folder_paths, lambda kind: self._folder(kind))

        @r.get("/ws")
        async def websocket(request: web.Request):
            ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 20)
            await ws.prepare(request)
            sid = request.query.get("clientId", "") or uuid.uuid4().hex
            old = self.clients.pop(sid, None)
            if old is not None:
                old.task.cancel()
            client = self.clients[sid] = _Client(sid, ws, self.config.ws_backlog)
            self.metrics.ws_clients.set(len(self.clients))
            client.push(json.dumps({"type": "status", "data": {"status": self.queue_info(), "sid": sid}}))
            for event, data in self.orphans.pop(sid, []):  # its prompts that a crash of the last process ended
                client.push(json.dumps({"type": event, "data": data}, default=str))
            for run in list(self.runs.values()):  # a reconnecting client learns where its prompts are
                if run.sid == sid and run.last_node is not None:
                    client.push(json.dumps({"type": "executing", "data": {
                        "node": run.last_node, "display_node": run.last_node, "prompt_id": run.prompt_id}}))
            first = True
            try:
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT:
                        try:
                            data = json.loads(msg.data)
                        except json.JSONDecodeError:
                            continue
                        if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                            client.feature_flags = data.get("data") or {}
                            client.push(json.dumps({"type": "feature_flags", "data": self._features()}))
                        first = False
            finally:
                if self.clients.get(sid) is client:
                    del self.clients[sid]
                client.task.cancel()
                self.metrics.ws_clients.set(len(self.clients))
            return ws

        @r.post("/prompt")
        async def post_prompt(request: web.Request):
            t0 = time.perf_counter()
            data = await self._read_json(request)
            if isinstance(data, web.Response):
                self.metrics.rejected.labels("bad_request").inc()
                return data
            if not isinstance(data, dict):
                self.metrics.rejected.labels("bad_request").inc()
                return _json(error_body("invalid_prompt", f"the body is a JSON {type(data).__name__}, expected an "
                                        'object {"prompt": {...}, "client_id": ...}'), 400)
            if "prompt" not in data:
                self.metrics.rejected.labels("bad_request").inc()
                return _json(error_body("no_prompt", "No prompt provided"), 400)
            if not isinstance(data["prompt"], dict):  # never a string: that would name a file on this server
                self.metrics.rejected.labels("bad_request").inc()
                return _json(error_body("invalid_prompt", f"prompt: received a JSON {type(data['prompt']).__name__}, "
                                        "expected an object {node_id: {class_type, inputs}}"), 400)
            if self._stopping:
                return _json(error_body("server_stopping", "the server is shutting down"), 503)
            if len(self.queue) >= self.queue.max_pending:
                self.metrics.rejected.labels("queue_full").inc()
                return _json(error_body("queue_full", f"the queue is full ({len(self.queue)} prompts waiting, "
                                        f"--max-queue {self.queue.max_pending}); retry later",
                                        extra={"max_queue": self.queue.max_pending}), 429)
            if "number" in data:
                try:
                    number = float(data["number"])
                except (TypeError, ValueError):
                    number = float("nan")
                if number != number or number in (float("inf"), float("-inf")):
                    return _json(error_body("invalid_prompt", f"number: received {data.get('number')!r}, expected "
                                            "a finite number"), 400)
            else:
                number = None  # taken after validation, so queue order is the order of the answers
            prompt_id = data.get("prompt_id")
            if prompt_id is None or prompt_id == "":
                prompt_id = str(uuid.uuid4())
            else:
                problem = self._prompt_id_problem(prompt_id)
                if problem:
                    self.metrics.rejected.labels("bad_request").inc()
                    return _json(error_body("invalid_prompt", problem), 400)
            extra_data = data.get("extra_data") or {}
            if not isinstance(extra_data, dict):
                return _json(error_body("invalid_prompt", "extra_data: expected a JSON object"), 400)
            if "client_id" in data:
                extra_data["client_id"] = data["client_id"]
            from ..workflow.graph import WorkflowError

            try:
                plan = await asyncio.get_running_loop().run_in_executor(None, self.pipeline.prepare, data["prompt"])
            except WorkflowError as exc:
                self.metrics.rejected.labels("invalid").inc()
                return _json(exc.comfy_error(), 400)
            except Exception as exc:  # noqa: BLE001 -- a malformed prompt is the client's error
                self.metrics.rejected.labels("invalid").inc()
                return _json(error_body("invalid_prompt", f"the prompt cannot be read: {type(exc).__name__}: {exc}"),
                             400)
            self.metrics.stage.labels("validate").observe(time.perf_counter() - t0)
            if data.get("prompt_id") and (self.queue.contains(prompt_id) or prompt_id in self.history):
                return _json(error_body("invalid_prompt", f"prompt_id: received {prompt_id!r}, which is already "
                                        "queued, running or in the history; expected a new id"), 400)
            if number is None:
                number = -self.number if data.get("front") else self.number
                self.number += 1
            extra_data.setdefault("create_time", int(time.time() * 1000))  # ComfyUI's jobs API reads it
            item = QueueItem(number, self.queue.next_seq(), prompt_id, plan.prompt, extra_data, list(plan.outputs))
            try:
                self.queue.put(item)
            except QueueFull as exc:
                self.metrics.rejected.labels("queue_full").inc()
                return _json(error_body("queue_full", str(exc), extra={"max_queue": self.queue.max_pending}), 429)
            number_out = int(number) if float(number).is_integer() else number
            return _json({"prompt_id": prompt_id, "number": number_out, "node_errors": {}})

        @r.get("/prompt")
        async def get_prompt(request):
            return _json(self.queue_info())

        @r.get("/queue")
        async def get_queue(request):
            running = [item.as_comfy() for item in self.queue.running]  # in start order, as ComfyUI
            return _json({"queue_running": running, "queue_pending": [i.as_comfy() for i in self.queue.pending()]})

        @r.post("/queue")
        async def post_queue(request):
            data = await self._read_json(request)
            if isinstance(data, web.Response):
                return data
            if not isinstance(data, dict):
                return _json(error_body("invalid_request", 'expected {"clear": true} or {"delete": [prompt_id, ...]}'),
                             400)
            if data.get("clear"):
                self.queue.wipe()
            for prompt_id in _id_list(data.get("delete")):
                self.queue.delete(prompt_id)
            return web.Response(status=200)

        @r.post("/interrupt")
        async def post_interrupt(request):
            data = await self._read_json(request, allow_empty=True)
            if isinstance(data, web.Response):
                data = {}
            prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
            if prompt_id:  # ComfyUI 0.3.64: only that prompt, and nothing when it is not running
                if not self.interrupt(str(prompt_id)):
                    log.info("interrupt: prompt %s is not running; nothing to stop", prompt_id)
            else:          # no prompt_id: every running prompt (ComfyUI's global interrupt)
                self.interrupt()
            return web.Response(status=200)

        @r.post("/free")
        async def post_free(request):
            data = await self._read_json(request, allow_empty=True)
            if isinstance(data, web.Response):
                return data
            data = data if isinstance(data, dict) else {}
            unload, free = bool(data.get("unload_models")), bool(data.get("free_memory"))
            if unload or free:  # runs on a worker thread (with one slot: after the prompt in progress)
                asyncio.get_running_loop().run_in_executor(self._executor, self.worker.free, unload, free)
            return web.Response(status=200)

        @r.get("/history")
        async def get_history(request):
            try:
                max_items = int(request.query["max_items"]) if "max_items" in request.query else None
                offset = int(request.query.get("offset", -1))
            except ValueError:
                return _json(error_body("invalid_request", "max_items / offset: expected integers"), 400)
            return _json(self.history.get(max_items=max_items, offset=offset))

        @r.get("/jobs")
        async def get_jobs(request):
            try:
                query = jobs.parse_list_query(request.query)
            except ValueError as exc:
                return _json(error_body("invalid_request", str(exc)), 400)
            running = [item.as_comfy() for item in self.queue.running]
            pending = [item.as_comfy() for item in self.queue.pending()]
            return _json(jobs.list_jobs(running, pending, self.history.get(), **query))

        @r.get("/jobs/{job_id}")
        async def get_job(request):
            job_id = request.match_info["job_id"]
            running = [item.as_comfy() for item in self.queue.running]
            pending = [item.as_comfy() for item in self.queue.pending()]
            job = jobs.get_job(job_id, running, pending, self.history.get(prompt_id=job_id))
            return _json(job) if job is not None else _json({"error": "Job not found"}, 404)

        @r.get("/history/{prompt_id}")
        async def get_history_item(request):
            return _json(self.history.get(prompt_id=request.match_info["prompt_id"]))

        @r.post("/history")
        async def post_history(request):
            data = await self._read_json(request)
            if isinstance(data, web.Response):
                return data
            if isinstance(data, dict):
                if data.get("clear"):
                    await asyncio.get_running_loop().run_in_executor(None, self.history.clear)
                for prompt_id in _id_list(data.get("delete")):
                    await asyncio.get_running_loop().run_in_executor(None, self.history.delete, prompt_id)
            return web.Response(status=200)

        @r.get("/object_info")
        async def object_info(request):
            specs = self.pipeline.specs
            out = await asyncio.get_running_loop().run_in_executor(
                None, lambda: {name: spec.object_info() for name, spec in specs.items()})
            return _json(out)

        @r.get("/object_info/{node_class}")
        async def object_info_node(request):
            spec = self.pipeline.specs.get(request.match_info["node_class"])
            if spec is None:
                return _json({})
            info = await asyncio.get_running_loop().run_in_executor(None, spec.object_info)
            return _json({spec.class_type: info})

        @r.get("/view")
        async def view(request):
            return await self._view(request)

        @r.post("/upload/image")
        async def upload_image(request):
            return await self._upload(request)

        @r.post("/upload/mask")
        async def upload_mask(request):
            return await self._upload(request, mask=True)

        @r.get("/view_metadata/{folder_name}")
        async def view_metadata(request):
            return await self._view_metadata(request)

        @r.get("/experiment/models")
        async def experiment_models(request):
            return _json([{"name": name, "folders": folders} for name, folders in self._folder_paths().items()
                          if name in ("checkpoints", "loras")])

        @r.get("/experiment/models/{folder}")
        async def experiment_models_in(request):
            names = self._model_names(request.match_info["folder"])
            if names is None:
                return web.Response(status=404)
            return _json([{"name": name, "pathIndex": 0} for name in names])

        @r.get("/system_stats")
        async def system_stats(request):
            stats = await asyncio.get_running_loop().run_in_executor(None, self._system_stats)
            # The command line can hold a token and local paths: only a caller that proved the token sees it.
            # "--disable-api-nodes" (ComfyUI's flag) is true here -- no Comfy.org API nodes -- and tells the
            # frontend not to ask api.comfy.org for releases.
            argv = (_redacted_argv(stats["system"].get("argv") or []) if self.policy.authenticated(request)
                    else ["ksampler-rt", "serve"])
            stats["system"]["argv"] = argv + ["--disable-api-nodes"]
            return _json(stats)

        @r.get("/features")
        async def features(request):
            return _json(self._features())

        @r.get("/embeddings")
        async def embeddings(request):
            return _json([])

        @r.get("/models")
        async def models(request):
            return _json(["checkpoints", "loras", "diffusion_models", "text_encoders", "vae", "controlnet"])

        @r.get("/models/{folder}")
        async def models_in(request):
            names = self._model_names(request.match_info["folder"])
            return web.Response(status=404) if names is None else _json(names)

        @r.get("/metrics")
        async def metrics(request):
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        # ComfyUI registers every route under /x and /api/x (the frontend calls /api/x).
        for route in r:
            if isinstance(route, web.RouteDef):
                app.router.add_route(route.method, "/api" + route.path, route.handler, **route.kwargs)
        app.add_routes(r)
        add_static_routes(app, self.web_root, self._ui_missing, self.users.user_dir / "user.css")
        return app

    def _folder_paths(self) -> dict[str, list[str]]:
        """ComfyUI's /internal/folder_paths: model folder name -> the folders it is read from."""
        registry = getattr(self.pipeline, "registry", None)
        out = {}
        if registry is not None:
            out = {"checkpoints": [str(registry.checkpoints_dir)], "loras": [str(registry.loras_dir)]}
        return {**out, "output": [str(self.output_dir)], "input": [str(self.input_dir)], "temp": [str(self.temp_dir)]}

    def _model_names(self, folder: str) -> list[str] | None:
        """The model names of a folder as the loaders list them (None: not a folder of this server)."""
        registry = self.pipeline.registry
        if folder == "checkpoints":  # what CheckpointLoaderSimple accepts
            loader = self.pipeline.specs.get("CheckpointLoaderSimple")
            return loader.inputs["ckpt_name"].combo_values() if loader else registry.checkpoint_names()
        if folder == "loras":
            return registry.lora_names()
        if folder in ("diffusion_models", "text_encoders", "vae", "controlnet"):  # UNETLoader ... ControlNetLoader
            return registry.component_names(folder)
        return None

    def _mask_original(self, ref) -> Path:
        """The image ``original_ref`` (JSON {filename, subfolder, type}) of /upload/mask names."""
        try:
            ref = json.loads(ref) if isinstance(ref, str) else None
        except ValueError:
            ref = None
        if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
            raise UnsafePath('original_ref: expected JSON {"filename", "subfolder", "type"} of the masked image', 400)
        filename, kind = ref["filename"], ref.get("type") or "output"
        for annotation in _FOLDER_TYPES:
            if filename.endswith(f" [{annotation}]"):
                filename, kind = filename[: -len(annotation) - 3], annotation
        root = self._folder(kind)
        if root is None:
            raise UnsafePath(f"original_ref.type: received {_shown(str(kind))}, expected one of {_FOLDER_TYPES}", 400)
        path = safe_path(root, str(ref.get("subfolder") or ""), filename)
        if not path.is_file():
            raise UnsafePath(f"original_ref: received {_shown(filename)}, expected an existing image", 404)
        return path

    async def _view_metadata(self, request: web.Request) -> web.Response:
        """ComfyUI's /view_metadata/{folder}?filename=x.safetensors: the file's ``__metadata__`` header."""
        folder, filename = request.match_info["folder_name"], request.query.get("filename", "")
        if folder != "loras" or not filename.endswith(".safetensors"):
            return web.Response(status=404)   # checkpoints here are engine exports, not .safetensors files
        try:
            path = self.pipeline.registry.lora(filename)
        except (FileNotFoundError, OSError, ValueError):
            return web.Response(status=404)
        metadata = await asyncio.get_running_loop().run_in_executor(None, _safetensors_metadata, path)
        return web.Response(status=404) if metadata is None else _json(metadata)

    def _features(self) -> dict:
        return {"supports_preview_metadata": False,
                "max_upload_size": int(self.config.max_upload_mb * 1024 * 1024)}

    # -- /view ----------------------------------------------------------------------------------------------
    async def _view(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        filename = q.get("filename")
        if filename is None:
            return web.Response(status=404)
        kind = q.get("type", "output")
        for annotation in _FOLDER_TYPES:  # "name.png [output]" names the folder, as in ComfyUI
            if filename.endswith(f" [{annotation}]"):
                filename, kind = filename[: -len(annotation) - 3], annotation
        root = self._folder(kind)
        if root is None:
            return web.Response(status=400, text=f"type: received {kind!r}, expected one of {_FOLDER_TYPES}")
        try:
            path = safe_path(root, q.get("subfolder", ""), filename)
        except UnsafePath as exc:
            return web.Response(status=exc.status, text=str(exc))
        if not path.is_file():
            return web.Response(status=404)
        disposition = {"Content-Disposition": f'filename="{path.name}"'}
        if "preview" in q or q.get("channel") in ("rgb", "a"):
            body, content_type = await asyncio.get_running_loop().run_in_executor(
                None, _render_view, path, q.get("preview"), q.get("channel", ""), self.config.max_image_pixels)
            if body is None:
                return web.Response(status=400, text=content_type or "filename: received a file that is not an "
                                    "image, expected an image for preview / channel")
            return web.Response(body=body, content_type=content_type, headers=disposition)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type in _FORCE_DOWNLOAD:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})

    # -- /upload/image --------------------------------------------------------------------------------------
    async def _upload(self, request: web.Request, mask: bool = False) -> web.Response:
        try:
            post = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise
        except Exception as exc:  # noqa: BLE001
            return _json(error_body("invalid_request", f"expected a multipart form with an 'image' file ({exc})"),
                         400)
        image = post.get("image")
        if image is None or not hasattr(image, "file"):
            return _json(error_body("invalid_request", "image: expected a file field named 'image'"), 400)
        kind = post.get("type") or "input"
        root = self._folder(kind)
        if root is None:
            return _json(error_body("invalid_request", f"type: received {kind!r}, expected one of {_FOLDER_TYPES}"),
                         400)
        subfolder = str(post.get("subfolder") or "")
        overwrite = str(post.get("overwrite") or "").lower() in ("true", "1")
        mask_onto = None
        if mask:  # /upload/mask: the upload's alpha goes onto the image named by original_ref
            try:
                mask_onto = self._mask_original(post.get("original_ref"))
            except UnsafePath as exc:
                return _json(error_body("invalid_filename", str(exc)), exc.status)
        try:
            name = await asyncio.get_running_loop().run_in_executor(
                None, _store_upload, root, subfolder, image.filename or "", image.file, overwrite,
                self.config.max_image_pixels, mask_onto)
        except UnsafePath as exc:
            return _json(error_body("invalid_filename", str(exc)), exc.status)
        except ValueError as exc:
            return _json(error_body("invalid_image", str(exc)), 400)
        return _json({"name": name, "subfolder": subfolder, "type": kind})

    # -- /system_stats --------------------------------------------------------------------------------------
    def _system_stats(self) -> dict:
        from .. import __version__ as version

        ram_total = ram_free = 0
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
            ram_total, ram_free = info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
        except (OSError, ValueError, IndexError):
            pass
        from ..engines.backends import device_type, pick_backend

        backend = getattr(self.pipeline, "backend", "auto")
        if backend == "auto":
            try:
                backend = pick_backend("auto")
            except Exception:  # noqa: BLE001 -- stats are best effort
                pass
        precision = getattr(self.pipeline, "precision", None)
        precision = f", precision {precision}" if precision else ""
        return {
            "system": {"os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                       "comfyui_version": COMFYUI_VERSION, "ksampler_rt_version": version,
                       "python_version": sys.version, "pytorch_version": None, "embedded_python": False,
                       "argv": sys.argv},
            "devices": [{"name": f"ksampler-rt ({backend}{precision}) on {platform.machine()}",
                         "type": device_type(backend), "index": 0,
                         "vram_total": 0, "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0}],
        }


def _json_depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON (iteratively; stops counting past ``limit``)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _safetensors_metadata(path: Path, max_header: int = 1 << 20) -> dict | None:
    """The ``__metadata__`` of a safetensors header (comfy.utils.safetensors_header, 1 MiB at most)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > max_header:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


def _redacted_argv(argv: list[str]) -> list[str]:
    """argv with the value of --auth-token hidden."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg == "--auth-token":
            out.append(arg)
            hide = True
        elif arg.startswith("--auth-token="):
            out.append("--auth-token=***")
        else:
            out.append(str(arg))
    return out


def _id_list(value) -> list[str]:
    """The prompt ids of a ``{"delete": [...]}`` body (anything else: none)."""
    return [str(v) for v in value if isinstance(v, (str, int))] if isinstance(value, list) else []


def _render_view(path: Path, preview: str | None, channel: str, max_pixels: int | None = None):
    """ComfyUI's /view ``preview=fmt;quality`` and ``channel=rgb|a`` conversions (images within the pixel cap:
    these decode the whole image)."""
    from PIL import Image

    try:
        img = Image.open(path)
        check_pixels(img, path.name, max_pixels)
        img.load()
    except ValueError as exc:
        return None, str(exc) if "--max-image-pixels" in str(exc) else None
    except Exception:  # noqa: BLE001
        return None, None
    buffer = io.BytesIO()
    if preview is not None:
        parts = preview.split(";")
        fmt = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in channel else "webp"
        quality = int(parts[-1]) if parts[-1].isdigit() else 90
        if fmt == "jpeg" or channel == "rgb":
            img = img.convert("RGB")
        img.save(buffer, format=fmt, quality=quality)
        return buffer.getvalue(), f"image/{fmt}"
    if channel == "rgb":
        img.convert("RGB").save(buffer, format="PNG")
    else:  # "a": the alpha channel as an RGBA image
        alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
        out = Image.new("RGBA", img.size)
        out.putalpha(alpha)
        out.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def _store_upload(root: Path, subfolder: str, filename: str, stream, overwrite: bool,
                  max_pixels: int | None = None, mask_onto: Path | None = None) -> str:
    """Write an uploaded image inside ``root`` (never outside); the stored file name. ``mask_onto``: ComfyUI's
    /upload/mask -- the stored image is that original with the upload's alpha channel (metadata kept)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = safe_path(root, subfolder, filename)
    data = stream.read()
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_pixels(img, filename, max_pixels)  # from the header, before anything is decoded
            img.verify()
    except ValueError as exc:
        if "--max-image-pixels" in str(exc):
            raise
        raise ValueError(f"image: received {_shown(filename)}, which is not a readable image; expected PNG, "
                         "JPEG, WebP, ...") from None
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"image: received {_shown(filename)}, which is not a readable image "
                         f"({type(exc).__name__}); expected PNG, JPEG, WebP, ...") from None
    if mask_onto is not None:
        with Image.open(mask_onto) as original:
            check_pixels(original, mask_onto.name, max_pixels)
            metadata = PngInfo()
            for key, value in getattr(original, "text", {}).items():
                metadata.add_text(key, value)
            rgba = original.convert("RGBA")
        with Image.open(io.BytesIO(data)) as upload:
            alpha = upload.convert("RGBA").getchannel("A")
        if alpha.size != rgba.size:
            raise ValueError(f"image: received a {alpha.size[0]}x{alpha.size[1]} mask, expected the original's size "
                             f"{rgba.size[0]}x{rgba.size[1]}")
        rgba.putalpha(alpha)
        buffer = io.BytesIO()
        rgba.save(buffer, format="PNG", compress_level=4, pnginfo=metadata)
        data = buffer.getvalue()
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() != root.resolve() and root.resolve() not in folder.resolve().parents:
        raise UnsafePath(f"subfolder: {subfolder!r} resolves outside the served folder", 403)
    if not overwrite:
        stem, suffix = os.path.splitext(filename)
        i = 1
        while path.exists() or path.is_symlink():
            if path.is_file() and path.resolve().is_relative_to(root.resolve()):
                if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
                    return path.name  # the same image is already there
            path = folder / f"{stem} ({i}){suffix}"
            i += 1
    tmp = folder / f".upload-{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # replaces a symlink itself, never its target
    return path.name


# -- running a server ----------------------------------------------------------------------------------------
async def serve_forever(server: PromptServer, stop_event: asyncio.Event | None = None) -> None:
    await server.start()
    stop_event = stop_event or asyncio.Event()
    try:
        await stop_event.wait()
    finally:
        await server.stop()


class ServerThread:
    """A server on its own event loop in a background thread (tests, benchmarks, notebooks)::

        with ServerThread(PromptServer(ServerConfig(port=0))) as srv:
            requests.post(srv.url + "/prompt", json=...)
    """

    def __init__(self, server: PromptServer, start_timeout: float = 30.0):
        self.server = server
        self.start_timeout = start_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.server.config.host}:{self.server.port}"

    def start(self) -> "ServerThread":
        self._thread = threading.Thread(target=self._main, name="ksampler-rt-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise TimeoutError(f"the server did not start within {self.start_timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.stop()

        asyncio.run(main())

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
