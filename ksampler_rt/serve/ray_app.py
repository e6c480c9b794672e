"""The Ray Serve application behind ``ksampler-rt serve --workers ray`` (see docs/deploy-ray.md).

One deployment, :class:`KSamplerReplica`: each replica owns the engines of its models on one GPU
(``ray_actor_options={"num_gpus": 1}``; CPU replicas for tests) and executes ComfyUI prompts with the
same :class:`~ksampler_rt.serve.worker.LocalWorker` the in-process server uses, so events, errors and
images are identical. :meth:`KSamplerReplica.run` is a streaming method (an async generator called
with ``handle.options(stream=True)``): it yields the prompt's WebSocket events as they happen and
ends with one ``result`` / ``error`` / ``interrupted`` record. Output images travel inside the
``executed`` records as bytes (the front writes them into its own output folder, so ``/view`` works)
unless the replica writes into storage shared with the front (``shared_output``).

Step-level batching: with ``max_batch_size > 1`` a replica runs that many prompts at once (each on its
own thread) and their compatible UNet calls meet at the pipeline's gather point
(:class:`~ksampler_rt.runtime.batching.BatchingUNet`, within the replica): one engine call of up to
``max_batch_size`` rows per step instead of one per prompt. The same gather point makes every UNet
call of a replica run on one engine thread where the backend needs it (ORT CUDA graphs, TensorRT),
although prompts arrive on threads of their own.

Start it with ``ksampler-rt deploy ray`` or ``serve run ksampler_rt.serve.ray_app:build_app``
(arguments as ``key=value``), or let ``ksampler-rt serve --workers ray`` deploy it.
"""
from __future__ import annotations

import asyncio
import copy
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

APP_NAME = "ksampler-rt"
DEPLOYMENT_NAME = "KSamplerReplica"

# Records a replica streams back (first element of each tuple).
EVENT, EXECUTED, RESULT, ERROR, INTERRUPTED, HELLO = "event", "executed", "result", "error", "interrupted", "hello"


@dataclass
class RayAppConfig:
    """Everything that shapes the application (the ``serve run`` arguments / ``deploy`` options)."""

    models_dir: str | None = None         # registry folder on every node (shared storage or same path)
    backend: str = "auto"
    preload: list[str] = field(default_factory=list)   # checkpoints loaded when a replica starts
    num_replicas: int = 1                 # fixed count, unless autoscaling is on (min < max)
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0  # autoscaling target per replica
    num_gpus: float = 0.0                 # 1 on GPU clusters: a replica owns one GPU
    num_cpus: float = 1.0
    ort_threads: int | None = None        # $KSAMPLER_RT_ORT_THREADS inside replicas (CPU backend)
    max_batch_size: int = 1               # > 1: prompts per replica at once and rows per UNet call (batching)
    batch_wait_timeout_s: float = 0.002   # longest wait for batch partners (ksampler-rt --batch-wait-ms / 1000)
    cache_mb: float = 512.0
    preview: bool = False
    preview_size: int = 512
    shared_output: str | None = None      # replicas write images here (a folder the front also sees)
    app_name: str = APP_NAME

    @classmethod
    def from_args(cls, args: dict) -> "RayAppConfig":
        """From ``serve run`` ``key=value`` strings or a config file's ``args`` mapping."""
        known = {f.name: f for f in fields(cls)}
        out = {}
        for key, value in (args or {}).items():
            key = key.replace("-", "_")
            if key not in known:
                raise ValueError(f"{key}: unknown argument of the ksampler-rt Ray app; expected one of "
                                 f"{', '.join(sorted(known))}")
            out[key] = _coerce(key, value, cls.__dataclass_fields__[key].default)
        return cls(**out)

    @property
    def autoscaling(self) -> bool:
        return (self.min_replicas is not None and self.max_replicas is not None
                and self.max_replicas > self.min_replicas)

    def capacity(self) -> int:
        """Prompts the deployment runs at once at its largest (the front keeps that many in flight)."""
        replicas = self.max_replicas if self.autoscaling else self.num_replicas
        return max(1, int(replicas)) * max(1, int(self.max_batch_size))

    def deployment_options(self) -> dict:
        env = {}
        threads = self.ort_threads
        if threads is None and not self.num_gpus:
            threads = max(1, int(self.num_cpus))
        if threads:
            env["KSAMPLER_RT_ORT_THREADS"] = str(threads)
        for name in ("KSAMPLER_RT_CACHE", "KSAMPLER_RT_MODELS"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": max(1, int(self.max_batch_size)),
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  "runtime_env": {"env_vars": env}},
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": 5.0,
        }
        if self.autoscaling:
            options["autoscaling_config"] = {"min_replicas": int(self.min_replicas),
                                             "max_replicas": int(self.max_replicas),
                                             "target_ongoing_requests": float(self.target_ongoing_requests)}
        else:
            options["num_replicas"] = max(1, int(self.num_replicas))
        return options


def _coerce(key: str, value, default):
    if not isinstance(value, str):
        return value
    if key == "preload":
        return [v for v in value.split(",") if v]
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if key in ("min_replicas", "max_replicas", "num_replicas", "max_batch_size", "ort_threads", "preview_size"):
        return int(value)
    if isinstance(default, float) or key in ("num_gpus", "num_cpus"):
        return float(value)
    return value


# -- files -------------------------------------------------------------------------------------------
def collect_files(ui: dict | None, roots: dict[str, Path], *, remove: bool = True) -> list[dict]:
    """The image files a node's ``ui`` lists, as ``{type, subfolder, filename, data}`` (bytes)."""
    files = []
    for image in (ui or {}).get("images", []) or []:
        if not isinstance(image, dict):
            continue
        root = roots.get(image.get("type", "output"))
        if root is None:
            continue
        path = root.joinpath(*[p for p in str(image.get("subfolder", "")).split("/") if p], image["filename"])
        try:
            data = path.read_bytes()
        except OSError:
            continue
        files.append({"type": image.get("type", "output"), "subfolder": image.get("subfolder", ""),
                      "filename": image["filename"], "data": data})
        if remove:
            try:
                path.unlink()
            except OSError:
                pass
    return files


# -- the deployment -------------------------------------------------------------------------------------
class KSamplerReplica:
    """One replica: a Pipeline with loaded engines, executing prompts and streaming their events."""

    def __init__(self, config: dict | None = None):
        from ..runtime import jit
        from ..runtime.host_memory import tune_host_allocator
        from ..workflow.pipeline import Pipeline
        from .worker import LocalWorker

        tune_host_allocator()  # a replica is a process of its own, not started by the ksampler-rt command
        jit.warm_up_in_background()

        self.config = RayAppConfig(**(config or {}))
        c = self.config
        self.workdir = Path(tempfile.mkdtemp(prefix="ksampler-rt-replica-"))
        output_dir = Path(c.shared_output).resolve() if c.shared_output else self.workdir / "output"
        self.private_output = self.workdir / "output"
        self.pipeline = Pipeline(c.models_dir, backend=c.backend, output_dir=self.private_output,
                                 input_dir=self.workdir / "input", temp_dir=self.workdir / "temp", log=None,
                                 max_batch=max(1, int(c.max_batch_size)),
                                 batch_wait_ms=1000.0 * float(c.batch_wait_timeout_s))
        self.shared_output = output_dir if c.shared_output else None
        for folder in (self.private_output, self.pipeline.input_dir, self.pipeline.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.worker = LocalWorker(self.pipeline, cache_bytes=int(c.cache_mb * 1024 * 1024), preview=c.preview,
                                  preview_size=c.preview_size, concurrency=max(1, int(c.max_batch_size)))
        self.replica_id, self.pid, self.node = _replica_identity()
        self.busy = 0
        self.prompts_done = 0
        self.batches: list[int] = []   # prompts per UNet engine call (the calls of finished prompts)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._input_lock = threading.Lock()
        for name in c.preload:
            self.pipeline.load_checkpoint(name)

    # -- prompts ---------------------------------------------------------------------------------------
    def _write_inputs(self, inputs: dict | None) -> None:
        """Input images the front shipped with the prompt (LoadImage), into this replica's input folder."""
        root = self.pipeline.input_dir
        with self._input_lock:
            for name, data in (inputs or {}).items():
                path = (root / name).resolve()
                if root.resolve() not in path.parents:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.is_file() or path.read_bytes() != data:
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, path)

    async def run(self, request: dict):
        """Stream one prompt: ``(HELLO, info)``, then ``(EVENT, kind, data)`` / ``(EXECUTED, data,
        files)``, then one ``(RESULT, payload)``, ``(ERROR, details, outputs)`` or ``(INTERRUPTED, details,
        outputs)``. Cancelling the call (the front's ``/interrupt``) stops the prompt between steps."""
        from .worker import PromptExecutionError, PromptInterrupted

        loop = self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        prompt_id = request["prompt_id"]
        # Prompts running side by side on this replica each save into their own folder (SaveImage numbers
        # files by scanning its folder); engines, the node cache and loaded models stay shared.
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
        pipeline = copy.copy(self.pipeline)
        pipeline.output_dir, pipeline.temp_dir = run_dir / "output", run_dir / "temp"
        worker = copy.copy(self.worker)
        worker.pipeline = pipeline
        roots = {"output": pipeline.output_dir, "temp": pipeline.temp_dir}
        send_files = self.shared_output is None

        def put(record) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, record)

        def on_event(kind: str, data) -> None:
            if kind == "executed":
                output = data.get("output") or {}
                files = collect_files(output, roots) if send_files else self._publish(output, roots["output"])
                put((EXECUTED, data, files))
            else:
                put((EVENT, kind, data))

        def work() -> None:
            try:
                self._write_inputs(request.get("inputs"))
                result = worker.run(prompt_id, request["prompt"], request.get("extra_data") or {}, on_event,
                                         stop.is_set)
                self.batches.extend(prompts for _, prompts in result.engine_batches)
                put((RESULT, {"outputs": result.outputs, "node_seconds": result.node_seconds,
                              "sampling": result.sampling, "cached": result.cached, "seconds": result.seconds,
                              "engine_batches": result.engine_batches, "batch_wait_s": result.batch_wait_s}))
            except PromptInterrupted as exc:
                put((INTERRUPTED, exc.details, exc.outputs))
            except PromptExecutionError as exc:
                put((ERROR, exc.details, exc.outputs))
            except BaseException as exc:  # noqa: BLE001 -- reported to the front like a node error
                put((ERROR, {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
                             "exception_message": str(exc) or type(exc).__name__,
                             "exception_type": type(exc).__name__, "traceback": [], "current_inputs": {},
                             "current_outputs": []}, {}))

        self.busy += 1
        thread = threading.Thread(target=work, name=f"prompt-{prompt_id}", daemon=True)
        yield (HELLO, {"replica": self.replica_id, "pid": self.pid, "node": self.node})
        thread.start()
        try:
            while True:
                record = await queue.get()
                yield record
                if record[0] in (RESULT, ERROR, INTERRUPTED):
                    if record[0] == RESULT:
                        self.prompts_done += 1
                    break
        finally:  # cancelled (interrupt / front gone) or finished: the thread stops between steps
            stop.set()
            self.busy -= 1
            if not thread.is_alive():
                shutil.rmtree(run_dir, ignore_errors=True)

    def _publish(self, output: dict, root: Path) -> list:
        """Shared storage: move this node's images into the shared folder under free names; the
        ``output`` dict is rewritten in place with the names it got. Nothing travels to the front."""
        from .ray_files import place_file

        for image in output.get("images", []) or []:
            if image.get("type", "output") != "output":
                continue
            src = root.joinpath(*[p for p in str(image.get("subfolder", "")).split("/") if p],
                                               image["filename"])
            image["filename"] = place_file(self.shared_output, image.get("subfolder", ""), image["filename"],
                                           src.read_bytes())
            src.unlink(missing_ok=True)
        return []

    def info(self) -> dict:
        return {"replica": self.replica_id, "pid": self.pid, "node": self.node, "busy": self.busy,
                "prompts_done": self.prompts_done, "batches": list(self.batches)}

    def check_health(self) -> None:  # Serve's health check: the replica is alive if it answers
        return None

    def __del__(self):
        try:
            shutil.rmtree(self.workdir, ignore_errors=True)
        except Exception:  # noqa: BLE001
            pass


def _replica_identity() -> tuple[str, int, str]:
    replica_id = "local"
    node = ""
    try:
        from ray import serve

        replica_id = serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 -- outside Serve (unit use)
        pass
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        pass
    return str(replica_id), os.getpid(), node


def build_deployment(config: RayAppConfig):
    """The Serve application (bound deployment) for ``serve.run``."""
    from ray import serve

    cfg = {k: v for k, v in asdict(config).items() if k != "app_name"}
    deployment = serve.deployment(KSamplerReplica, **config.deployment_options())
    return deployment.bind(cfg)


def build_app(args: dict):
    """``serve run ksampler_rt.serve.ray_app:build_app models_dir=... num_replicas=2`` (an app builder)."""
    return build_deployment(RayAppConfig.from_args(args))


def local_ray_options(address: str | None, init_kwargs: dict | None) -> dict:
    """``ray.init`` options. A Ray instance started here (no address, no RAY_ADDRESS) is a one-machine
    instance: it binds the loopback address only, so nothing of it listens on the machine's network
    interfaces. (Ray turns 127.0.0.1 back into the machine's address unless its cluster mode is off.)"""
    import os

    if address is None and not os.environ.get("RAY_ADDRESS"):
        use_loopback_only()
    return dict(init_kwargs or {})


def use_loopback_only() -> None:
    """Make Ray's own address discovery answer 127.0.0.1 (here and in the processes it starts)."""
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def deploy(config: RayAppConfig, *, address: str | None = None, blocking: bool = False, init_kwargs=None):
    """Start (or update) the application on the Ray cluster at ``address`` (None: ``RAY_ADDRESS``,
    else a new local instance). Returns the app's handle."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, **local_ray_options(address, init_kwargs))
    serve.start(proxy_location="Disabled")
    return serve.run(build_deployment(config), name=config.app_name, route_prefix=None, blocking=blocking)
