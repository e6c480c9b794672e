"""The routes ComfyUI's frontend needs, as ComfyUI 0.3.64 answers them: every route under /x and /api/x, the
user / settings / userdata store (one user, path-confined), /extensions, node listing (display names,
python_module, the loader nodes), SaveImageWebsocket, /upload/mask, /view_metadata, internal routes."""
from __future__ import annotations

import io
import json
import struct

import aiohttp
import numpy as np
import pytest
from PIL import Image

from serve_helpers import Client, of_type, run, txt2img


async def _call(session, method, url, **kwargs):
    async with session.request(method, url, **kwargs) as r:
        body = await r.read()
        try:
            data = json.loads(body)
        except ValueError:
            data = body
        return r.status, data


def calls(srv, *requests):
    """[(status, body)] of (method, path, kwargs) requests, in order, on one session."""
    async def go():
        async with aiohttp.ClientSession() as session:
            return [await _call(session, m, srv.url + p, **kw) for m, p, kw in requests]
    return run(go())


def test_every_route_also_answers_under_api(servers):
    srv = servers.start(model="fake")
    paths = ["/object_info/KSampler", "/queue", "/prompt", "/history", "/system_stats", "/features", "/embeddings",
             "/models", "/models/checkpoints", "/users", "/settings", "/extensions", "/i18n",
             "/experiment/models", "/internal/folder_paths"]
    plain = calls(srv, *[("GET", p, {}) for p in paths])
    prefixed = calls(srv, *[("GET", "/api" + p, {}) for p in paths])
    for path, (s1, b1), (s2, b2) in zip(paths, plain, prefixed):
        assert s1 == s2 == 200, (path, s1, s2)
        if path not in ("/system_stats",):
            assert b1 == b2, path


def test_settings_and_userdata_store_like_comfyui(servers, tmp_path):
    srv = servers.start(model="fake")
    user = tmp_path / "output" / ".ksampler-rt" / "user" / "default"
    (status_users, users), (s1, _), (s2, _), (s3, one), (s4, all_settings) = calls(
        srv, ("GET", "/api/users", {}), ("POST", "/api/settings", {"json": {"Comfy.A": 1, "Comfy.B": "x"}}),
        ("POST", "/api/settings/Comfy.C", {"json": [1, 2]}), ("GET", "/api/settings/Comfy.B", {}),
        ("GET", "/api/settings", {}))
    assert status_users == 200 and users == {"storage": "server", "migrated": True}
    assert (s1, s2, s3, s4) == (200, 200, 200, 200) and one == "x"
    assert {k: all_settings[k] for k in ("Comfy.A", "Comfy.B", "Comfy.C")} == {"Comfy.A": 1, "Comfy.B": "x",
                                                                               "Comfy.C": [1, 2]}
    on_disk = json.loads((user / "comfy.settings.json").read_text())
    assert on_disk["Comfy.C"] == [1, 2]

    wf = {"nodes": [], "links": []}
    results = calls(
        srv,
        ("POST", "/api/userdata/workflows%2Fa.json", {"data": json.dumps(wf)}),
        ("POST", "/api/userdata/workflows%2Fa.json?overwrite=false", {"data": "{}"}),
        ("GET", "/api/userdata?dir=workflows", {}),
        ("GET", "/api/userdata?dir=workflows&full_info=true", {}),
        ("GET", "/api/userdata/workflows%2Fa.json", {}),
        ("POST", "/api/userdata/workflows%2Fa.json/move/workflows%2Fb.json?full_info=true", {}),
        ("GET", "/api/v2/userdata?path=workflows", {}),
        ("DELETE", "/api/userdata/workflows%2Fb.json", {}),
        ("GET", "/api/userdata/workflows%2Fb.json", {}),
    )
    assert results[0] == (200, "workflows/a.json")
    assert results[1][0] == 409
    assert results[2] == (200, ["a.json"])
    assert results[3][1][0]["path"] == "a.json" and results[3][1][0]["size"] == len(json.dumps(wf))
    assert results[4] == (200, wf)
    assert results[5][0] == 200 and results[5][1]["path"] == "workflows/b.json"
    assert results[6] == (200, [{"name": "b.json", "path": "workflows/b.json", "type": "file",
                                 "size": len(json.dumps(wf)), "modified": results[6][1][0]["modified"]}])
    assert results[7][0] == 204 and results[8][0] == 404
    assert not (user / "workflows" / "b.json").exists()


def test_userdata_is_confined_to_the_user_folder(servers, tmp_path):
    srv = servers.start(model="fake")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    user = tmp_path / "output" / ".ksampler-rt" / "user" / "default"
    (user / "link").symlink_to(tmp_path)
    results = calls(
        srv,
        ("GET", "/api/userdata/..%2F..%2F..%2F..%2Fsecret.txt", {}),
        ("GET", "/api/userdata/%252E%252E%252Fx", {}),
        ("POST", "/api/userdata/..%2Fother-user.json", {"data": "{}"}),
        ("GET", "/api/userdata/link%2Fsecret.txt", {}),
        ("GET", "/api/userdata?dir=..", {}),
        ("GET", "/api/v2/userdata?path=..%2F..", {}),
        ("POST", "/api/userdata/%2Fetc%2Fx", {"data": "{}"}),
        ("POST", "/api/userdata/" + "a" * 5000, {"data": "{}"}),
    )
    statuses = [s for s, _ in results]
    assert statuses[:7] == [403, 403, 403, 403, 403, 403, 403], results
    assert statuses[7] == 400
    assert not (tmp_path / "output" / ".ksampler-rt" / "user" / "other-user.json").exists()
    assert all(str(tmp_path) not in str(body) for _, body in results)


def test_object_info_lists_nodes_as_the_frontend_expects(servers):
    srv = servers.start(model="fake")
    (status, info), = calls(srv, ("GET", "/api/object_info", {}))
    assert status == 200
    assert info["CheckpointLoaderSimple"]["display_name"] == "Load Checkpoint"
    assert info["KSamplerAdvanced"]["display_name"] == "KSampler (Advanced)"
    assert info["CLIPTextEncode"]["display_name"] == "CLIP Text Encode (Prompt)"
    assert info["SaveImage"]["python_module"] == "nodes" and info["SaveImage"]["category"] == "image"
    # the loaders the frontend's model store looks up by name (modelToNodeStore.registerDefaults)
    for name, key in (("VAELoader", "vae_name"), ("ControlNetLoader", "control_net_name"), ("UNETLoader", "unet_name"),
                      ("UpscaleModelLoader", "model_name"), ("StyleModelLoader", "style_model_name"),
                      ("GLIGENLoader", "gligen_name"), ("CLIPLoader", "clip_name"),
                      ("ImageOnlyCheckpointLoader", "ckpt_name"), ("LoraLoaderModelOnly", "lora_name")):
        assert key in info[name]["input"]["required"], name
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == []
    assert info["UpscaleModelLoader"]["python_module"] == "comfy_extras.nodes_upscale_model"
    assert info["SaveImageWebsocket"]["category"] == "api/image" and info["SaveImageWebsocket"]["output_node"]


def test_listed_only_loader_fails_validation_clearly_and_empty_graph_has_no_outputs(servers):
    srv = servers.start(model="fake")
    prompt = txt2img()
    prompt["20"] = {"class_type": "CheckpointLoader", "inputs": {"config_name": "v1.yaml", "ckpt_name": "a.ckpt"}}
    prompt["8"]["inputs"]["vae"] = ["20", 2]
    (s1, bad), (s2, empty) = calls(srv, ("POST", "/prompt", {"json": {"prompt": prompt}}),
                                   ("POST", "/prompt", {"json": {"prompt": {}}}))
    assert s1 == 400 and bad["error"]["type"] == "prompt_outputs_failed_validation"
    error = bad["node_errors"]["20"]["errors"][0]
    assert error["type"] == "node_not_supported" and "cannot run here" in error["message"]
    assert s2 == 400 and empty["error"]["type"] == "prompt_no_outputs"


def test_save_image_websocket_sends_png_frames(servers):
    srv = servers.start(model="fake")
    prompt = txt2img(steps=2)
    prompt["9"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}
    prompt["5"]["inputs"]["batch_size"] = 2

    async def go():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            done = await client.submit(prompt)
            messages = await client.wait_done(done["prompt_id"])
            history = await client.history(done["prompt_id"])
            await client.close()
            return messages, history

    messages, history = run(go())
    frames, current = [], None
    for m in messages:   # as ComfyUI's websockets_api_example_ws_images.py collects them
        if isinstance(m, dict) and m["type"] == "executing":
            current = m["data"]["node"]
        elif isinstance(m, bytes) and current == "9":
            frames.append(m)
    assert len(frames) == 2
    for frame in frames:
        assert struct.unpack(">II", frame[:8]) == (1, 2)
        image = Image.open(io.BytesIO(frame[8:]))
        assert image.format == "PNG" and image.size == (64, 64)
    assert [p["node"] for p in of_type(messages, "progress") if p["node"] == "9"] == ["9", "9"]
    assert history["status"]["status_str"] == "success" and history["outputs"] == {}
    assert not of_type(messages, "executed")


def test_upload_mask_puts_the_alpha_on_the_original(servers, tmp_path):
    srv = servers.start(model="fake")
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    original = Image.fromarray(rgb)
    buffer = io.BytesIO()
    original.save(buffer, format="PNG")
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:4] = 255
    mask = Image.new("RGBA", (8, 8))
    mask.putalpha(Image.fromarray(alpha))
    mbuf = io.BytesIO()
    mask.save(mbuf, format="PNG")

    def form(data, name, **fields):
        f = aiohttp.FormData()
        f.add_field("image", data, filename=name, content_type="image/png")
        for k, v in fields.items():
            f.add_field(k, v)
        return f

    (s1, up), (s2, masked), (s3, refused) = calls(
        srv, ("POST", "/api/upload/image", {"data": form(buffer.getvalue(), "photo.png")}),
        ("POST", "/api/upload/mask", {"data": form(mbuf.getvalue(), "clipspace-mask.png", original_ref=json.dumps(
            {"filename": "photo.png", "subfolder": "", "type": "input"}))}),
        ("POST", "/api/upload/mask", {"data": form(mbuf.getvalue(), "m.png", original_ref=json.dumps(
            {"filename": "../../secret.png", "type": "input"}))}))
    assert (s1, s2) == (200, 200) and masked["name"] == "clipspace-mask.png"
    stored = np.asarray(Image.open(tmp_path / "input" / "clipspace-mask.png"))
    assert stored.shape == (8, 8, 4)
    np.testing.assert_array_equal(stored[..., :3], rgb)
    np.testing.assert_array_equal(stored[..., 3], alpha)
    assert s3 == 400


def test_view_metadata_reads_the_safetensors_header(servers, tmp_path):
    srv = servers.start(model="fake")
    loras = servers.pipeline.registry.loras_dir
    loras.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"__metadata__": {"ss_network_dim": "4"}}).encode()
    (loras / "style.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    results = calls(srv, ("GET", "/api/view_metadata/loras?filename=style.safetensors", {}),
                    ("GET", "/api/view_metadata/loras?filename=missing.safetensors", {}),
                    ("GET", "/api/view_metadata/loras?filename=..%2F..%2Fx.safetensors", {}))
    assert results[0] == (200, {"ss_network_dim": "4"})
    assert results[1][0] == 404 and results[2][0] == 404


def test_internal_routes_and_frontend_lists(servers):
    srv = servers.start(model="fake")
    results = dict(zip(("logs", "raw", "folders", "files", "bad", "ext", "i18n", "templates", "index"), calls(
        srv, ("GET", "/internal/logs", {}), ("GET", "/internal/logs/raw", {}), ("GET", "/internal/folder_paths", {}),
        ("GET", "/internal/files/output", {}), ("GET", "/internal/files/secret", {}), ("GET", "/api/extensions", {}),
        ("GET", "/api/i18n", {}), ("GET", "/api/workflow_templates", {}), ("GET", "/templates/index.json", {}))))
    assert results["logs"][0] == 200 and "ksampler-rt serve: http://" in results["logs"][1]   # the start line
    assert set(results["raw"][1]) == {"entries", "size"}
    assert set(results["folders"][1]) >= {"checkpoints", "loras", "output", "input", "temp"}
    assert results["files"] == (200, [])
    assert results["bad"][0] == 400
    assert results["i18n"] == (200, {}) and results["templates"] == (200, {}) and results["index"] == (200, [])
    extensions = results["ext"][1]
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        assert extensions == []
    else:
        assert "/extensions/core/clipspace.js" in extensions


def test_root_serves_the_frontend_or_says_why_not(servers):
    pytest.importorskip("comfyui_frontend_package")
    srv = servers.start(model="fake")
    off = servers.start(model="fake", ui=False)
    (s1, page), (s2, ext) = calls(srv, ("GET", "/", {}), ("GET", "/extensions/core/clipspace.js", {}))
    (s3, why), (s4, none) = calls(off, ("GET", "/", {}), ("GET", "/api/extensions", {}))
    assert s1 == 200 and b"<div id=\"vue-app\"" in page and s2 == 200
    assert s3 == 404 and b"--no-ui" in why and (s4, none) == (200, [])
