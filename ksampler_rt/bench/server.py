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

Step-level batching (issue 24): ``--batching off on`` runs every concurrency level once per mode in one
invocation (a fresh server process per mode: ``off`` is the server as shipped, one prompt at a time;
``on`` is ``--max-batch N``), and prints both tables plus the gain. ``--model modelled-...`` serves the
analytic stand-in behind a **modelled GPU engine**: every UNet call sleeps the time a published
per-batch latency table gives for its number of rows (:data:`LATENCY_PROFILES`, cited there), one call
at a time (a GPU runs one UNet call at a time). It shows the scheduling gain without a GPU; it is a
model, not a measurement.

    python -m ksampler_rt.bench.server --model modelled-sd15-a100-ort --size 512 --batching off on \
        --concurrency 1 2 4 8 16 --max-batch 32 --chart docs/batching.png
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


# -- the modelled GPU engine ------------------------------------------------------------------------------
#: Seconds per UNet call by rows (latents incl. CFG's cond + uncond rows) for SD1.5 at 512x512.
#: Derived from published end-to-end txt2img latencies at 50 steps, one image batch = 2 UNet rows (CFG):
#: per-call seconds = pipeline latency / 50 (CLIP and VAE are amortised into it, so large batches are
#: slightly overstated). No per-batch SD1.5 figures for an H100 were found; these are A100 figures.
#: Uniform scaling (a faster GPU with the same shape) leaves every ratio the benchmark reports unchanged.
LATENCY_PROFILES: dict[str, dict] = {
    # ONNX Runtime's Stable Diffusion GPU optimisation README, "Results of A100-SXM4-40GB (Ubuntu 20.04)",
    # onnxruntime 1.14.1 CUDA EP, fp16 optimised pipeline, 512x512, 50 steps: batch 1 / 4 / 8 / 16 images
    # -> 1.1 / 3.7 / 6.9 / 13.6 s. https://github.com/microsoft/onnxruntime/blob/main/onnxruntime/python/
    # tools/transformers/models/stable_diffusion/README.md
    "sd15-a100-ort": {"label": "SD1.5 512x512 UNet, A100-SXM4-40GB, ONNX Runtime 1.14.1 CUDA fp16 (published)",
                      "rows_seconds": {2: 1.1 / 50, 8: 3.7 / 50, 16: 6.9 / 50, 32: 13.6 / 50}},
    # diffusers' "Torch 2.0" optimisation guide, benchmark table (PR huggingface/diffusers#2764), A100,
    # PyTorch 2.0 SDPA, SD1.5 512x512, 50 steps: batch 1 / 2 / 4 / 8 / 16 images -> 1.98 / 2.38 / 3.89 /
    # 7.04 / 13.55 s. https://huggingface.co/docs/diffusers/optimization/torch2.0
    "sd15-a100-torch": {"label": "SD1.5 512x512 UNet, A100, PyTorch 2.0 SDPA fp16 (published)",
                        "rows_seconds": {2: 1.98 / 50, 4: 2.38 / 50, 8: 3.89 / 50, 16: 7.04 / 50,
                                         32: 13.55 / 50}},
}


def modelled_seconds(profile: str, rows: int) -> float:
    """A UNet call's modelled time for ``rows`` rows: linear between the table's points, the smallest
    point below it (an engine never gets faster than at its smallest measured batch), proportional above."""
    table = sorted(LATENCY_PROFILES[profile]["rows_seconds"].items())
    if rows <= table[0][0]:
        return table[0][1]
    for (r0, s0), (r1, s1) in zip(table, table[1:]):
        if rows <= r1:
            return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
    r_last, s_last = table[-1]
    return s_last * rows / r_last


class ModelledUNet:
    """A UNet engine whose call takes the modelled time of its batch (one call at a time, like one GPU);
    the values come from the analytic stand-in it wraps. Clearly a model: see :data:`LATENCY_PROFILES`."""

    def __init__(self, inner, profile: str):
        import threading

        if profile not in LATENCY_PROFILES:
            raise ValueError(f"profile: received {profile!r}, expected one of {sorted(LATENCY_PROFILES)}")
        self.inner, self.profile = inner, profile
        self._device = threading.Lock()

    def __call__(self, x, timestep, context=None, **kwargs):
        import numpy as np

        with self._device:
            t0 = time.perf_counter()
            out = self.inner(x, timestep, context, **kwargs)
            left = modelled_seconds(self.profile, int(np.shape(x)[0])) - (time.perf_counter() - t0)
            if left > 0:
                time.sleep(left)
            return out


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
    if model.startswith("modelled-"):
        from ..serve.testing import fake_pipeline

        pipe = fake_pipeline((ckpt,), **dirs)
        checkpoint = pipe.load_checkpoint(ckpt)
        checkpoint.model.unet = ModelledUNet(checkpoint.model.unet, model[len("modelled-"):])
        return pipe, f"{model} (analytic values, {LATENCY_PROFILES[model[len('modelled-'):]]['label']}, MODELLED)"
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
                 base_args: tuple = (), max_batch: int = 1, batch_wait_ms: float | None = None) -> None:
    """The server process: the baseline runs first in it (same process, same engines), then the
    server serves on its own, as deployed (the clients live in the parent)."""
    from ..serve.server import PromptServer, ServerConfig, ServerThread

    pipe, kind = _pipeline(model, ckpt, Path(root), backend, models_dir)
    base = baseline(pipe, ckpt, *base_args) if base_args else []
    config = ServerConfig(port=0, max_queue=1000, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    thread = ServerThread(PromptServer(config, pipeline=pipe)).start()
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


def _run_mode(args, tmp: str, mode: str, results: dict) -> list[dict]:
    """All concurrency levels against one server (started here unless ``--url``); batching ``mode``."""
    server_proc = None
    url = args.url
    if url is None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        ready, stop = ctx.Queue(), ctx.Event()
        max_batch = args.max_batch if mode == "on" else 1
        server_proc = ctx.Process(target=_serve_child, daemon=True,
                                  args=(args.model, args.ckpt, str(Path(tmp) / f"server-{mode}"), args.backend,
                                        args.models, ready, stop,
                                        (args.steps, args.size, args.baseline_runs) if "baseline" not in results
                                        else (), max_batch, args.batch_wait_ms))
        server_proc.start()
        url, kind, base = ready.get(timeout=900)
        results["model"] = kind
        if base:
            results["baseline"] = {"runs": len(base), "p50_ms": 1000 * percentile(base, 50),
                                   "p95_ms": 1000 * percentile(base, 95), "images_per_s": len(base) / sum(base)}
    else:
        results["model"] = f"remote {args.ckpt}"
    levels = []
    try:
        asyncio.run(run_level(url, 1, 2, args.ckpt, args.steps, args.size, args.timeout, 1))  # warm-up
        for i, concurrency in enumerate(args.concurrency):
            before = _execute_totals(url)
            requests = args.requests if args.requests else max(8, 3 * concurrency)
            level = asyncio.run(run_level(url, concurrency, requests, args.ckpt, args.steps, args.size,
                                          args.timeout, 1000 * (i + 1)))
            after = _execute_totals(url)
            if before and after and after[1] > before[1]:
                level["server_execute_ms"] = 1000 * (after[0] - before[0]) / (after[1] - before[1])
            level["batching"] = mode
            levels.append(level)
            print(f"  [{mode}] {concurrency} clients: {level['images_per_s']:.2f} images/s, "
                  f"p50 {level['p50_ms']:.0f} ms, p95 {level['p95_ms']:.0f} ms", flush=True)
    finally:
        if server_proc is not None:
            stop.set()
            server_proc.join(30)
            if server_proc.is_alive():
                server_proc.terminate()
    return levels


def _print_table(levels: list[dict]) -> None:
    print(f"{'clients':>7} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'images/s':>9} "
          f"{'execute ms':>10}")
    for level in levels:
        execute = level.get("server_execute_ms")
        print(f"{level['concurrency']:>7} {level['requests']:>8} {level['p50_ms']:>8.1f} {level['p95_ms']:>8.1f} "
              f"{level['p99_ms']:>8.1f} {level['images_per_s']:>9.2f} "
              f"{'-' if execute is None else format(execute, '.1f'):>10}")


def batching_gain(off: list[dict], on: list[dict]) -> list[dict]:
    """Per concurrency level: images/s with batching over without, and p95 latency over the solo
    (1 client, batching off) p50 latency."""
    solo = next((lv["p50_ms"] for lv in off if lv["concurrency"] == 1), None)
    out = []
    for a, b in zip(off, on):
        row = {"concurrency": a["concurrency"], "throughput_gain": b["images_per_s"] / a["images_per_s"]}
        if solo:
            row["p95_over_solo_on"] = b["p95_ms"] / solo
            row["p95_over_solo_off"] = a["p95_ms"] / solo
        out.append(row)
    return out


def write_chart(results: dict, path: str) -> None:
    """images/s and p95 latency against clients, batching off and on (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("off", "o--"), ("on", "s-")):
        levels = results["modes"].get(mode)
        if not levels:
            continue
        x = [lv["concurrency"] for lv in levels]
        ax1.plot(x, [lv["images_per_s"] for lv in levels], style, label=f"batching {mode}")
        ax2.plot(x, [lv["p95_ms"] / 1000 for lv in levels], style, label=f"batching {mode}")
    ticks = [lv["concurrency"] for lv in next(iter(results["modes"].values()))]
    for ax, title in ((ax1, "throughput (images/s)"), (ax2, "p95 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results['model']}: txt2img {results['size']}px, {results['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ksampler_rt.bench.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="benchmark a running server (loopback) instead of an in-process one")
    p.add_argument("--model", default="auto",
                   choices=("auto", "tiny", "fake") + tuple(f"modelled-{k}" for k in LATENCY_PROFILES),
                   help="tiny / fake (analytic stand-in) / modelled-PROFILE: the stand-in behind a modelled GPU "
                        "engine (per-batch latencies of a published table; see LATENCY_PROFILES)")
    p.add_argument("--ckpt", default="tiny-sd15")
    p.add_argument("--models", default=None, help="models folder for --model tiny")
    p.add_argument("--backend", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32,
                   help="prompts per concurrency level (at most 1000; 0: three per client, at least 8)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--baseline-runs", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one prompt may take")
    p.add_argument("--batching", nargs="+", choices=("off", "on"), default=["off"],
                   help="server modes to run, each over all levels (default off: the server as shipped)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="--batching on: the server's --max-batch (rows per UNet call, prompts at once; default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=None, metavar="MS", help="--batching on: its --batch-wait-ms")
    p.add_argument("--chart", default=None, metavar="PNG", help="also draw images/s and p95 against clients")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not 0 <= args.requests <= 1000 or any(not 1 <= c <= 256 for c in args.concurrency):
        p.error("--requests must be 0..1000 and --concurrency 1..256")
    if args.max_batch < 1:
        p.error(f"--max-batch: received {args.max_batch}, expected a positive integer")
    if args.url:
        from urllib.parse import urlsplit

        host = urlsplit(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            p.error(f"--url: received {args.url!r}; this benchmark only talks to loopback servers")
        if len(args.batching) > 1:
            p.error("--batching: a running server (--url) has one mode; give one")

    results: dict = {"steps": args.steps, "size": args.size, "max_batch": args.max_batch, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="ksampler-rt-bench-") as tmp:
        for mode in dict.fromkeys(args.batching):
            results["modes"][mode] = _run_mode(args, tmp, mode, results)
    results["levels"] = results["modes"][args.batching[0]]

    print(f"model: {results['model']}  workflow: txt2img {args.size}x{args.size}, {args.steps} steps euler, "
          f"cfg 8  (cpu count {os.cpu_count()})")
    if "baseline" in results:
        b = results["baseline"]
        print(f"Pipeline.run_workflow (no server): p50 {b['p50_ms']:.1f} ms  p95 {b['p95_ms']:.1f} ms  "
              f"{b['images_per_s']:.2f} images/s")
    for mode, levels in results["modes"].items():
        print(f"batching {mode}" + (f" (--max-batch {args.max_batch})" if mode == "on" else " (one prompt at a time)"))
        _print_table(levels)
    print("(execute ms: the worker's mean time per prompt inside the server, from its /metrics)")
    off, on = results["modes"].get("off"), results["modes"].get("on")
    if off and on:
        results["gain"] = batching_gain(off, on)
        print(f"{'clients':>7} {'images/s on/off':>16} {'p95 on / solo':>14} {'p95 off / solo':>15}")
        for row in results["gain"]:
            print(f"{row['concurrency']:>7} {row['throughput_gain']:>16.2f} {row.get('p95_over_solo_on', 0):>14.2f} "
                  f"{row.get('p95_over_solo_off', 0):>15.2f}")
        print("(solo: p50 latency of 1 client with batching off)")
    levels = results["levels"]
    if "baseline" in results and levels and levels[0]["concurrency"] == 1:
        overhead = levels[0]["p50_ms"] - results["baseline"]["p50_ms"]
        results["overhead_ms_p50"] = overhead
        print(f"server overhead at 1 client (p50 latency - p50 run_workflow): {overhead:.1f} ms "
              f"({100 * overhead / results['baseline']['p50_ms']:.0f}%)")
    if args.chart:
        write_chart(results, args.chart)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
