"""ComfyUI's own frontend (comfyui-frontend-package 1.27.10) in a real headless Chromium, driven over the
DevTools protocol: the page loads, the txt2img workflow (UI format) loads, is queued, and its image shows
in the Save Image node; the browser console holds no error and no request failed.

Skipped where Chromium or the frontend package is missing (.ci/run installs Chromium with apt-get).
``KSAMPLER_RT_UPDATE_SCREENSHOT=1`` also writes the screenshot to docs/ui-screenshot.png.
"""
from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")

from cdp import Browser, find_chromium  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "ksampler_rt" / "workflow" / "examples" / "txt2img.ui.json"
SCREENSHOT = ROOT / "docs" / "ui-screenshot.png"

IMAGE_SHOWN = """(() => {
  const node = app.graph.getNodeById(9);
  const img = node && node.imgs && node.imgs[0];
  return img && img.complete && img.naturalWidth > 0 ? [img.src, img.naturalWidth, img.naturalHeight] : null;
})()"""


@pytest.mark.slow
def test_frontend_runs_txt2img_in_a_real_browser(servers, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does)")
    pytest.importorskip("comfyui_frontend_package", reason="the [ui] extra (comfyui-frontend-package) is missing")
    srv = servers.start()
    workflow = json.loads(WORKFLOW.read_text())
    if servers.kind == "fake":   # the analytic stand-in is registered under the same name; fewer steps suffice
        workflow["nodes"][4]["widgets_values"][2] = 4

    async def drive():
        async with aiohttp.ClientSession() as session:
            # the minimap would cover the Save Image node in the screenshot
            async with session.post(srv.url + "/api/settings/Comfy.Minimap.Visible", json=False) as r:
                assert r.status == 200
        async with Browser(exe) as browser:
            page = await browser.page()
            await page.send("Page.navigate", url=srv.url + "/")
            await page.wait_for("!!(window.app && window.app.graph && window.app.canvas)", 90, "the app to start")
            await page.evaluate(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
            types = await page.evaluate("app.graph._nodes.map(n => n.type).sort().join(',')")
            await page.evaluate("app.queuePrompt(0, 1).then(() => true)")
            src, width, height = await page.wait_for(IMAGE_SHOWN, 240, "the image in the Save Image node")
            await asyncio.sleep(0.5)   # let the canvas draw it
            await page.screenshot(tmp_path / "ui.png")
            console, exceptions, failed = list(page.console), list(page.exceptions), list(page.failed_requests)
            await page.close()
        async with aiohttp.ClientSession() as session:
            async with session.get(srv.url + "/api/history") as r:
                history = await r.json()
        return types, src, width, height, console, exceptions, failed, history

    types, src, width, height, console, exceptions, failed, history = asyncio.run(
        asyncio.wait_for(drive(), 420))
    assert types == "CLIPTextEncode,CLIPTextEncode,CheckpointLoaderSimple,EmptyLatentImage,KSampler,SaveImage,VAEDecode"
    errors = [c for c in console if c["level"] == "error"]
    assert not errors and not exceptions and not failed, (errors, exceptions, failed)
    # the server ran exactly this workflow, and the node shows the image it saved, at the workflow's size
    assert len(history) == 1
    entry = next(iter(history.values()))
    assert entry["status"]["status_str"] == "success"
    saved = entry["outputs"]["9"]["images"][0]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(src).query)
    assert query["filename"] == [saved["filename"]] and query["type"] == ["output"]
    assert (width, height) == (256, 256)
    assert entry["prompt"][2]["3"]["inputs"]["seed"] == 42
    if os.environ.get("KSAMPLER_RT_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes((tmp_path / "ui.png").read_bytes())
