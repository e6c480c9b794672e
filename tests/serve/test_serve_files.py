"""/view and /upload/image never leave their folders; uploads are bounded and checked."""
from __future__ import annotations

import io
import os

import aiohttp
import numpy as np
from PIL import Image
from serve_helpers import Client, of_type, run

from ksampler_rt.serve.server import UnsafePath, safe_path


def _png(color=(200, 30, 30), size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size + (3,), color, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _form(data: bytes, filename: str, **fields) -> tuple[bytes, dict]:
    """A multipart body written by hand, so hostile file names reach the server unescaped."""
    boundary = "ksamplerrtboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_safe_path_rules(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, root / "link.txt")
    os.symlink(tmp_path, root / "dirlink")
    assert safe_path(root, "sub", "a.png") == root.resolve() / "sub" / "a.png"
    assert safe_path(root, "", "a.png") == root.resolve() / "a.png"
    bad = [("", "../secret.txt", 400), ("", "/etc/passwd", 400), ("", "a/../../b", 400), ("", "", 400),
           ("", ".hidden", 400), ("", "sub\\..\\x", 400), ("..", "secret.txt", 403), ("/etc", "passwd", 403),
           ("sub/../..", "secret.txt", 403), (".ksampler-rt", "history.jsonl", 403), ("", "link.txt", 403),
           ("dirlink", "secret.txt", 403), ("C:", "x", 403), ("", "a\x00b", 400)]
    for subfolder, filename, status in bad:
        try:
            safe_path(root, subfolder, filename)
        except UnsafePath as exc:
            assert exc.status == status, (subfolder, filename, exc.status)
        else:
            raise AssertionError(f"accepted {subfolder!r} / {filename!r}")


def test_view_refuses_traversal_and_symlinks(servers, tmp_path):
    srv = servers.start()
    output = tmp_path / "output"
    (output / "sub").mkdir(parents=True, exist_ok=True)
    (output / "sub" / "ok.png").write_bytes(_png())
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png((0, 0, 255)))
    os.symlink(secret, output / "escape.png")
    os.symlink(tmp_path, output / "escape_dir")
    (output / ".ksampler-rt").mkdir(exist_ok=True)

    async def main():
        async with aiohttp.ClientSession() as session:
            async def status(**params):
                async with session.get(srv.url + "/view", params=params) as r:
                    return r.status, await r.read(), r.headers.get("Content-Type")

            results = {
                "ok": await status(filename="ok.png", subfolder="sub", type="output"),
                "annotated": await status(filename="ok.png [output]", subfolder="sub"),
                "preview": await status(filename="ok.png", subfolder="sub", preview="jpeg;50"),
                "rgb": await status(filename="ok.png", subfolder="sub", channel="rgb"),
                "alpha": await status(filename="ok.png", subfolder="sub", channel="a"),
                "dotdot_name": await status(filename="../secret.png"),
                "dotdot_sub": await status(filename="secret.png", subfolder=".."),
                "abs_name": await status(filename="/etc/passwd"),
                "abs_sub": await status(filename="passwd", subfolder="/etc"),
                "symlink_file": await status(filename="escape.png"),
                "symlink_dir": await status(filename="secret.png", subfolder="escape_dir"),
                "state_dir": await status(filename="history.jsonl", subfolder=".ksampler-rt"),
                "bad_type": await status(filename="ok.png", subfolder="sub", type="models"),
                "missing": await status(filename="nope.png"),
                "no_name": await status(),
                "encoded": await status(filename="..%2Fsecret.png"),
            }
            return results

    r = run(main())
    assert r["ok"][0] == 200 and r["ok"][1] == (output / "sub" / "ok.png").read_bytes()
    assert r["ok"][2] == "image/png" and r["annotated"][0] == 200
    assert r["preview"][0] == 200 and r["preview"][2] == "image/jpeg" and r["preview"][1][:2] == b"\xff\xd8"
    assert r["rgb"][0] == 200 and r["alpha"][0] == 200
    for key in ("dotdot_name", "abs_name"):
        assert r[key][0] == 400, key
    for key in ("dotdot_sub", "abs_sub", "symlink_file", "symlink_dir", "state_dir"):
        assert r[key][0] == 403, key
    assert r["bad_type"][0] == 400 and r["missing"][0] == 404 and r["no_name"][0] == 404
    assert r["encoded"][0] in (400, 404)
    assert all(secret.read_bytes() != value[1] for value in r.values())


def test_upload_image_stays_in_its_folder(servers, tmp_path):
    srv = servers.start(max_upload_mb=0.05)
    inputs = tmp_path / "input"
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, inputs / "out_link")
    red, blue = _png(), _png((0, 0, 255))

    async def main():
        async with aiohttp.ClientSession() as session:
            async def upload(data, filename, **fields):
                body, headers = _form(data, filename, **fields)
                async with session.post(srv.url + "/upload/image", data=body, headers=headers) as r:
                    try:
                        body = await r.json()
                    except aiohttp.ContentTypeError:
                        body = await r.text()
                    return r.status, body

            results = {
                "first": await upload(red, "apple.png"),
                "same": await upload(red, "apple.png"),
                "different": await upload(blue, "apple.png"),
                "overwrite": await upload(blue, "apple.png", overwrite="true"),
                "sub": await upload(red, "apple.png", subfolder="pets"),
                "temp": await upload(red, "t.png", type="temp"),
                "dotdot_name": await upload(red, "../evil.png"),
                "abs_name": await upload(red, "/tmp/evil.png"),
                "dotdot_sub": await upload(red, "evil.png", subfolder="../.."),
                "symlink_sub": await upload(red, "evil.png", subfolder="out_link"),
                "hidden": await upload(red, ".htaccess"),
                "not_image": await upload(b"#!/bin/sh\necho hi\n", "x.png"),
                "bad_type": await upload(red, "x.png", type="models"),
                "too_big": await upload(os.urandom(200_000), "big.png"),
            }
            async with session.post(srv.url + "/upload/image", data=b"plain") as r:
                results["no_form"] = (r.status, None)
            # The uploaded image is usable at once by LoadImage (its COMBO lists the input folder).
            client = await Client(session, srv.url).connect()
            prompt = {
                "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
                "10": {"class_type": "LoadImage", "inputs": {"image": results["first"][1]["name"]}},
                "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
                "8": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
                "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "roundtrip", "images": ["8", 0]}},
            }
            answer = await client.submit(prompt)
            messages = await client.wait_done(answer["prompt_id"])
            await client.close()
            return results, messages

    r, messages = run(main())
    assert r["first"] == (200, {"name": "apple.png", "subfolder": "", "type": "input"})
    assert r["same"] == (200, {"name": "apple.png", "subfolder": "", "type": "input"})
    assert r["different"] == (200, {"name": "apple (1).png", "subfolder": "", "type": "input"})
    assert r["overwrite"] == (200, {"name": "apple.png", "subfolder": "", "type": "input"})
    assert (inputs / "apple.png").read_bytes() == blue and (inputs / "apple (1).png").read_bytes() == blue
    assert r["sub"][0] == 200 and (inputs / "pets" / "apple.png").read_bytes() == red
    assert r["temp"][0] == 200 and (tmp_path / "temp" / "t.png").is_file()
    for key in ("dotdot_name", "abs_name", "hidden", "not_image", "bad_type", "no_form"):
        assert r[key][0] == 400, (key, r[key])
    for key in ("dotdot_sub", "symlink_sub"):
        assert r[key][0] == 403, (key, r[key])
    assert r["too_big"][0] == 413
    assert list(outside.iterdir()) == [] and not (tmp_path / "evil.png").exists()
    assert not list(inputs.glob(".upload-*"))
    assert of_type(messages, "execution_success")
