"""The holes closed: Origin null / DNS rebinding (Host), the auth token on every route and the WebSocket,
/system_stats' argv, the pixel cap, bad input answered 400 (never 500, never a server path), prompt ids."""
from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest
from PIL import Image

from serve_helpers import Client, run, txt2img
from test_serve_frontend_api import calls

TOKEN = "s3cret-token-0123456789"


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _upload(data: bytes, name: str = "big.png") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    return form


def test_origin_null_and_foreign_hosts_are_refused(servers):
    srv = servers.start(model="fake")
    body = json.dumps({"prompt": txt2img(steps=2)})
    port = srv.server.port
    results = calls(
        srv,
        ("POST", "/prompt", {"data": body, "headers": {"Origin": "null", "Content-Type": "text/plain"}}),
        ("GET", "/history", {"headers": {"Origin": "null"}}),
        ("POST", "/upload/image", {"data": _upload(_png(4, 4)), "headers": {"Origin": "null"}}),
        ("GET", "/history", {"headers": {"Host": f"evil.example:{port}"}}),          # DNS rebinding
        ("GET", "/view?filename=x.png", {"headers": {"Host": f"rebind.attacker.test:{port}"}}),
        ("GET", "/history", {"headers": {"Origin": f"http://127.0.0.1:{port + 1}"}}),  # another local port
        ("GET", "/history", {"headers": {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}}),
        ("GET", "/history", {}),
    )
    statuses = [s for s, _ in results]
    assert statuses == [403, 403, 403, 403, 403, 403, 200, 200], results
    assert "Origin" in results[0][1]["error"]["message"] and "Host" in results[3][1]["error"]["message"]

    async def ws_null():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(srv.url + "/ws", headers={"Origin": "null"})
            return info.value.status
    assert run(ws_null()) == 403


def test_allow_host_and_allow_origin_widen_the_policy(servers):
    srv = servers.start(model="fake", allow_hosts=["comfy.lan"], allow_origins=["https://app.example", "null"])
    port = srv.server.port
    results = calls(
        srv,
        ("GET", "/history", {"headers": {"Host": f"comfy.lan:{port}"}}),
        ("GET", "/history", {"headers": {"Host": f"other.lan:{port}"}}),
        ("GET", "/history", {"headers": {"Origin": "https://app.example"}}),
        ("GET", "/history", {"headers": {"Origin": "null"}}),
        ("GET", "/history", {"headers": {"Origin": "https://other.example"}}),
    )
    assert [s for s, _ in results] == [200, 403, 200, 200, 403]


def test_auth_token_on_every_route_and_the_websocket(servers):
    srv = servers.start(model="fake", auth_token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    results = calls(
        srv,
        ("GET", "/history", {}), ("GET", "/api/object_info", {}), ("GET", "/", {}), ("GET", "/api/settings", {}),
        ("GET", "/history", {"headers": {"Authorization": "Bearer wrong"}}),
        ("GET", "/history", {"headers": bearer}),
        ("GET", f"/history?token={TOKEN}", {}),
        ("GET", "/system_stats", {"headers": bearer}),
    )
    assert [s for s, _ in results[:5]] == [401, 401, 401, 401, 401]
    assert results[5][0] == 200 and results[6][0] == 200
    argv = results[7][1]["system"]["argv"]
    assert TOKEN not in json.dumps(argv)

    async def ws():
        # unsafe=True: aiohttp's jar keeps no cookies of IP-address hosts otherwise (browsers do)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(srv.url + "/ws?clientId=x")
            refused = info.value.status
            client = Client(session, srv.url, "abc")
            client.ws = await session.ws_connect(srv.url + "/ws?clientId=abc", headers=bearer)
            first = await client.receive()
            async with session.get(srv.url + f"/?token={TOKEN}") as r:   # a browser: the token becomes a cookie
                cookie = r.cookies.get("ksampler_rt_token")
            async with session.get(srv.url + "/history") as r:           # the cookie now authenticates
                with_cookie = r.status
            await client.close()
            return refused, first, cookie, with_cookie
    refused, first, cookie, with_cookie = run(ws())
    assert refused == 401 and first["type"] == "status"
    assert cookie is not None and cookie["httponly"] and cookie["samesite"] == "Strict"
    assert with_cookie == 200


def test_system_stats_hides_argv_from_callers_without_the_token(servers):
    srv = servers.start(model="fake")
    (status, stats), = calls(srv, ("GET", "/system_stats", {}))
    assert status == 200 and stats["system"]["argv"] == ["ksampler-rt", "serve", "--disable-api-nodes"]


def test_pixel_cap_at_upload_and_load_image(servers, tmp_path):
    srv = servers.start(model="fake", max_image_pixels=100 * 100)
    (tmp_path / "input").mkdir(exist_ok=True)
    (tmp_path / "input" / "huge.png").write_bytes(_png(120, 120))   # placed on disk directly
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "huge.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    results = calls(
        srv,
        ("POST", "/upload/image", {"data": _upload(_png(120, 120))}),
        ("POST", "/upload/image", {"data": _upload(_png(100, 100), "ok.png")}),
        ("POST", "/prompt", {"json": {"prompt": prompt}}),
        ("GET", "/view?filename=huge.png&type=input&preview=webp", {}),
    )
    assert results[0][0] == 400 and "--max-image-pixels" in results[0][1]["error"]["message"]
    assert not (tmp_path / "input" / "big.png").exists()
    assert results[1][0] == 200
    assert results[2][0] == 400
    assert "14400" in json.dumps(results[2][1]["node_errors"]["1"])
    assert results[3][0] == 400


def test_bad_input_is_a_400_without_server_paths(servers, tmp_path):
    srv = servers.start(model="fake")
    deep = "[" * 100000 + "]" * 100000
    nested = {"prompt": txt2img(), "extra_data": {"x": json.loads("[" * 200 + "]" * 200)}}
    results = calls(
        srv,
        ("POST", "/prompt", {"data": deep, "headers": {"Content-Type": "application/json"}}),
        ("POST", "/prompt", {"json": nested}),
        ("GET", "/view?filename=" + "a" * 5000 + ".png", {}),
        ("GET", "/view?filename=a.png&subfolder=" + "b/" * 3000, {}),
        ("POST", "/prompt", {"json": {"prompt": {"1": {"class_type": ["x"], "inputs": {}}}}}),
        ("POST", "/prompt", {"json": {"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "x" * 5000}},
                                                 "2": {"class_type": "PreviewImage",
                                                       "inputs": {"images": ["1", 0]}}}}}),
    )
    assert [s for s, _ in results] == [400] * 6, results
    for _, body in results:
        assert str(tmp_path) not in str(body) and "Traceback" not in str(body)


def test_a_3000_node_chain_is_worked_iteratively(servers):
    srv = servers.start(model="fake")
    prompt = txt2img(steps=1)
    previous = "5"
    for i in range(3000):
        node = str(100 + i)
        prompt[node] = {"class_type": "LatentFromBatch", "inputs": {"samples": [previous, 0], "batch_index": 0,
                                                                    "length": 1}}
        previous = node
    prompt["3"]["inputs"]["latent_image"] = [previous, 0]

    async def go():   # no WebSocket: 3000 nodes send more progress messages than a test wants to read
        async with aiohttp.ClientSession() as session:
            async with session.post(srv.url + "/prompt", json={"prompt": prompt}) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            while True:
                async with session.get(srv.url + f"/history/{prompt_id}") as r:
                    history = await r.json()
                if history:
                    return history[prompt_id]
                await asyncio.sleep(0.1)
    history = run(go(), timeout=180)
    assert history["status"]["status_str"] == "success", history["status"]


def test_prompt_id_is_a_bounded_new_string(servers):
    srv = servers.start(model="fake")
    results = calls(
        srv,
        ("POST", "/prompt", {"json": {"prompt": txt2img(steps=1), "prompt_id": 12345}}),
        ("POST", "/prompt", {"json": {"prompt": txt2img(steps=1), "prompt_id": "x" * 129}}),
        ("POST", "/prompt", {"json": {"prompt": txt2img(steps=1), "prompt_id": "a\nb"}}),
        ("POST", "/prompt", {"json": {"prompt": txt2img(steps=1), "prompt_id": "mine-1"}}),
        ("POST", "/prompt", {"json": {"prompt": txt2img(steps=1), "prompt_id": "mine-1"}}),
    )
    assert [s for s, _ in results] == [400, 400, 400, 200, 400], results
    assert "expected a string" in results[0][1]["error"]["message"]
    assert "at most 128" in results[1][1]["error"]["message"]
    assert results[3][1]["prompt_id"] == "mine-1"

    async def wait_and_reuse():
        async with aiohttp.ClientSession() as session:
            client = Client(session, srv.url)
            for _ in range(400):
                if "mine-1" in await client.get_json("/history"):
                    break
                await asyncio.sleep(0.05)
            async with session.post(srv.url + "/prompt", json={"prompt": txt2img(steps=1), "prompt_id": "mine-1"}) as r:
                return r.status
    assert run(wait_and_reuse()) == 400   # in the history now: still refused
