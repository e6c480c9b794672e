"""A real PromptServer around a Pipeline for the end-to-end graph tests: JSON calls and waiting for a prompt."""
from __future__ import annotations

import contextlib
import json
import time
import urllib.request


class ServerClient:
    def __init__(self, url: str):
        self.url = url

    def call(self, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as response:
            return json.loads(response.read())

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """POST /prompt, then the prompt's /history entry once it completed (None on timeout)."""
        prompt_id = self.call("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.call(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.1)
        return None


@contextlib.contextmanager
def prompt_server(pipe):
    from ksampler_rt.serve.server import PromptServer, ServerConfig, ServerThread

    thread = ServerThread(PromptServer(ServerConfig(host="127.0.0.1", port=0), pipeline=pipe)).start()
    try:
        yield ServerClient(thread.url)
    finally:
        thread.stop()
