"""Step-level batching behind the server (``--max-batch``) and on the real engines.

Server tests use the analytic stand-in model (its UNet works row by row, so a prompt's image must be
bit-identical whether its rows were batched or not); they compare every prompt run alongside others with
the same prompt run alone on the same server. The engine tests run the tiny SD1.5 export on ONNX Runtime
CPU (asserted bit-identical: its CPU kernels compute each batch row on its own) and OpenVINO CPU (measured
bit-identical here as well, asserted within 1e-5 of the output scale because oneDNN picks kernels per shape
and instruction set). A long ``batch_wait_ms`` makes running prompts meet deterministically; no assertion
is on time.
"""
from __future__ import annotations

import io
import threading

import aiohttp
import numpy as np
import pytest
from PIL import Image

from serve_helpers import CKPT, Client, of_type, run, txt2img

WAIT_MS = 2000.0


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


PROMPTS = [dict(seed=1, steps=8, sampler_name="euler"), dict(seed=2, steps=12, sampler_name="dpmpp_2m"),
           dict(seed=3, steps=6, sampler_name="heun"), dict(seed=4, steps=10, sampler_name="euler_ancestral")]


async def _together(url: str, prompts: list[dict]) -> tuple[list[list], list[dict]]:
    """Submit ``prompts`` at once; (messages per prompt, history entries)."""
    async with aiohttp.ClientSession() as session:
        client = await Client(session, url).connect()
        ids = [(await client.submit(p))["prompt_id"] for p in prompts]
        pending, messages = set(ids), {i: [] for i in ids}
        while pending:
            m = await client.receive(30)
            if isinstance(m, dict) and "prompt_id" in (m.get("data") or {}):
                pid = m["data"]["prompt_id"]
                if pid in messages:
                    messages[pid].append(m)
                    if m["type"] == "executing" and m["data"]["node"] is None:
                        pending.discard(pid)
        histories = [await client.history(i) for i in ids]
        await client.close()
        return [messages[i] for i in ids], histories


async def _images(url: str, history: dict) -> list[np.ndarray]:
    async with aiohttp.ClientSession() as session:
        client = Client(session, url)
        return [_pixels(await client.view(image)) for out in history["outputs"].values()
                for image in out.get("images", [])]


async def _interrupt_when_running(url: str, prompts: list[dict], victim: int) -> tuple[list[list], list[dict]]:
    async with aiohttp.ClientSession() as session:
        client = await Client(session, url).connect()
        ids = [(await client.submit(p))["prompt_id"] for p in prompts]
        pending, messages, stopped = set(ids), {i: [] for i in ids}, False
        while pending:
            m = await client.receive(30)
            if isinstance(m, dict) and "prompt_id" in (m.get("data") or {}):
                pid = m["data"]["prompt_id"]
                if pid in messages:
                    messages[pid].append(m)
                    if m["type"] == "progress" and pid == ids[victim] and m["data"]["value"] >= 3 and not stopped:
                        stopped = True
                        async with session.post(f"{url}/interrupt", json={"prompt_id": pid}) as r:
                            assert r.status == 200
                    if m["type"] == "executing" and m["data"]["node"] is None:
                        pending.discard(pid)
        histories = [await client.history(i) for i in ids]
        await client.close()
        return [messages[i] for i in ids], histories


def _solo_images(url: str, prompt: dict) -> list[np.ndarray]:
    """The images of ``prompt`` run alone. ``url``: a server *without* batching and without the batched
    server's node-output cache (which would hand back the batched result)."""
    _, [history] = run(_together(url, [prompt]), 60)
    return run(_images(url, history))


def test_concurrent_prompts_share_unet_calls_and_match_their_solo_images(servers):
    srv = servers.start(model="fake", delay=0.01, max_batch=8, batch_wait_ms=WAIT_MS)
    assert srv.server.concurrency == 8 and servers.pipeline.max_batch == 8
    prompts = [txt2img(prefix=f"batched{i}", **p) for i, p in enumerate(PROMPTS)]
    messages, histories = run(_together(srv.url, prompts), 120)
    for msgs, history in zip(messages, histories):
        assert of_type(msgs, "execution_success"), of_type(msgs, "execution_error")
        assert history["status"]["status_str"] == "success"
    batched = [run(_images(srv.url, h)) for h in histories]
    with aiohttp_metrics(srv.url) as metrics:
        prompts_sum = _metric(metrics, "ksampler_rt_engine_batch_prompts_sum")
        prompts_count = _metric(metrics, "ksampler_rt_engine_batch_prompts_count")
        rows_sum = _metric(metrics, "ksampler_rt_engine_batch_rows_sum")
        assert prompts_sum > prompts_count          # at least one engine call carried several prompts
        assert rows_sum == 2 * prompts_sum          # CFG: a cond and an uncond row per prompt and call
        assert _metric(metrics, "ksampler_rt_batch_wait_seconds_count") == len(PROMPTS)
    reference = servers.start(model="fake")   # batching off, its own cache
    for i, p in enumerate(PROMPTS):
        solo = _solo_images(reference.url, txt2img(prefix=f"solo{i}", **p))
        assert len(solo) == len(batched[i]) == 1 and np.array_equal(solo[0], batched[i][0]), p


class aiohttp_metrics:
    """``with aiohttp_metrics(url) as text``: the server's /metrics body."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self) -> str:
        async def get():
            async with aiohttp.ClientSession() as session, session.get(f"{self.url}/metrics") as r:
                return await r.text()
        return run(get())

    def __exit__(self, *exc) -> None:
        return None


def test_interrupting_one_batched_prompt_leaves_the_others_undisturbed(servers):
    srv = servers.start(model="fake", delay=0.01, max_batch=8, batch_wait_ms=WAIT_MS)
    specs = [dict(seed=11, steps=20), dict(seed=12, steps=20), dict(seed=13, steps=20)]
    prompts = [txt2img(prefix=f"int{i}", **p) for i, p in enumerate(specs)]
    messages, histories = run(_interrupt_when_running(srv.url, prompts, victim=1), 120)
    assert of_type(messages[1], "execution_interrupted") and not of_type(messages[1], "execution_success")
    assert len(of_type(messages[1], "progress")) < 20
    reference = servers.start(model="fake")
    for i in (0, 2):
        assert of_type(messages[i], "execution_success") and not of_type(messages[i], "execution_interrupted")
        batched = run(_images(srv.url, histories[i]))
        assert np.array_equal(batched[0], _solo_images(reference.url, txt2img(prefix=f"solo{i}", **specs[i]))[0])


class PoisonUNet:
    """The stand-in UNet, failing whenever a row carries the conditioning of the text "poison"."""

    def __init__(self, inner, poison: np.ndarray):
        self.inner, self.poison = inner, poison

    def __call__(self, x, timestep, context=None, **kwargs):
        ctx = np.asarray(context)
        if any(np.array_equal(row, self.poison) for row in ctx):
            raise RuntimeError("engine failure: poisoned rows")
        return self.inner(x, timestep, context, **kwargs)


def test_a_failing_engine_call_fails_only_its_own_prompt(servers):
    srv = servers.start(model="fake", delay=0.01, max_batch=8, batch_wait_ms=WAIT_MS)
    checkpoint = servers.checkpoint()
    poison = checkpoint.clip.encode("poison")[0][0][0]
    checkpoint.model.unet = PoisonUNet(checkpoint.model.unet, poison)   # before the gather point wraps it
    specs = [dict(seed=21, steps=10), dict(seed=22, steps=10, text="poison"), dict(seed=23, steps=10)]
    prompts = [txt2img(prefix=f"fail{i}", **p) for i, p in enumerate(specs)]
    messages, histories = run(_together(srv.url, prompts), 120)
    [error] = of_type(messages[1], "execution_error")
    assert error["node_type"] == "KSampler" and "poisoned rows" in error["exception_message"]
    reference = servers.start(model="fake")
    for i in (0, 2):
        assert of_type(messages[i], "execution_success") and not of_type(messages[i], "execution_error")
        batched = run(_images(srv.url, histories[i]))
        assert np.array_equal(batched[0], _solo_images(reference.url, txt2img(prefix=f"solo{i}", **specs[i]))[0])


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "openvino-cpu"])
def test_engine_results_batched_equal_solo(tiny_models, backend):
    """Concurrent txt2img runs on the tiny engines (mixed samplers, steps and sizes) against solo runs."""
    if tiny_models is None:
        pytest.skip("the tiny checkpoint cannot be built here")
    if backend == "openvino-cpu":
        pytest.importorskip("openvino")
    from ksampler_rt.runtime.batching import run_scope
    from ksampler_rt.workflow.pipeline import Pipeline

    runs = [dict(seed=1, steps=5, sampler_name="euler", width=64, height=64),
            dict(seed=2, steps=7, sampler_name="dpmpp_2m", width=64, height=64),
            dict(seed=3, steps=4, sampler_name="heun", width=64, height=64),
            dict(seed=4, steps=6, sampler_name="euler", width=96, height=64)]   # another size: its own calls
    solo_pipe = Pipeline(tiny_models, backend=backend, log=None)
    solo = [solo_pipe.txt2img(CKPT, "a red apple", "blurry", **r) for r in runs]
    pipe = Pipeline(tiny_models, backend=backend, log=None, max_batch=16, batch_wait_ms=WAIT_MS)
    unet = pipe.checkpoint_for_run(CKPT).model.unet
    out, stats = {}, {}
    start = threading.Barrier(len(runs))

    def body(i):
        with run_scope() as stats[i]:
            unet.join()
            start.wait()
            out[i] = pipe.txt2img(CKPT, "a red apple", "blurry", **runs[i])

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    shared = [call for s in stats.values() for call in s.engine_calls if call[1] > 1]
    assert shared, "no UNet call was shared"
    for i in range(len(runs)):
        if backend == "onnxruntime-cpu":
            assert np.array_equal(out[i], solo[i]), runs[i]
        else:
            scale = float(np.abs(solo[i]).max())
            np.testing.assert_allclose(out[i], solo[i], rtol=0, atol=1e-5 * scale, err_msg=str(runs[i]))
    pipe.release()
    solo_pipe.release()


def test_batching_options_are_checked(tmp_path):
    from ksampler_rt.serve.testing import fake_pipeline
    from ksampler_rt.serve.worker import LocalWorker
    from ksampler_rt.workflow.pipeline import Pipeline

    with pytest.raises(ValueError, match="max_batch: received 0"):
        Pipeline(tmp_path, max_batch=0, log=None)
    with pytest.raises(ValueError, match="batch_wait_ms: received -5"):
        Pipeline(tmp_path, batch_wait_ms=-5, log=None)
    with pytest.raises(ValueError, match="concurrency: received 0"):
        LocalWorker(fake_pipeline((CKPT,), output_dir=tmp_path / "o", input_dir=tmp_path / "i",
                                  temp_dir=tmp_path / "t"), concurrency=0)


def test_without_batching_the_unet_is_not_wrapped(tmp_path):
    """The server as shipped (max_batch 1, CPU backend): the model's UNet callable is the engine's own."""
    from ksampler_rt.serve.testing import fake_pipeline

    pipe = fake_pipeline((CKPT,), output_dir=tmp_path / "o", input_dir=tmp_path / "i", temp_dir=tmp_path / "t")
    checkpoint = pipe.checkpoint_for_run(CKPT)
    assert checkpoint.model.unet is checkpoint.unet
    pipe.max_batch = 4
    assert type(pipe.checkpoint_for_run(CKPT).model.unet).__name__ == "BatchingUNet"


def test_modelled_engine_latency_table_hand_values():
    """The benchmark's modelled GPU engine: published points, linear in between, proportional above."""
    from ksampler_rt.bench.server import LATENCY_PROFILES, modelled_seconds

    assert modelled_seconds("sd15-a100-ort", 2) == pytest.approx(1.1 / 50)     # 1 image (CFG: 2 rows)
    assert modelled_seconds("sd15-a100-ort", 1) == pytest.approx(1.1 / 50)     # never faster than the smallest
    assert modelled_seconds("sd15-a100-ort", 12) == pytest.approx((3.7 + (6.9 - 3.7) / 2) / 50)
    assert modelled_seconds("sd15-a100-ort", 64) == pytest.approx(2 * 13.6 / 50)
    assert modelled_seconds("sd15-a100-torch", 16) == pytest.approx(7.04 / 50)
    assert all("published" in p["label"] for p in LATENCY_PROFILES.values())
