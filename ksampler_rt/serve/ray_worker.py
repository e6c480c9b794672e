"""The front's side of ``--workers ray``: :class:`RayWorker` (the server's Worker interface, executing on
the Ray Serve deployment of :mod:`ksampler_rt.serve.ray_app`) and :func:`make_ray_server` (a plain
:class:`~ksampler_rt.serve.server.PromptServer` with a RayWorker, which keeps ``worker.concurrency``
prompts in flight: as many as the deployment has room for unless configured otherwise).

Fault tolerance: a replica that dies during a prompt (killed process, lost node) breaks the prompt's
stream; the prompt is sent again (``max_retries`` times, with a short backoff, Serve routes it to a
live replica) and then fails with ``execution_error``. Completion is decided at the front: only the
first final record of a prompt is accepted, images of a retried node overwrite the files of the
earlier attempt instead of adding new ones, and an ``executed`` message already sent for a node is
not sent again, so a prompt never completes twice and its history entry is written once.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .ray_app import ERROR, EVENT, EXECUTED, HELLO, INTERRUPTED, RESULT, RayAppConfig, local_ray_options
from .ray_files import place_file
from .worker import PromptExecutionError, PromptInterrupted, RunResult

log = logging.getLogger("ksampler_rt.serve.ray")


def _retryable_errors() -> tuple:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError", "LocalRayletDiedError")
    found = tuple(getattr(rex, n) for n in names if hasattr(rex, n))
    try:
        from ray.serve.exceptions import DeploymentUnavailableError

        found += (DeploymentUnavailableError,)
    except ImportError:
        pass
    return found


def _input_names(prompt: dict) -> set[str]:
    """Input-folder files a prompt reads (LoadImage / LoadImageMask ``image`` inputs)."""
    names = set()
    for node in prompt.values():
        if not isinstance(node, dict) or "LoadImage" not in str(node.get("class_type", "")):
            continue
        value = (node.get("inputs") or {}).get("image")
        if isinstance(value, str):
            names.add(value[: -len(" [input]")] if value.endswith(" [input]") else value)
    return names


class RayWorker:
    """Executes prompts on the Ray Serve app ``app_name`` (deploying it from ``config`` if absent).

    ``address``: a running cluster (``ray://`` or ``host:port``, or ``auto``); None starts a local Ray
    instance in this process (``init_kwargs`` passed to ``ray.init``), which :meth:`close` stops.
    ``concurrency``: prompts the front keeps in flight; default ``config.capacity()`` (replicas x max
    ongoing requests per replica; with autoscaling, at the most replicas).
    """

    def __init__(self, *, output_dir, temp_dir, input_dir, address: str | None = None,
                 config: RayAppConfig | None = None, deploy: bool = True, max_retries: int = 2,
                 retry_backoff_s: float = 0.5, init_kwargs: dict | None = None, concurrency: int | None = None):
        if concurrency is not None and int(concurrency) < 1:
            raise ValueError(f"concurrency: received {concurrency}, expected a positive integer")
        import ray
        from ray import serve

        from .ray_app import deploy as deploy_app

        self.config = config or RayAppConfig()
        self.output_dir, self.temp_dir, self.input_dir = Path(output_dir), Path(temp_dir), Path(input_dir)
        self.shared = bool(self.config.shared_output)
        self.max_retries = int(max_retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self._owns_ray = not ray.is_initialized() and address is None
        if not ray.is_initialized():
            ray.init(address=address, **local_ray_options(address, init_kwargs))
        try:
            self.handle = serve.get_app_handle(self.config.app_name)
            self.deployed = False
        except Exception:  # noqa: BLE001 -- not running yet
            if not deploy:
                raise ValueError(f"no Ray Serve application {self.config.app_name!r} on the cluster; start it "
                                 "with `ksampler-rt deploy ray`") from None
            self.handle = deploy_app(self.config)
            self.deployed = True
        self.concurrency = int(concurrency) if concurrency is not None else self.config.capacity()
        self._retryable = _retryable_errors()
        self.stats: dict[str, dict] = {}   # prompt id -> {"replicas": [...], "attempts": n, "status": ...}
        self._lock = threading.Lock()

    # -- the Worker interface ----------------------------------------------------------------------------
    def run(self, prompt_id: str, prompt: dict, extra_data: dict, on_event: Callable[[str, Any], None],
            is_interrupted: Callable[[], bool]) -> RunResult:
        from ray.serve.exceptions import RequestCancelledError

        request = {"prompt_id": prompt_id, "prompt": prompt, "extra_data": extra_data,
                   "inputs": self._inputs(prompt)}
        stat = {"replicas": [], "pids": [], "attempts": 0, "status": "running"}
        with self._lock:
            self.stats[prompt_id] = stat
        placed: dict[tuple[str, int], str] = {}
        reported: set[str] = set()
        outputs: dict[str, dict] = {}
        state: dict[str, Any] = {"node": None, "executed": []}
        start = time.perf_counter()
        while True:
            stat["attempts"] += 1
            generator = self.handle.options(stream=True).run.remote(request)
            cancelled = threading.Event()
            done = threading.Event()
            threading.Thread(target=self._watch, args=(generator, is_interrupted, cancelled, done),
                             daemon=True).start()
            try:
                for record in generator:
                    kind = record[0]
                    if kind == HELLO:
                        stat["replicas"].append(record[1]["replica"])
                        stat["pids"].append(record[1]["pid"])
                    elif kind == EVENT:
                        if record[1] == "executing":
                            state["node"] = record[2].get("node")
                        on_event(record[1], record[2])
                    elif kind == EXECUTED:
                        data, files = record[1], record[2]
                        node = str(data.get("node"))
                        self._place(node, data.get("output") or {}, files, placed)
                        outputs[node] = data.get("output")
                        if node not in state["executed"]:
                            state["executed"].append(node)
                        if node not in reported:
                            reported.add(node)
                            on_event("executed", data)
                    elif kind == RESULT:
                        payload = record[1]
                        stat["status"] = "success"
                        return RunResult(outputs=outputs if outputs or not payload["outputs"] else payload["outputs"],
                                         node_seconds=[tuple(x) for x in payload["node_seconds"]],
                                         sampling=[tuple(x) for x in payload["sampling"]],
                                         cached=list(payload["cached"]), seconds=time.perf_counter() - start,
                                         engine_batches=[tuple(x) for x in payload.get("engine_batches", ())],
                                         batch_wait_s=float(payload.get("batch_wait_s", 0.0)))
                    elif kind == ERROR:
                        stat["status"] = "error"
                        raise PromptExecutionError(record[1], outputs)
                    elif kind == INTERRUPTED:
                        stat["status"] = "interrupted"
                        raise PromptInterrupted(record[1], outputs)
                raise ConnectionError("the replica's stream ended without a result")
            except (PromptExecutionError, PromptInterrupted):
                raise
            except Exception as exc:  # noqa: BLE001
                if cancelled.is_set() or isinstance(exc, RequestCancelledError):
                    stat["status"] = "interrupted"
                    node = state["node"]
                    raise PromptInterrupted({"prompt_id": prompt_id, "node_id": node,
                                             "node_type": (prompt.get(node) or {}).get("class_type") if node else None,
                                             "executed": list(state["executed"])}, outputs) from None
                retry = isinstance(exc, self._retryable) or isinstance(exc, ConnectionError)
                if retry and stat["attempts"] <= self.max_retries:
                    log.warning("prompt %s: replica %s failed (%s: %s); retrying (%d/%d)", prompt_id,
                                stat["replicas"][-1] if stat["replicas"] else "?", type(exc).__name__, exc,
                                stat["attempts"], self.max_retries)
                    time.sleep(self.retry_backoff_s * stat["attempts"])
                    continue
                stat["status"] = "error"
                node = state["node"]
                raise PromptExecutionError({
                    "prompt_id": prompt_id, "node_id": node,
                    "node_type": (prompt.get(node) or {}).get("class_type") if node else None,
                    "executed": list(state["executed"]),
                    "exception_message": (f"the Ray replica running this prompt failed {stat['attempts']} times; "
                                          f"last: {type(exc).__name__}: {exc}") if retry else f"{exc}",
                    "exception_type": f"{type(exc).__module__}.{type(exc).__name__}",
                    "traceback": [], "current_inputs": {}, "current_outputs": list(state["executed"])},
                    outputs) from None
            finally:
                done.set()

    @staticmethod
    def _watch(generator, is_interrupted, cancelled: threading.Event, done: threading.Event) -> None:
        """Cancel the replica call when the front interrupts the prompt (the replica stops between steps)."""
        while not done.wait(0.05):
            try:
                if is_interrupted():
                    cancelled.set()
                    generator.cancel()
                    return
            except Exception:  # noqa: BLE001
                return

    def _place(self, node: str, output: dict, files: list[dict], placed: dict) -> None:
        """Write a node's images into the front's folders and rewrite ``output`` with the names used."""
        if not files:
            return
        images = output.get("images") or []
        for index, (image, file) in enumerate(zip(images, files)):
            root = self.temp_dir if file["type"] == "temp" else self.output_dir
            key = (node, index)
            if key in placed:   # a retried node: same name, same (deterministic) content
                name = place_file(root, file["subfolder"], placed[key], file["data"], overwrite=True)
            else:
                name = place_file(root, file["subfolder"], file["filename"], file["data"])
            placed[key] = name
            image["filename"] = name

    def _inputs(self, prompt: dict) -> dict[str, bytes]:
        out = {}
        root = self.input_dir.resolve()
        for name in _input_names(prompt):
            path = (root / name).resolve()
            if root in path.parents and path.is_file():
                out[name] = path.read_bytes()
        return out

    def free(self, unload_models: bool = False, free_memory: bool = False) -> None:
        """Replicas manage their own memory (each keeps its engines loaded); nothing to do here."""

    def replicas(self) -> list[dict]:
        """``info()`` of the replicas answering a few calls (Serve picks the replica: best effort)."""
        seen = {}
        for _ in range(8):
            info = self.handle.info.remote().result()
            seen[info["replica"]] = info
        return list(seen.values())

    def close(self) -> None:
        import ray
        from ray import serve

        if self._owns_ray:
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001
                pass
            ray.shutdown()


def make_ray_server(config, *, address: str | None = None, app_config: RayAppConfig | None = None,
                    pipeline=None, **worker_kwargs):
    """A server whose prompts run on Ray Serve (what ``ksampler-rt serve --workers ray`` builds): a plain
    ``PromptServer`` with a :class:`RayWorker` (``worker_kwargs``: its ``concurrency``, ``max_retries``, ...)."""
    from ..workflow.pipeline import Pipeline

    if pipeline is None:  # the front validates prompts and serves files; it never loads engines
        output_dir = Path(config.output_dir).resolve()
        temp_dir = Path(config.temp_dir).resolve() if config.temp_dir else output_dir.parent / "temp"
        pipeline = Pipeline(config.models_dir, backend=config.backend, output_dir=output_dir,
                            input_dir=Path(config.input_dir).resolve(), temp_dir=temp_dir, log=log.info)
    app_config = app_config or RayAppConfig(models_dir=config.models_dir, backend=config.backend,
                                            preview=config.preview, preview_size=config.preview_size,
                                            cache_mb=config.cache_mb)
    if app_config.shared_output:
        pipeline.output_dir = Path(app_config.shared_output).resolve()
    worker = RayWorker(output_dir=pipeline.output_dir, temp_dir=pipeline.temp_dir, input_dir=pipeline.input_dir,
                       address=address, config=app_config, **worker_kwargs)
    config.preload = []  # replicas preload (app_config.preload); the front has no engines
    from .server import PromptServer

    return PromptServer(config, pipeline=pipeline, worker=worker)
