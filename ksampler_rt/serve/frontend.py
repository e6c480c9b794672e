"""ComfyUI's web frontend, served at ``/`` (the ``[ui]`` extra: ``comfyui-frontend-package``).

ComfyUI 0.3.64 pins ``comfyui-frontend-package==1.27.10``; its ``static`` folder is the web root
(``index.html``, ``assets/``, ``scripts/``, ``extensions/core/*.js``). As ComfyUI's server.py, ``GET /``
answers ``index.html`` uncached, every other file of the web root is served statically (after every
API route), and ``/extensions`` lists the web root's ``extensions/**/*.js``. ``/i18n`` and
``/workflow_templates`` list what custom nodes add in ComfyUI (none here), ``/templates/index.json``
the workflow templates (the ``comfyui-workflow-templates`` package is not part of this product: none).
"""
from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

log = logging.getLogger("ksampler_rt.serve")

FRONTEND_PACKAGE = "comfyui-frontend-package"
FRONTEND_VERSION = "1.27.10"   # the version ComfyUI 0.3.64's requirements.txt pins
UI_MISSING = ("the web UI is not installed: pip install 'ksampler-rt[ui]' (comfyui-frontend-package); the API "
              "works without it")
UI_OFF = "the web UI is off (ksampler-rt serve --no-ui); the API is served"


def find_web_root() -> Path | None:
    """The static folder of the installed comfyui-frontend-package, or None when it is not installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    root = Path(comfyui_frontend_package.__file__).resolve().parent / "static"
    return root if (root / "index.html").is_file() else None


def list_extensions(web_root: Path | None) -> list[str]:
    """ComfyUI's ``/extensions``: ``/extensions/...js`` for every script under the web root's extensions."""
    if web_root is None:
        return []
    folder = web_root / "extensions"
    return sorted("/" + p.relative_to(web_root).as_posix() for p in folder.rglob("*.js") if p.is_file())


def add_frontend_routes(routes: web.RouteTableDef, web_root: Path | None, why_not: str) -> None:
    """The API side of the frontend (listed under ``/x`` and ``/api/x``)."""

    @routes.get("/extensions")
    async def extensions(request):
        return web.json_response(list_extensions(web_root))

    @routes.get("/i18n")
    async def i18n(request):
        return web.json_response({})   # translations of custom nodes (ComfyUI's CustomNodeManager): none

    @routes.get("/workflow_templates")
    async def workflow_templates(request):
        return web.json_response({})   # example workflows of custom nodes: none


def add_static_routes(app: web.Application, web_root: Path | None, why_not: str,
                      user_css: Path | None = None) -> None:
    """``/`` and the web root's files; registered last so they never shadow an API route. ``user_css``: the
    user's stylesheet, which index.html links as ``/user.css``."""

    async def root(request):
        if web_root is None:
            return web.Response(status=404, text=why_not)
        return web.FileResponse(web_root / "index.html",
                                headers={"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"})

    async def templates_index(request):
        return web.json_response([])

    async def favicon(request):
        icon = web_root / "assets" / "favicon.ico" if web_root is not None else None
        return web.FileResponse(icon) if icon is not None and icon.is_file() else web.Response(status=404)

    app.router.add_get("/", root)
    app.router.add_get("/templates/index.json", templates_index)
    async def css(request):
        if user_css is None or not user_css.is_file():
            return web.Response(text="", content_type="text/css")
        return web.FileResponse(user_css, headers={"Content-Type": "text/css"})

    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/user.css", css)
    if web_root is not None:
        app.router.add_static("/", web_root, follow_symlinks=False)
