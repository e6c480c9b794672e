"""A headless Chromium driven over the DevTools protocol (CDP) with aiohttp: just what the browser test
needs -- open a page, evaluate JavaScript, collect console errors and exceptions, take a screenshot."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """``async with Browser(exe) as b: page = await b.page()``; the process and its profile go away at exit."""

    def __init__(self, exe: str, width: int = 1600, height: int = 900):
        self.exe = exe
        self.size = (width, height)
        self.proc: subprocess.Popen | None = None
        self.profile: str | None = None
        self.session: aiohttp.ClientSession | None = None
        self.port: int | None = None

    async def __aenter__(self) -> "Browser":
        self.profile = tempfile.mkdtemp(prefix="ksampler-rt-chromium-")
        cmd = [self.exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
               f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if port_file.is_file() and port_file.read_text().strip():
                self.port = int(port_file.read_text().splitlines()[0])
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before opening DevTools")
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("chromium did not open its DevTools port within 60 s")
        self.session = aiohttp.ClientSession()
        return self

    async def page(self) -> "Page":
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            targets = await r.json(content_type=None)
        target = next(t for t in targets if t.get("type") == "page")
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=1 << 28)
        page = Page(ws)
        await page.start()
        return page

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.console: list[dict] = []     # {"level", "text", "source"}
        self.exceptions: list[str] = []
        self.failed_requests: list[str] = []
        self._requests: dict[str, str] = {}
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read())
        for method in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
            await self.send(method)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                self.console.append({"level": params.get("type"), "text": text, "source": "console"})
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                self.console.append({"level": entry.get("level"), "text": f"{entry.get('text')} {entry.get('url', '')}",
                                     "source": entry.get("source")})
            elif method == "Network.requestWillBeSent":
                self._requests[params["requestId"]] = params["request"]["url"]
            elif method == "Network.responseReceived":
                status = params["response"]["status"]
                if status >= 400:
                    self.failed_requests.append(f"{status} {params['response']['url']}")

    async def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        number = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[number] = future
        await self.ws.send_str(json.dumps({"id": number, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str, timeout: float = 60.0):
        """The value of a JavaScript expression (promises awaited); raises on a JavaScript exception."""
        result = await self.send("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; console: {self.console}, "
                                     f"exceptions: {self.exceptions}, failed requests: {self.failed_requests}")
            await asyncio.sleep(0.25)

    async def screenshot(self, path: str | os.PathLike) -> None:
        data = await self.send("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(data["data"]))

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
