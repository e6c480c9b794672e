"""Benchmark of ``ksampler-rt serve --workers ray`` against the in-process worker, in one run.

    python -m ksampler_rt.bench.ray                          # tiny model, local Ray, CPU replicas
    python -m ksampler_rt.bench.ray --clients 8 --requests 24 --steps 20 --size 64

Measured as a ComfyUI API client sees it (``/ws`` + ``POST /prompt`` -> ``executing`` null ->
``/history`` -> ``/view``): latency = POST sent -> last byte of the image.

1. single-prompt latency, one client, sequential prompts: in-process worker vs Ray (1 replica);
   the difference of the medians is the added latency of the Ray path;
2. throughput (images/s) and p50 / p95 latency of ``--clients`` concurrent clients with 1 and then
   2 replicas (same front, same Ray instance; each replica has ``--cpus-per-replica`` CPUs and as
   many ORT threads).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from .server import percentile, workflow


async def _one(session, url: str, prompt: dict) -> float:
    client_id = os.urandom(8).hex()
    t0 = time.perf_counter()
    async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
            prompt_id = (await r.json())["prompt_id"]
        async for msg in ws:
            if msg.type.name != "TEXT":
                continue
            data = json.loads(msg.data)
            if data["type"] == "executing" and data["data"].get("node") is None \
                    and data["data"].get("prompt_id") == prompt_id:
                break
            if data["type"] == "execution_error":
                raise RuntimeError(data["data"].get("exception_message"))
    async with session.get(f"{url}/history/{prompt_id}") as r:
        entry = (await r.json())[prompt_id]
    image = entry["outputs"]["9"]["images"][0]
    async with session.get(f"{url}/view", params={"filename": image["filename"], "subfolder": image["subfolder"],
                                                  "type": "output"}) as r:
        await r.read()
    return time.perf_counter() - t0


async def _load(url: str, clients: int, requests: int, args, seed0: int) -> dict:
    import aiohttp

    counter = iter(range(requests))
    latencies: list[float] = []

    async def client(session):
        for i in counter:
            latencies.append(await _one(session, url, workflow(args.ckpt, args.steps, args.size, seed0 + i)))

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"images": len(latencies), "wall_s": wall, "images_per_s": len(latencies) / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95)}


class _Front:
    """A front (server) in a child process: ``kind`` local (app None) or Ray (connects to ``address``)."""

    def __init__(self, config, app, address):
        import dataclasses
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.spec = json.dumps({"config": dataclasses.asdict(config),
                                "app": dataclasses.asdict(app) if app is not None else None, "address": address})

    def __enter__(self) -> str:
        import subprocess
        import sys
        import urllib.request

        # Ray starts replicas with OMP_NUM_THREADS = their CPUs; the in-process front gets the same
        threads = os.environ.get("KSAMPLER_RT_ORT_THREADS", "1")
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys; from ksampler_rt.bench.ray import _child; "
                                      "_child(sys.argv[1])", self.spec], env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the front exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2).read()
                return self.url
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("the front did not start")

    def __exit__(self, *exc) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def _child(spec: str) -> None:
    import signal

    from ..serve.ray_app import RayAppConfig
    from ..serve.server import PromptServer, ServerConfig, serve_forever

    spec = json.loads(spec)
    config = ServerConfig(**spec["config"])

    async def run():
        if spec["app"] is None:
            server = PromptServer(config)
        else:
            from ..serve.ray_worker import make_ray_server

            server = make_ray_server(config, address=spec["address"], app_config=RayAppConfig(**spec["app"]),
                                     init_kwargs={"log_to_driver": False})
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await serve_forever(server, stop)

    asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ksampler_rt.bench.ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24, help="prompts per throughput level (default 24)")
    parser.add_argument("--single", type=int, default=8, help="sequential prompts for the latency comparison")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--ckpt", default="tiny-sd15")
    parser.add_argument("--backend", default="onnxruntime-cpu")
    parser.add_argument("--models", default=None, help="models folder (default: build the tiny model in a temp cache)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from ..serve.ray_app import RayAppConfig, deploy
    from ..serve.server import ServerConfig

    root = Path(tempfile.mkdtemp(prefix="ksampler-rt-bench-ray-"))
    if args.models is None:
        from ..demo import prepare_tiny_checkpoint

        os.environ.setdefault("KSAMPLER_RT_CACHE", str(root / "cache"))
        args.models = str(root / "models")
        prepare_tiny_checkpoint(args.models, log=lambda m: None)
    threads = max(1, int(args.cpus_per_replica))
    os.environ["KSAMPLER_RT_ORT_THREADS"] = str(threads)   # the in-process worker gets what one replica gets
    results: dict = {"clients": args.clients, "requests": args.requests, "steps": args.steps, "size": args.size,
                     "ort_threads_per_worker": threads}

    def config(name: str) -> ServerConfig:
        d = root / name
        return ServerConfig(host="127.0.0.1", port=0, models_dir=args.models, backend=args.backend,
                            output_dir=str(d / "output"), input_dir=str(d / "input"), temp_dir=str(d / "temp"))

    def single(url: str, seed0: int) -> float:
        async def go():
            import aiohttp

            out = []
            async with aiohttp.ClientSession() as session:
                await _one(session, url, workflow(args.ckpt, args.steps, args.size, seed0 - 1))  # warm-up
                for i in range(args.single):
                    out.append(await _one(session, url, workflow(args.ckpt, args.steps, args.size, seed0 + i)))
            return 1000 * percentile(out, 50)
        return asyncio.run(go())

    # 1. in-process worker (the front in a child process, as deployed, so clients do not share its GIL)
    with _Front(config("local"), None, None) as url:
        results["local_single_p50_ms"] = single(url, 1000)
        results["local"] = asyncio.run(_load(url, args.clients, args.requests, args, 5000))

    from ..serve.ray_app import use_loopback_only

    use_loopback_only()  # a local instance: loopback only
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             log_to_driver=False)
    try:
        for replicas in (1, 2):
            app = RayAppConfig(models_dir=args.models, backend=args.backend, num_replicas=replicas,
                               num_cpus=args.cpus_per_replica / 2 if args.ray_cpus < 2 * args.cpus_per_replica
                               else args.cpus_per_replica, ort_threads=threads, preload=[args.ckpt])
            deploy(app)
            address = ray.get_runtime_context().gcs_address
            with _Front(config(f"ray{replicas}"), app, address) as url:
                if replicas == 1:
                    results["ray_single_p50_ms"] = single(url, 2000)
                    results["ray_added_latency_ms"] = results["ray_single_p50_ms"] - results["local_single_p50_ms"]
                asyncio.run(_load(url, 2, 4, args, 9000))  # warm every replica
                results[f"ray_{replicas}_replicas"] = asyncio.run(
                    _load(url, args.clients, args.requests, args, 10000 * (replicas + 1)))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"tiny model, {args.size}x{args.size}, {args.steps} steps, {args.clients} concurrent clients, "
          f"{args.requests} prompts per level, {threads} ORT thread(s) per worker")
    print(f"single prompt p50: in-process {results['local_single_p50_ms']:.1f} ms, Ray {results['ray_single_p50_ms']:.1f}"
          f" ms -> Ray adds {results['ray_added_latency_ms']:.1f} ms")
    print(f"{'worker':<22}{'images/s':>10}{'p50 ms':>10}{'p95 ms':>10}")
    for key, label in (("local", "in-process"), ("ray_1_replicas", "Ray, 1 replica"), ("ray_2_replicas", "Ray, 2 replicas")):
        r = results[key]
        print(f"{label:<22}{r['images_per_s']:>10.2f}{r['p50_ms']:>10.1f}{r['p95_ms']:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
