"""The user store of ComfyUI's frontend: ``/users``, ``/settings``, ``/userdata`` and ``/v2/userdata``.

As ComfyUI 0.3.64 without ``--multi-user`` (app/user_manager.py, app/app_settings.py): one user,
``default``, whose files live under ``<state dir>/user/default``; settings are the JSON object in
``comfy.settings.json`` there. Every client-supplied path is confined to that folder after resolving
symlinks (anything else answers 403), names the file system refuses answer 400, and no answer
names a server path. Writes are atomic (a temporary file, then a rename).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

DEFAULT_USER = "default"
SETTINGS_FILE = "comfy.settings.json"


class PathRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class UserStore:
    """Files of the single user under ``root/default`` (``root``: ``<state dir>/user``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.user_dir = self.root / DEFAULT_USER

    def initialise(self) -> None:
        """Create the user's folder as the frontend finds it after its first save: ``workflows/``, ``subgraphs/``,
        an empty ``user.css`` and no node templates, so a fresh browser meets no missing files (each a 404 the
        console reports). A new user's settings start with the two canvas settings that frontend 1.27.10 sets
        itself from ``Comfy.Canvas.NavigationMode``'s onChange before they are registered -- an unhandled
        rejection on every first start otherwise; these are the values it would set. The template browser a new user
        gets is skipped: no templates are served."""
        for folder in ("workflows", "subgraphs"):
            (self.user_dir / folder).mkdir(parents=True, exist_ok=True)
        for name, content in (("user.css", b""), ("comfy.templates.json", b"[]")):
            if not (self.user_dir / name).exists():
                _atomic_write(self.user_dir / name, content)
        if not (self.user_dir / SETTINGS_FILE).exists():
            self.save_settings({"Comfy.Canvas.LeftMouseClickBehavior": "panning",
                                "Comfy.Canvas.MouseWheelScroll": "zoom",
                                # no workflow templates ship here: the "Get started" dialog would be empty
                                "Comfy.TutorialCompleted": True})

    # -- paths ----------------------------------------------------------------------------------------
    def path(self, relative: str | None) -> Path:
        """``user_dir/relative`` if it stays inside the user folder; PathRefused (400/403) otherwise."""
        if relative is None or relative == "":
            return self.user_dir
        if "%" in relative:  # ComfyUI: the frontend may send the name URL-encoded once more
            relative = unquote(relative)
        if "\x00" in relative or len(relative) > 1024:
            raise PathRefused(400, "file: received a name with a NUL byte or over 1024 characters, expected a "
                                   "relative file name")
        text = relative.replace("\\", "/")
        if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
            raise PathRefused(403, "file: received an absolute path, expected a path inside the user folder")
        try:
            base = self.user_dir.resolve()
            real = (base / text).resolve()
        except (OSError, RuntimeError):
            raise PathRefused(400, "file: received a name the file system refuses, expected a relative file name") \
                from None
        if real != base and base not in real.parents:
            raise PathRefused(403, "file: received a path that leaves the user folder, expected a path inside it")
        return real

    def relative(self, path: Path) -> str:
        return path.relative_to(self.user_dir.resolve()).as_posix()

    def file_info(self, path: Path, relative_to: Path | None = None) -> dict:
        st = path.stat()
        base = relative_to or self.user_dir.resolve()
        return {"path": path.relative_to(base).as_posix(), "size": st.st_size, "modified": st.st_mtime,
                "created": st.st_ctime}

    # -- settings -----------------------------------------------------------------------------------------
    def settings(self) -> dict:
        path = self.user_dir / SETTINGS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError):
            return {}  # ComfyUI: a corrupt settings file reads as no settings
        return data if isinstance(data, dict) else {}

    def save_settings(self, settings: dict) -> None:
        self.user_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.user_dir / SETTINGS_FILE, json.dumps(settings, indent=4).encode("utf-8"))

    # -- listing ------------------------------------------------------------------------------------------
    def listing(self, directory: str, recurse: bool, full_info: bool, split: bool) -> list:
        folder = self.path(directory)
        if not folder.is_dir():
            raise PathRefused(404, "dir: received a folder that does not exist")
        files = folder.rglob("*") if recurse else folder.glob("*")
        out = []
        for f in sorted(files):
            if not f.is_file() or f.is_symlink():
                continue
            rel = f.relative_to(folder).as_posix()
            if full_info:
                out.append(self.file_info(f, folder))
            elif split:
                out.append([rel, *rel.split("/")])
            else:
                out.append(rel)
        return out

    def listing_v2(self, relative: str) -> list:
        folder = self.path(relative)
        base = self.user_dir.resolve()
        if not folder.exists():
            if folder == base:
                return []
            raise PathRefused(404, "path: received a folder that does not exist")
        if not folder.is_dir():
            raise PathRefused(400, "path: received a file, expected a folder")
        out = []
        for entry in folder.rglob("*"):
            if entry.is_symlink():
                continue
            rel = entry.relative_to(base).as_posix()
            if entry.is_dir():
                out.append({"name": entry.name, "path": rel, "type": "directory"})
            elif entry.is_file():
                st = entry.stat()
                out.append({"name": entry.name, "path": rel, "type": "file", "size": st.st_size,
                            "modified": st.st_mtime})
        out.sort(key=lambda e: (e["type"] != "directory", e["name"].lower()))
        return out


def add_user_routes(routes: web.RouteTableDef, store: UserStore, max_body: int, read_json) -> None:
    """Register ComfyUI's user-store routes on ``routes`` (the server adds the ``/api`` twins).
    ``read_json(request)`` reads a bounded JSON body (a web.Response on failure)."""

    async def blocking(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def refused(exc: PathRefused) -> web.Response:
        return web.Response(status=exc.status, text=str(exc))

    @routes.get("/users")
    async def get_users(request):
        # ComfyUI without --multi-user: server storage, "migrated" once the user's folder exists
        return web.json_response({"storage": "server", "migrated": store.user_dir.is_dir()})

    @routes.post("/users")
    async def post_users(request):
        return web.json_response({"error": "users: this server has one user ('default'); expected no new users "
                                           "(ComfyUI without --multi-user)"}, status=400)

    @routes.get("/settings")
    async def get_settings(request):
        return web.json_response(await blocking(store.settings))

    @routes.get("/settings/{id}")
    async def get_setting(request):
        return web.json_response((await blocking(store.settings)).get(request.match_info["id"]))

    @routes.post("/settings")
    async def post_settings(request):
        data = await read_json(request)
        if isinstance(data, web.Response):
            return data
        if not isinstance(data, dict):
            return web.json_response({"error": f"settings: received a JSON {type(data).__name__}, expected an object"},
                                     status=400)
        settings = await blocking(store.settings)
        await blocking(store.save_settings, {**settings, **data})
        return web.Response(status=200)

    @routes.post("/settings/{id}")
    async def post_setting(request):
        data = await read_json(request)
        if isinstance(data, web.Response):
            return data
        settings = await blocking(store.settings)
        settings[request.match_info["id"]] = data
        await blocking(store.save_settings, settings)
        return web.Response(status=200)

    @routes.get("/userdata")
    async def list_userdata(request):
        q = request.query
        if not q.get("dir"):
            return web.Response(status=400, text="dir: received nothing, expected a folder name")
        try:
            return web.json_response(await blocking(
                store.listing, q["dir"], q.get("recurse", "").lower() == "true",
                q.get("full_info", "").lower() == "true", q.get("split", "").lower() == "true"))
        except PathRefused as exc:
            return refused(exc)

    @routes.get("/v2/userdata")
    async def list_userdata_v2(request):
        try:
            return web.json_response(await blocking(store.listing_v2, request.query.get("path", "")))
        except PathRefused as exc:
            return refused(exc)

    def user_file(request, param: str = "file", must_exist: bool = False) -> Path:
        name = request.match_info.get(param)
        if not name:
            raise PathRefused(400, f"{param}: received nothing, expected a file name")
        path = store.path(name)
        if path == store.user_dir.resolve():
            raise PathRefused(400, f"{param}: received the user folder itself, expected a file name")
        if must_exist and not path.is_file():
            raise PathRefused(404, f"{param}: received a file that does not exist")
        return path

    @routes.get("/userdata/{file}")
    async def get_userdata(request):
        try:
            path = user_file(request, must_exist=True)
        except PathRefused as exc:
            return refused(exc)
        return web.FileResponse(path)

    @routes.post("/userdata/{file}")
    async def post_userdata(request):
        try:
            path = user_file(request)
        except PathRefused as exc:
            return refused(exc)
        overwrite = request.query.get("overwrite", "true") != "false"
        full_info = request.query.get("full_info", "false").lower() == "true"
        if not overwrite and path.exists():
            return web.Response(status=409, text="File already exists")
        body = await request.content.read(max_body + 1)
        if len(body) > max_body:
            return web.Response(status=413, text=f"the file is larger than the {max_body} bytes this server accepts")

        def write():
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, body)

        try:
            await blocking(write)
        except OSError:
            return web.Response(status=400, text="file: received a name the file system refuses, expected a plain "
                                                 "relative file name")
        return web.json_response(store.file_info(path) if full_info else store.relative(path))

    @routes.delete("/userdata/{file}")
    async def delete_userdata(request):
        try:
            path = user_file(request, must_exist=True)
        except PathRefused as exc:
            return refused(exc)
        await blocking(path.unlink)
        return web.Response(status=204)

    @routes.post("/userdata/{file}/move/{dest}")
    async def move_userdata(request):
        try:
            source = user_file(request, must_exist=True)
            dest = user_file(request, "dest")
        except PathRefused as exc:
            return refused(exc)
        overwrite = request.query.get("overwrite", "true") != "false"
        full_info = request.query.get("full_info", "false").lower() == "true"
        if not overwrite and dest.exists():
            return web.Response(status=409, text="File already exists")

        def move():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, dest)

        await blocking(move)
        return web.json_response(store.file_info(dest) if full_info else store.relative(dest))
