"""ComfyUI's ``/internal/*`` routes, for the frontend only (api_server/routes/internal, ComfyUI 0.3.64):
``logs``, ``logs/raw``, ``logs/subscribe``, ``folder_paths`` and ``files/{output|input|temp}``.

The logs are the server's own recent log records (``ksampler_rt`` loggers), kept in a bounded buffer
as ComfyUI's app/logger keeps its terminal output.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from aiohttp import web


class LogBuffer(logging.Handler):
    """The last ``capacity`` log records as ComfyUI's ``{"t": time, "m": message}`` entries."""

    def __init__(self, capacity: int = 300):
        super().__init__(logging.INFO)
        self.entries: deque = deque(maxlen=capacity)
        self._entries_lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 -- a bad record must never break logging
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        with self._entries_lock:
            self.entries.append({"t": f"{stamp}.{int(record.msecs):03d}", "m": line})

    def snapshot(self) -> list[dict]:
        with self._entries_lock:
            return list(self.entries)


def add_internal_routes(routes: web.RouteTableDef, logs: LogBuffer, folders: Callable[[], dict[str, list[str]]],
                        by_type: Callable[[str], Path | None]) -> None:
    @routes.get("/internal/logs")
    async def get_logs(request):
        return web.json_response("".join(e["t"] + " - " + e["m"] for e in logs.snapshot()))

    @routes.get("/internal/logs/raw")
    async def get_raw_logs(request):
        return web.json_response({"entries": logs.snapshot(), "size": {"cols": 80, "rows": 24}})

    @routes.patch("/internal/logs/subscribe")
    async def subscribe_logs(request):
        return web.Response(status=200)   # no terminal streaming here; the frontend polls /internal/logs

    @routes.get("/internal/folder_paths")
    async def get_folder_paths(request):
        return web.json_response(folders())

    @routes.get("/internal/files/{directory_type}")
    async def get_files(request):
        kind = request.match_info["directory_type"]
        folder = by_type(kind) if kind in ("output", "input", "temp") else None
        if folder is None:
            return web.json_response({"error": f"directory_type: received {kind!r}, expected output, input or "
                                               "temp"}, status=400)
        entries = [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
        entries.sort(key=lambda e: -e.stat().st_mtime)
        return web.json_response([e.name for e in entries])
