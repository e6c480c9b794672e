"""Benchmark of ``ksampler-rt serve``: latency and throughput as a ComfyUI API client sees them.

    python -m ksampler_rt.bench.server                       # in-process server, loopback
    python -m ksampler_rt.bench.server --concurrency 1 4 16 --requests 32 --steps 20
    python -m ksampler_rt.bench.server --url http://127.0.0.1:8188 --ckpt tiny-sd15   # a running server

Each client is one ComfyUI websocket-example client: it opens ``/ws?clientId=``, POSTs a txt2img
prompt (a fresh seed each time, so sampling always runs), waits for ``executing`` with node null,
reads ``/history/{id}`` and downloads the PNG through ``/view``. Latency = POST sent -> last byte of
the image. Throughput = images / wall time of the level. The server runs in a child process (as
deployed: its event loop and worker thread do not share a GIL with the clients). The baseline is
``Pipeline.run_workflow`` on the same workflow, run in that child process before the server starts
(same engines, same process); the overhead is the server's p50 latency at concurrency 1 minus the
baseline p50. "execute ms" is the worker's own time per prompt inside the server (its /metrics).

The model is the registered tiny checkpoint when it can be loaded (``--model tiny``), else the
analytic stand-in of ``ksampler_rt.serve.testing`` (``--model fake``; the default ``auto`` picks).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path


def workflow(ckpt: str, steps: int, size: int, seed: int) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple on a wooden table, studio light",
                                                         "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": seed, "steps": steps, "cfg": 8.0,
                                                  "sampler_name": "euler", "scheduler": "normal",
                                                  "positive": ["6", 0], "negative": ["7", 0],
                                                  "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _pipeline(model: str, ckpt: str, root: Path, backend: str, models_dir: str | None):
    """(pipeline, model kind actually used)."""
    dirs = {"output_dir": root / "output", "input_dir": root / "input", "temp_dir": root / "temp"}
    if model in ("auto", "tiny"):
        try:
            from ..demo import TINY_CHECKPOINT, prepare_tiny_checkpoint
            from ..workflow.pipeline import Pipeline

            if models_dir is None and ckpt == TINY_CHECKPOINT:  # built / exported once, then cached
                models_dir = str(root / "models")
                prepare_tiny_checkpoint(models_dir, log=lambda message: None)
            pipe = Pipeline(models_dir, backend=backend, log=None, **dirs)
            pipe.load_checkpoint(ckpt)
            return pipe, "tiny"
        except Exception as exc:  # noqa: BLE001
            if model == "tiny":
                raise SystemExit(f"--model tiny: cannot load {ckpt!r} ({type(exc).__name__}: {exc})") from None
    from ..serve.testing import fake_pipeline

    return fake_pipeline((ckpt,), **dirs), "fake"


def _serve_child(model: str, ckpt: str, root: str, backend: str, models_dir: str | None, ready, stop,
                 base_args: tuple = ()) -> None:
    """The server process: the baseline runs first in it (same process, same engines), then the
    server serves on its own, as deployed (the clients live in the parent)."""
    from ..serve.server import PromptServer, ServerConfig, ServerThread

    pipe, kind = _pipeline(model, ckpt, Path(root), backend, models_dir)
    base = baseline(pipe, ckpt, *base_args) if base_args else []
    thread = ServerThread(PromptServer(ServerConfig(port=0, max_queue=1000), pipeline=pipe)).start()
    ready.put((thread.url, kind, base))
    stop.wait(3600)
    thread.stop()


def baseline(pipe, ckpt: str, steps: int, size: int, runs: int) -> list[float]:
    """Seconds per Pipeline.run_workflow call (same cache policy as the server)."""
    from ..serve.worker import BoundedOutputCache

    cache = BoundedOutputCache()
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        pipe.run_workflow(workflow(ckpt, steps, size, 10_000 + i), prompt_id=uuid.uuid4().hex, cache=cache)
        if i >= 2:  # two warm-up runs
            times.append(time.perf_counter() - t0)
    return times


async def _client(session, url: str, jobs: asyncio.Queue, latencies: list, ckpt: str, steps: int, size: int,
                  timeout: float):
    import aiohttp

    client_id = uuid.uuid4().hex
    async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        while True:
            try:
                seed = jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            async with session.post(f"{url}/prompt", json={"prompt": workflow(ckpt, steps, size, seed),
                                                           "client_id": client_id}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"POST /prompt answered {r.status}: {body}")
            prompt_id = body["prompt_id"]
            deadline = time.monotonic() + timeout
            while True:
                msg = await asyncio.wait_for(ws.receive(), max(0.1, deadline - time.monotonic()))
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data["type"] == "executing" and data["data"]["node"] is None \
                            and data["data"].get("prompt_id") == prompt_id:
                        break
                    if data["type"] == "execution_error" and data["data"].get("prompt_id") == prompt_id:
                        raise RuntimeError(f"prompt failed: {data['data'].get('exception_message')}")
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise RuntimeError("the websocket closed")
            async with session.get(f"{url}/history/{prompt_id}") as r:
                history = await r.json()
            for node_output in history[prompt_id]["outputs"].values():
                for image in node_output.get("images", []):
                    async with session.get(f"{url}/view", params=image) as r:
                        data = await r.read()
                        if r.status != 200 or not data:
                            raise RuntimeError(f"/view answered {r.status}")
            latencies.append(time.perf_counter() - t0)


async def run_level(url: str, concurrency: int, requests: int, ckpt: str, steps: int, size: int,
                    timeout: float, seed0: int) -> dict:
    import aiohttp

    jobs: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        jobs.put_nowait(seed0 + i)
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency * 2 + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(_client(session, url, jobs, latencies, ckpt, steps, size, timeout)
                                                for _ in range(concurrency))), timeout * requests)
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(latencies), "wall_s": wall,
            "images_per_s": len(latencies) / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95),
            "p99_ms": 1000 * percentile(latencies, 99), "mean_ms": 1000 * statistics.fmean(latencies)}


def _execute_totals(url: str) -> tuple[float, float] | None:
    """(sum, count) of the server's ``ksampler_rt_stage_seconds{stage="execute"}``, if it has /metrics."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001 -- e.g. a real ComfyUI
        return None
    values = {}
    for line in text.splitlines():
        for key in ("sum", "count"):
            if line.startswith(f'ksampler_rt_stage_seconds_{key}{{stage="execute"}}'):
                values[key] = float(line.split()[-1])
    return (values["sum"], values["count"]) if len(values) == 2 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ksampler_rt.bench.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="benchmark a running server (loopback) instead of an in-process one")
    p.add_argument("--model", default="auto", choices=("auto", "tiny", "fake"))
    p.add_argument("--ckpt", default="tiny-sd15")
    p.add_argument("--models", default=None, help="models folder for --model tiny")
    p.add_argument("--backend", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="prompts per concurrency level (at most 1000)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--baseline-runs", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one prompt may take")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 1000 or any(not 1 <= c <= 256 for c in args.concurrency):
        p.error("--requests must be 1..1000 and --concurrency 1..256")
    if args.url:
        from urllib.parse import urlsplit

        host = urlsplit(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            p.error(f"--url: received {args.url!r}; this benchmark only talks to loopback servers")

    results: dict = {"steps": args.steps, "size": args.size, "levels": []}
    with tempfile.TemporaryDirectory(prefix="ksampler-rt-bench-") as tmp:
        server_thread = None
        url = args.url
        if url is None:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            ready, stop = ctx.Queue(), ctx.Event()
            server_thread = ctx.Process(target=_serve_child, daemon=True,
                                        args=(args.model, args.ckpt, str(Path(tmp) / "server"), args.backend,
                                              args.models, ready, stop,
                                              (args.steps, args.size, args.baseline_runs)))
            server_thread.start()
            url, kind, base = ready.get(timeout=900)
            results["model"] = kind
            results["baseline"] = {"runs": len(base), "p50_ms": 1000 * percentile(base, 50),
                                   "p95_ms": 1000 * percentile(base, 95),
                                   "images_per_s": len(base) / sum(base)}
        else:
            results["model"] = f"remote {args.ckpt}"
        try:
            asyncio.run(run_level(url, 1, 2, args.ckpt, args.steps, args.size, args.timeout, 1))  # warm-up
            for i, concurrency in enumerate(args.concurrency):
                before = _execute_totals(url)
                level = asyncio.run(run_level(url, concurrency, args.requests, args.ckpt, args.steps, args.size,
                                              args.timeout, 1000 * (i + 1)))
                after = _execute_totals(url)
                if before and after and after[1] > before[1]:
                    level["server_execute_ms"] = 1000 * (after[0] - before[0]) / (after[1] - before[1])
                results["levels"].append(level)
        finally:
            if server_thread is not None:
                stop.set()
                server_thread.join(30)
                if server_thread.is_alive():
                    server_thread.terminate()

    print(f"model: {results['model']}  workflow: txt2img {args.size}x{args.size}, {args.steps} steps euler, "
          f"cfg 8  (cpu count {os.cpu_count()})")
    if "baseline" in results:
        b = results["baseline"]
        print(f"Pipeline.run_workflow (no server): p50 {b['p50_ms']:.1f} ms  p95 {b['p95_ms']:.1f} ms  "
              f"{b['images_per_s']:.2f} images/s")
    print(f"{'clients':>7} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'images/s':>9} "
          f"{'execute ms':>10}")
    for level in results["levels"]:
        execute = level.get("server_execute_ms")
        print(f"{level['concurrency']:>7} {level['requests']:>8} {level['p50_ms']:>8.1f} {level['p95_ms']:>8.1f} "
              f"{level['p99_ms']:>8.1f} {level['images_per_s']:>9.2f} "
              f"{'-' if execute is None else format(execute, '.1f'):>10}")
    print("(execute ms: the worker's mean time per prompt inside the server, from its /metrics)")
    if "baseline" in results and results["levels"] and results["levels"][0]["concurrency"] == 1:
        overhead = results["levels"][0]["p50_ms"] - results["baseline"]["p50_ms"]
        results["overhead_ms_p50"] = overhead
        print(f"server overhead at 1 client (p50 latency - p50 run_workflow): {overhead:.1f} ms "
              f"({100 * overhead / results['baseline']['p50_ms']:.0f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
