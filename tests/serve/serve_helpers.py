"""Helpers: a real server on a free loopback port, driven like ComfyUI's websocket example."""
from __future__ import annotations

import asyncio
import copy
import json
import uuid

import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from ksampler_rt.serve.server import PromptServer, ServerConfig, ServerThread  # noqa: E402
from ksampler_rt.serve.testing import fake_pipeline  # noqa: E402

CKPT = "tiny-sd15"

TXT2IMG = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple on a wooden table", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 42, "steps": 4, "cfg": 8.0,
                                              "sampler_name": "euler", "scheduler": "normal",
                                              "positive": ["6", 0], "negative": ["7", 0],
                                              "latent_image": ["5", 0], "denoise": 1.0}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "txt2img", "images": ["8", 0]}},
}


def txt2img(**changes) -> dict:
    """The txt2img prompt with KSampler inputs changed (``seed=7``, ``steps=3``) or ``text=...``."""
    prompt = copy.deepcopy(TXT2IMG)
    for name, value in changes.items():
        if name == "text":
            prompt["6"]["inputs"]["text"] = value
        elif name == "prefix":
            prompt["9"]["inputs"]["filename_prefix"] = value
        else:
            prompt["3"]["inputs"][name] = value
    return prompt


def run(coro, timeout: float = 20.0):
    """Run a client coroutine with a hard deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def tiny_models_dir(root) -> tuple[str | None, str]:
    """A models folder with the real tiny checkpoint registered as ``tiny-sd15`` (built, exported and
    registered by the demo's code; reused from the cache), or (None, why not)."""
    try:
        from ksampler_rt.demo import prepare_tiny_checkpoint

        prepare_tiny_checkpoint(root, log=lambda message: None)
    except Exception as exc:  # noqa: BLE001 -- no torch / exporter here: the fake model stands in
        return None, f"{type(exc).__name__}: {exc}"
    return str(root), ""


def make_pipeline(kind: str, models_dir: str | None, delay: float = 0.0, **dirs):
    """The tiny engines on ONNX Runtime CPU (``kind="tiny"``) or the analytic stand-in (``"fake"``)."""
    if kind == "tiny":
        from ksampler_rt.workflow.pipeline import Pipeline

        return Pipeline(models_dir, backend="onnxruntime-cpu", log=None, **dirs)
    return fake_pipeline((CKPT,), delay=delay, **dirs)


class Servers:
    """Starts servers over one set of folders; all are stopped at teardown. ``model="auto"`` is the
    real tiny checkpoint when it can be built here, else the fake; tests that need a slow or failing
    model ask for ``"fake"``."""

    def __init__(self, tmp_path, tiny_models: str | None):
        self.tmp_path = tmp_path
        self.tiny_models = tiny_models
        self.threads: list[ServerThread] = []
        self.pipeline = None
        self.kind = None

    def dirs(self) -> dict:
        return {"output_dir": str(self.tmp_path / "output"), "input_dir": str(self.tmp_path / "input"),
                "temp_dir": str(self.tmp_path / "temp")}

    def start(self, model: str = "auto", delay: float = 0.0, worker=None, **config) -> ServerThread:
        """``worker``: a Worker to run the prompts (the pipeline then only validates them)."""
        self.kind = "tiny" if model == "auto" and self.tiny_models and worker is None else "fake"
        self.pipeline = make_pipeline(self.kind, self.tiny_models, delay, **self.dirs())
        cfg = ServerConfig(host="127.0.0.1", port=0, **config)
        thread = ServerThread(PromptServer(cfg, pipeline=self.pipeline, worker=worker)).start()
        self.threads.append(thread)
        return thread

    def checkpoint(self):
        return self.pipeline.load_checkpoint(CKPT)

    def stop_all(self) -> None:
        for thread in self.threads:
            thread.stop()
        self.threads.clear()


class Client:
    """One ComfyUI API client: a WebSocket with its clientId plus HTTP calls."""

    def __init__(self, session: aiohttp.ClientSession, url: str, client_id: str | None = None):
        self.session = session
        self.url = url
        self.client_id = client_id or uuid.uuid4().hex
        self.ws = None

    async def connect(self):
        self.ws = await self.session.ws_connect(f"{self.url}/ws?clientId={self.client_id}")
        first = await self.receive()
        assert first["type"] == "status" and first["data"]["sid"] == self.client_id
        return self

    async def receive(self, timeout: float = 15.0):
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            return msg.data
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)

    async def submit(self, prompt: dict, **body) -> dict:
        async with self.session.post(f"{self.url}/prompt",
                                     json={"prompt": prompt, "client_id": self.client_id, **body}) as r:
            data = await r.json()
            assert r.status == 200, data
            return data

    async def wait_done(self, prompt_id: str, max_messages: int = 5000):
        """Messages up to and including ``executing`` with node null for ``prompt_id`` (binary
        frames as bytes)."""
        messages = []
        for _ in range(max_messages):
            m = await self.receive()
            messages.append(m)
            if isinstance(m, dict) and m["type"] == "executing" and m["data"]["node"] is None \
                    and m["data"]["prompt_id"] == prompt_id:
                return messages
        raise AssertionError(f"no final executing message for {prompt_id} in {max_messages} messages")

    async def get_json(self, path: str, **params):
        async with self.session.get(self.url + path, params=params) as r:
            assert r.status == 200, (path, r.status)
            return await r.json()

    async def history(self, prompt_id: str) -> dict:
        return (await self.get_json(f"/history/{prompt_id}"))[prompt_id]

    async def view(self, image: dict) -> bytes:
        async with self.session.get(self.url + "/view", params=image) as r:
            assert r.status == 200
            return await r.read()

    async def close(self):
        if self.ws is not None:
            await self.ws.close()


def of_type(messages, kind):
    return [m["data"] for m in messages if isinstance(m, dict) and m["type"] == kind]
