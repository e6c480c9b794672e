"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 -- re-exported for the server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0)
_RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.queue_pending = Gauge("ksampler_rt_queue_pending", "Prompts waiting in the queue", registry=r)
        self.queue_running = Gauge("ksampler_rt_queue_running", "Prompts being executed", registry=r)
        self.concurrency = Gauge("ksampler_rt_concurrency",
                                 "Prompts the server runs at once (the worker's concurrency)", registry=r)
        self.prompts = Counter("ksampler_rt_prompts", "Prompts finished, by outcome", ["status"], registry=r)
        for status in ("success", "error", "interrupted"):
            self.prompts.labels(status)
        self.rejected = Counter("ksampler_rt_prompts_rejected", "Prompts refused at POST /prompt, by reason",
                                ["reason"], registry=r)
        for reason in ("invalid", "queue_full", "bad_request"):
            self.rejected.labels(reason)
        self.stage = Histogram("ksampler_rt_stage_seconds",
                               "Latency per stage: validate (POST /prompt), queue_wait, execute, history, "
                               "total (accepted -> finished)", ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.node = Histogram("ksampler_rt_node_seconds", "Execution time of a node, by class",
                              ["class_type"], buckets=_LATENCY_BUCKETS, registry=r)
        self.cached_nodes = Counter("ksampler_rt_cached_nodes", "Nodes served from the output cache", registry=r)
        self.steps = Counter("ksampler_rt_sampling_steps", "Sampling steps run", registry=r)
        self.steps_per_second = Gauge("ksampler_rt_steps_per_second",
                                      "Sampling steps per second of the last sampler node", registry=r)
        self.steps_rate = Histogram("ksampler_rt_sampler_steps_per_second",
                                    "Sampling steps per second, one observation per sampler node",
                                    buckets=_RATE_BUCKETS, registry=r)
        self.ws_clients = Gauge("ksampler_rt_websocket_clients", "Connected WebSocket clients", registry=r)
        self.images = Counter("ksampler_rt_images", "Images written by output nodes", registry=r)
        self.engine_batch_rows = Histogram(
            "ksampler_rt_engine_batch_rows", "Rows (latents, cond and uncond) per UNet engine call; calls merged "
            "across concurrent prompts by step-level batching", buckets=_BATCH_BUCKETS, registry=r)
        self.engine_batch_prompts = Histogram(
            "ksampler_rt_engine_batch_prompts", "Prompts whose rows shared one UNet engine call",
            buckets=_BATCH_BUCKETS, registry=r)
        self.batch_wait = Histogram(
            "ksampler_rt_batch_wait_seconds", "Time a prompt's UNet calls waited for batch partners, one "
            "observation per prompt (the sum over its steps)", buckets=_WAIT_BUCKETS, registry=r)

    def observe_run(self, result) -> None:
        """Record a worker's RunResult."""
        for _, class_type, seconds in result.node_seconds:
            self.node.labels(class_type).observe(seconds)
        for _, steps, seconds in result.sampling:
            self.steps.inc(steps)
            if seconds > 0 and steps:
                rate = steps / seconds
                self.steps_per_second.set(rate)
                self.steps_rate.observe(rate)
        self.cached_nodes.inc(len(result.cached))
        for rows, prompts in getattr(result, "engine_batches", None) or ():
            self.engine_batch_rows.observe(rows)
            self.engine_batch_prompts.observe(prompts)
        if getattr(result, "engine_batches", None) or getattr(result, "batch_wait_s", 0.0):
            self.batch_wait.observe(float(result.batch_wait_s))
        for ui in result.outputs.values():
            if isinstance(ui, dict):
                self.images.inc(len(ui.get("images") or ()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
