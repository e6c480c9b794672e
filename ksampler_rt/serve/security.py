"""Who may talk to the server: the Host check (DNS rebinding), the Origin check (cross-site requests
from a browser) and the optional bearer token (``--auth-token``).

ComfyUI 0.3.64 compares Origin with Host on loopback hosts only and lets ``Origin: null`` (sandboxed
iframes, ``file://`` pages, redirects) through; it never checks Host, so a DNS-rebinding page
(``http://evil.example:8188`` resolving to 127.0.0.1) reads ``/history`` and ``/view`` as same-origin.
Here, on every route and the WebSocket:

* **Host** must name this server: a loopback name (``localhost``, ``*.localhost``, ``127.0.0.0/8``,
  ``::1``), the bound address, any IP literal when bound to every interface (0.0.0.0 / ::), or a name
  given with ``--allow-host`` (``*``: any). An IP literal cannot be rebound, a name can.
* **Origin**, when a browser sends one, must be the server itself (same host and port as Host) or an
  origin given with ``--allow-origin`` (``*``: any). ``Origin: null`` is refused unless ``null`` is allowed.
* **Token** (when set): ``Authorization: Bearer TOKEN``, or the ``ksampler_rt_token`` cookie, which a
  browser gets by opening ``/?token=TOKEN`` once (HttpOnly, SameSite=Strict), or ``?token=TOKEN`` on any
  request (WebSocket clients that cannot set headers). Compared in constant time.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import urllib.parse
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger("ksampler_rt.serve")

TOKEN_COOKIE = "ksampler_rt_token"


def _ip(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def is_loopback_name(host: str | None) -> bool:
    if not host:
        return False
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def _split_host(value: str) -> tuple[str | None, int | None]:
    try:
        split = urllib.parse.urlsplit("//" + value.strip().lower())
        return split.hostname, split.port
    except ValueError:
        return None, None


@dataclass
class AccessPolicy:
    bind_host: str = "127.0.0.1"
    allow_hosts: list[str] = field(default_factory=list)     # extra Host names; "*" = any
    allow_origins: list[str] = field(default_factory=list)   # extra Origins (scheme://host[:port]); "*", "null"
    token: str | None = None

    def __post_init__(self):
        self.allow_hosts = [h.lower().rstrip(".") for h in self.allow_hosts]
        self.allow_origins = [o.lower().rstrip("/") for o in self.allow_origins]
        bind_ip = _ip(self.bind_host)
        self._any_ip = bind_ip is not None and bind_ip.is_unspecified or self.bind_host in ("", "0.0.0.0", "::")

    # -- checks (each: None when fine, else the reason) ---------------------------------------------
    def host_problem(self, host_header: str | None) -> str | None:
        if host_header is None:
            return None   # HTTP/1.0 clients; browsers always send Host
        host, _ = _split_host(host_header)
        if host is None:
            return "Host: received an unreadable value, expected this server's address"
        host = host.rstrip(".")
        if "*" in self.allow_hosts or host in self.allow_hosts or is_loopback_name(host):
            return None
        ip = _ip(host)
        if ip is not None and (self._any_ip or ip == _ip(self.bind_host)):
            return None
        if host == self.bind_host.lower():
            return None
        return (f"Host: received {host!r}, expected this server's address (a loopback name, the bound address or "
                "a name allowed with --allow-host)")

    def origin_problem(self, origin: str | None, host_header: str | None) -> str | None:
        if origin is None:
            return None   # not a browser's cross-origin request (curl, API clients)
        value = origin.strip().lower().rstrip("/")
        if "*" in self.allow_origins or value in self.allow_origins:
            return None
        if value == "null":
            return "Origin: received 'null' (a sandboxed or file:// page), expected this server's own origin"
        try:
            split = urllib.parse.urlsplit(value)
            o_host, o_port = split.hostname, split.port
        except ValueError:
            return "Origin: received an unreadable value, expected this server's own origin"
        h_host, h_port = _split_host(host_header or "")
        default = {"http": 80, "https": 443}.get(split.scheme)
        if o_host is None or h_host is None or o_host != h_host or (o_port or default) != (h_port or default):
            return (f"Origin: received {origin!r}, expected this server's own origin (same host and port as "
                    "Host) or one allowed with --allow-origin")
        return None

    def token_ok(self, request: web.Request) -> bool:
        if not self.token:
            return True
        expected = self.token.encode()
        candidates = []
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        if TOKEN_COOKIE in request.cookies:
            candidates.append(request.cookies[TOKEN_COOKIE])
        if "token" in request.query:
            candidates.append(request.query["token"])
        return any(hmac.compare_digest(c.encode("utf-8", "surrogateescape"), expected) for c in candidates)

    def authenticated(self, request: web.Request) -> bool:
        """The caller proved it holds the token (always False when the server has none)."""
        return bool(self.token) and self.token_ok(request)

    # -- the middleware -----------------------------------------------------------------------------------
    def middleware(self):
        policy = self

        @web.middleware
        async def access(request: web.Request, handler):
            problem = (policy.host_problem(request.headers.get("Host"))
                       or policy.origin_problem(request.headers.get("Origin"), request.headers.get("Host")))
            if problem:
                log.warning("refused %s %s: %s", request.method, request.path, problem)
                return web.json_response({"error": {"type": "forbidden", "message": problem, "details": problem,
                                                    "extra_info": {}}, "node_errors": {}}, status=403)
            if not policy.token_ok(request):
                message = ("this server requires its token: send 'Authorization: Bearer TOKEN' (or open "
                           "/?token=TOKEN once in a browser)")
                return web.json_response({"error": {"type": "unauthorized", "message": message, "details": message,
                                                    "extra_info": {}}, "node_errors": {}}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="ksampler-rt"'})
            response = await handler(request)
            if policy.token and request.query.get("token") and isinstance(response, web.StreamResponse) \
                    and not response.prepared:
                # a browser that opened /?token=... keeps the token as a cookie the page's own requests send
                response.set_cookie(TOKEN_COOKIE, policy.token, httponly=True, samesite="Strict", path="/")
            return response

        return access
