"""``--workers ray``: the ComfyUI-compatible front dispatching prompts to a Ray Serve deployment.

Real Ray, local, CPU: one Ray instance per session (2 CPUs), 2 CPU replicas of the tiny model.
Marked ``ray``: ``pytest -m ray tests/serve/test_ray.py`` (about a minute and a half here, most of it
exporting the tiny model and starting Ray); skipped where ``ray[serve]`` is not installed.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("ray.serve")

import aiohttp  # noqa: E402
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.ray

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"
BACKEND = "onnxruntime-cpu"


def _prompt(seed: int, steps: int = 4, size: int = 64, prefix: str = "ray") -> dict:
    wf = json.loads((EXAMPLES / "txt2img.json").read_text())
    wf["5"]["inputs"].update(width=size, height=size)
    wf["3"]["inputs"].update(seed=seed, steps=steps)
    wf["9"]["inputs"]["filename_prefix"] = prefix
    return wf


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def ray_front(tmp_path_factory):
    """(ServerThread, worker, dirs, models_dir, cache): the front on Ray with 2 tiny-model replicas."""
    import ray

    from ksampler_rt.demo import prepare_tiny_checkpoint
    from ksampler_rt.serve.ray_app import RayAppConfig
    from ksampler_rt.serve.ray_worker import make_ray_server
    from ksampler_rt.serve.server import ServerConfig, ServerThread

    root = tmp_path_factory.mktemp("ray")
    cache, models = root / "cache", root / "models"
    old = os.environ.get("KSAMPLER_RT_CACHE")
    os.environ["KSAMPLER_RT_CACHE"] = str(cache)
    try:
        prepare_tiny_checkpoint(models, log=lambda message: None)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the tiny checkpoint cannot be built here ({type(exc).__name__}: {exc})")
    from ksampler_rt.serve.ray_app import use_loopback_only

    use_loopback_only()  # a local test instance: loopback only
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    dirs = {"output_dir": str(root / "front" / "output"), "input_dir": str(root / "front" / "input"),
            "temp_dir": str(root / "front" / "temp")}
    config = ServerConfig(host="127.0.0.1", port=0, models_dir=str(models), backend=BACKEND, **dirs)
    app = RayAppConfig(models_dir=str(models), backend=BACKEND, num_replicas=2, num_cpus=0.5, ort_threads=1,
                       preload=["tiny-sd15"])
    server = make_ray_server(config, app_config=app, retry_backoff_s=0.2)
    thread = ServerThread(server, start_timeout=60).start()
    try:
        yield thread, server.worker, dirs, str(models), cache
    finally:
        thread.stop()
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        if old is None:
            os.environ.pop("KSAMPLER_RT_CACHE", None)
        else:
            os.environ["KSAMPLER_RT_CACHE"] = old


async def _run_prompt(session, url: str, prompt: dict, on_message=None, timeout: float = 120.0) -> tuple[str, list]:
    """Submit over HTTP as a ComfyUI client does and read the WebSocket until the prompt is done."""
    client_id = os.urandom(8).hex()
    messages = []
    async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
            assert r.status == 200, await r.text()
            prompt_id = (await r.json())["prompt_id"]
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(ws.receive(), max(0.1, deadline - time.monotonic()))
            if msg.type == aiohttp.WSMsgType.BINARY:
                continue
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = json.loads(msg.data)
            messages.append(data)
            if on_message is not None:
                await on_message(data)
            d = data.get("data") or {}
            if data["type"] == "executing" and d.get("node") is None and d.get("prompt_id") == prompt_id:
                return prompt_id, messages


async def _history(session, url: str, prompt_id: str) -> dict:
    async with session.get(f"{url}/history/{prompt_id}") as r:
        return (await r.json())[prompt_id]


def _reference(models: str, cache, tmp_path, seed: int, **kw) -> np.ndarray:
    """The same prompt through ``ksampler-rt run`` (in process)."""
    from ksampler_rt.cli import main

    wf = tmp_path / f"wf-{seed}.json"
    wf.write_text(json.dumps(_prompt(seed, **kw)))
    out = tmp_path / f"run-{seed}"
    old = os.environ.get("KSAMPLER_RT_CACHE")
    os.environ["KSAMPLER_RT_CACHE"] = str(cache)
    try:
        assert main(["run", str(wf), "--out", str(out), "--models", models, "--backend", BACKEND]) == 0
    finally:
        os.environ["KSAMPLER_RT_CACHE"] = old if old is not None else ""
    [png] = sorted(out.glob("*.png"))
    return _pixels(png)


def test_eight_concurrent_prompts_match_run_and_use_both_replicas(ray_front, tmp_path):
    from ksampler_rt.serve.server import PromptServer

    thread, worker, dirs, models, cache = ray_front
    # make_ray_server: the plain server with a RayWorker, 2 replicas x 1 ongoing request = 2 in flight.
    assert type(thread.server) is PromptServer and worker.concurrency == thread.server.concurrency == 2
    seeds = list(range(100, 108))

    async def main():
        async with aiohttp.ClientSession() as session:
            done = await asyncio.gather(*(_run_prompt(session, thread.url, _prompt(s)) for s in seeds))
            out = []
            for (prompt_id, messages), seed in zip(done, seeds):
                entry = await _history(session, thread.url, prompt_id)
                image = entry["outputs"]["9"]["images"][0]
                async with session.get(f"{thread.url}/view", params={"filename": image["filename"],
                                                                      "subfolder": image["subfolder"],
                                                                      "type": "output"}) as r:
                    assert r.status == 200
                    body = await r.read()
                out.append((prompt_id, messages, entry, body))
            return out

    results = asyncio.run(asyncio.wait_for(main(), 240))
    names = set()
    for (prompt_id, messages, entry, body), seed in zip(results, seeds):
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
        kinds = [m["type"] for m in messages]
        assert kinds.count("execution_success") == 1 and "progress" in kinds
        executed = [m for m in messages if m["type"] == "executed"]
        assert len(executed) == 1 and executed[0]["data"]["output"] == entry["outputs"]["9"]
        image = entry["outputs"]["9"]["images"][0]
        names.add(image["filename"])
        path = Path(dirs["output_dir"]) / image["filename"]
        assert path.read_bytes() == body
        np.testing.assert_array_equal(_pixels(path), _reference(models, cache, tmp_path, seed))
        assert worker.stats[prompt_id]["attempts"] == 1
    assert len(names) == len(seeds)  # every prompt got its own file
    replicas = {worker.stats[pid]["replicas"][0] for pid, *_ in results}
    assert len(replicas) == 2, f"only {replicas} did work"


def _wait_replicas(worker, n: int, timeout: float = 60.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications[worker.config.app_name].deployments["KSamplerReplica"]
        if status.replica_states.get("RUNNING", 0) >= n and status.status == "HEALTHY":
            return
        time.sleep(0.5)
    raise AssertionError(f"the deployment did not get back to {n} replicas")


def _kill_during_run(thread, seed: int, steps: int = 400):
    """Run a long prompt and SIGKILL its replica process at its 3rd sampling step."""
    worker = thread.server.worker
    killed: list[int] = []

    async def on_message(data):
        if data["type"] == "progress" and data["data"]["value"] >= 3 and not killed:
            pid = data["data"]["prompt_id"]
            replica_pid = worker.stats[pid]["pids"][-1]
            os.kill(replica_pid, signal.SIGKILL)
            killed.append(replica_pid)

    async def main():
        async with aiohttp.ClientSession() as session:
            prompt_id, messages = await _run_prompt(session, thread.url, _prompt(seed, steps=steps, prefix="killed"),
                                                    on_message)
            entry = await _history(session, thread.url, prompt_id)
            async with session.get(f"{thread.url}/history") as r:
                everything = await r.json()
            return prompt_id, messages, entry, everything

    prompt_id, messages, entry, everything = asyncio.run(asyncio.wait_for(main(), 240))
    assert killed, "the prompt finished before the replica could be killed"
    return prompt_id, messages, entry, everything, killed[0]


def test_killed_replica_prompt_is_retried_once_and_not_duplicated(ray_front, tmp_path):
    thread, worker, dirs, models, cache = ray_front
    _wait_replicas(worker, 2)
    before = set(os.listdir(dirs["output_dir"]))
    prompt_id, messages, entry, everything, killed = _kill_during_run(thread, seed=7)

    stat = worker.stats[prompt_id]
    assert stat["attempts"] == 2 and stat["pids"][0] == killed and stat["pids"][1] != killed
    assert entry["status"]["status_str"] == "success"
    kinds = [m["type"] for m in messages]
    assert kinds.count("execution_success") == 1 and "execution_error" not in kinds
    assert kinds.count("executed") == 1
    assert list(everything).count(prompt_id) == 1
    new = sorted(set(os.listdir(dirs["output_dir"])) - before)
    assert new == [entry["outputs"]["9"]["images"][0]["filename"]]  # one image, nothing duplicated
    reference = _reference(models, cache, tmp_path, 7, steps=400, prefix="killed")
    np.testing.assert_array_equal(_pixels(Path(dirs["output_dir"]) / new[0]), reference)


def test_retries_exhausted_is_execution_error(ray_front):
    thread, worker, dirs, models, cache = ray_front
    _wait_replicas(worker, 2)
    worker.max_retries = 0
    try:
        prompt_id, messages, entry, everything, killed = _kill_during_run(thread, seed=8)
    finally:
        worker.max_retries = 2
    assert worker.stats[prompt_id]["attempts"] == 1
    assert entry["status"]["status_str"] == "error"
    errors = [m for m in messages if m["type"] == "execution_error"]
    assert len(errors) == 1 and "Ray replica" in errors[0]["data"]["exception_message"]
    assert list(everything).count(prompt_id) == 1


def test_batched_replica_merges_unet_calls(ray_front):
    """Step-level batching within a replica: 4 prompts of one shape (max_batch_size=4) share UNet calls."""
    from ray import serve

    from ksampler_rt.serve.ray_app import RayAppConfig, build_deployment

    thread, worker, dirs, models, cache = ray_front
    config = RayAppConfig(models_dir=models, backend=BACKEND, num_replicas=1, num_cpus=0.5, ort_threads=1,
                          max_batch_size=4, batch_wait_timeout_s=0.05, preload=["tiny-sd15"],
                          app_name="ksampler-rt-batch")
    handle = serve.run(build_deployment(config), name=config.app_name, route_prefix=None)
    try:
        async def one(seed):
            records = []
            async for record in handle.options(stream=True).run.remote(
                    {"prompt_id": f"b{seed}", "prompt": _prompt(seed, steps=20), "extra_data": {}}):
                records.append(record)
            return records

        async def main():
            return await asyncio.gather(*(one(s) for s in range(100, 104)))

        runs = asyncio.run(asyncio.wait_for(main(), 120))
        for records in runs:
            assert records[-1][0] == "result", records[-1]
            [executed] = [r for r in records if r[0] == "executed"]
            assert executed[2] and executed[2][0]["data"][:8] == b"\x89PNG\r\n\x1a\n"
        info = handle.info.remote().result()
        assert max(info["batches"]) > 1, info["batches"]
        calls = [tuple(c) for records in runs for c in records[-1][1]["engine_batches"]]
        assert max(rows for rows, _ in calls) <= 4   # max_batch_size bounds the rows of a replica's UNet call
    finally:
        serve.delete(config.app_name)


def test_local_instance_listens_on_loopback_only(ray_front):
    import ray

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
