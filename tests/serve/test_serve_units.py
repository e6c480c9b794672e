"""History persistence, the bounded output cache, previews, the queue and the worker seam."""
from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest
from serve_helpers import CKPT, txt2img

from ksampler_rt.serve.history import History
from ksampler_rt.serve.preview import decode_preview_frame, encode_preview_frame, latent_rgb_factors, latent_to_rgb
from ksampler_rt.serve.prompt_queue import PromptQueue, QueueFull, QueueItem
from ksampler_rt.serve.testing import fake_pipeline
from ksampler_rt.serve.worker import (BoundedOutputCache, LocalWorker, PromptExecutionError, PromptInterrupted,
                                      estimate_nbytes)


def _entry(i):
    return {"prompt": [i, f"p{i}", {}, {"client_id": "c", "api_key_comfy_org": "secret"}, ["9"]],
            "outputs": {"9": {"images": [{"filename": f"{i}.png", "subfolder": "", "type": "output"}]}},
            "status": {"status_str": "success", "completed": True, "messages": []}}


def test_history_persists_replays_and_compacts(tmp_path):
    h = History(tmp_path, max_items=5)
    for i in range(8):
        h.add(f"p{i}", _entry(i))
    h.delete("p7")
    assert list(h.get()) == ["p3", "p4", "p5", "p6"]
    assert "api_key_comfy_org" not in h.get("p3")["p3"]["prompt"][3]
    assert list(h.get(max_items=2)) == ["p5", "p6"] and list(h.get(max_items=2, offset=1)) == ["p4", "p5"]
    assert h.get("nope") == {}
    again = History(tmp_path, max_items=5)
    assert again.get() == h.get()
    # A torn last line (crash mid-write) is skipped, the rest survives.
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"op": "add", "prompt_id": "torn", "entr')
    torn = History(tmp_path, max_items=5)
    assert list(torn.get()) == ["p3", "p4", "p5", "p6"] and torn.load_warnings
    # Many writes over few live entries are compacted into one line per entry.
    for i in range(200):
        torn.add(f"q{i % 3}", _entry(i))
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) < 80
    assert History(tmp_path, max_items=5).get() == torn.get()
    torn.clear()
    assert History(tmp_path).get() == {}


def test_history_bad_bytes_cost_their_line_only(tmp_path):
    (tmp_path / "history.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    h = History(tmp_path)
    assert h.get() == {} and h.load_warnings and not (tmp_path / "history.jsonl.corrupt").exists()
    h.add("p", {"prompt": [0, "p", {}, {}, []], "outputs": {}, "status": {}})
    assert list(History(tmp_path).get()) == ["p"]


def test_bounded_cache_evicts_by_bytes_and_entries():
    cache = BoundedOutputCache(max_bytes=1000, max_entries=3)
    a = ({"samples": np.zeros(100, np.float32)},)   # 400 bytes
    cache.put("a", a)
    cache.put("b", (np.zeros(100, np.float32),))
    assert cache.get("a") is a and cache.nbytes == 800
    cache.put("c", (np.zeros(100, np.float32),))      # 1200 > 1000: the least recently used ("b") goes
    assert cache.get("b") is None and cache.get("a") is a and cache.nbytes == 800
    cache.put("huge", (np.zeros(1000, np.float32),))  # larger than the bound: never stored
    assert cache.get("huge") is None
    cache.put("m1", (object(),))
    cache.put("m2", (object(),))
    assert len(cache) == 3 and cache.nbytes <= 1000
    assert estimate_nbytes([{"x": np.zeros(4, np.float64)}, (np.zeros(2, np.uint8), "s")]) == 34
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_preview_projection_and_frame():
    latent = np.zeros((2, 4, 8, 12), np.float32)
    rgb = latent_to_rgb(latent)
    assert rgb.shape == (8, 12, 3) and rgb.dtype == np.uint8 and (rgb == 127).all()
    latent[0, 0] = 1.0
    assert latent_to_rgb(latent, latent_rgb_factors("sdxl")).mean() != latent_to_rgb(latent).mean()
    frame = encode_preview_frame(latent, max_size=6)
    event, fmt, image = decode_preview_frame(frame)
    assert (event, fmt) == (1, 1) and image.format == "JPEG" and max(image.size) == 6


def test_queue_orders_by_number_then_arrival_and_bounds():
    async def main():
        q = PromptQueue(max_pending=3)
        for number, pid in ((1, "b"), (1, "c"), (-5, "front")):
            q.put(QueueItem(number, q.next_seq(), pid, {}, {}, ["9"]))
        with pytest.raises(QueueFull):
            q.put(QueueItem(9, q.next_seq(), "x", {}, {}, []))
        assert [i.prompt_id for i in q.pending()] == ["front", "b", "c"]
        first = await q.get()
        assert first.prompt_id == "front" and q.remaining() == 3 and q.contains("front")
        assert q.delete("c") and not q.delete("c")
        q.done()
        assert [i.as_comfy()[1] for i in q.pending()] == ["b"] and q.remaining() == 1
    asyncio.run(main())


def test_local_worker_runs_reports_and_pickles(tmp_path):
    pipe = fake_pipeline((CKPT,), output_dir=tmp_path / "out", input_dir=tmp_path / "in", temp_dir=tmp_path / "t")
    worker = LocalWorker(pipe, preview=True)
    events = []
    result = worker.run("p1", txt2img(steps=3), {}, lambda kind, data: events.append((kind, data)), lambda: False)
    assert list(result.outputs) == ["9"] and result.outputs["9"]["images"][0]["filename"].endswith(".png")
    assert [kind for kind, _ in events].count("preview") == 3
    assert ("executing", {"node": None, "display_node": None, "prompt_id": "p1"}) not in events
    assert [s[1] for s in result.sampling] == [3] and result.sampling[0][2] > 0
    assert {c for _, c, _ in result.node_seconds} == {"CheckpointLoaderSimple", "CLIPTextEncode",
                                                       "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"}
    with pytest.raises(PromptExecutionError) as err:
        worker.run("p2", txt2img(text="__raise__"), {}, lambda *a: None, lambda: False)
    clone = pickle.loads(pickle.dumps(err.value))
    assert clone.details["node_id"] == "6" and clone.details == err.value.details
    with pytest.raises(PromptInterrupted) as stop:
        worker.run("p3", txt2img(steps=5, seed=3), {}, lambda *a: None, lambda: True)
    assert pickle.loads(pickle.dumps(stop.value)).details["prompt_id"] == "p3"
    worker.free(free_memory=True)
    assert len(worker.cache) == 0


@pytest.mark.parametrize("example, family", [("flux-dev.json", "flux"), ("flux-schnell.json", "flux-schnell"),
                                             ("sd3.5.json", "sd3"), ("txt2img.json", "sd15")])
def test_preview_family_follows_unet_loader_and_checkpoint_loader(tmp_path, example, family):
    """Previews project the latent with the family's RGB factors: the MODEL may come from UNETLoader (FLUX.1
    graphs) or CheckpointLoaderSimple, through ModelSampling* / LoRA nodes."""
    import json as _json
    from pathlib import Path

    from ksampler_rt.serve.worker import _model_loader_of

    prompt = _json.loads((Path(__file__).resolve().parents[2] / "ksampler_rt/workflow/examples" / example).read_text())
    sampler = next(k for k, v in prompt.items() if v["class_type"] in ("KSampler", "KSamplerAdvanced"))
    loader = _model_loader_of(prompt, sampler)
    assert loader["class_type"] == ("UNETLoader" if "flux" in example else "CheckpointLoaderSimple")
    names = [loader["inputs"].get("ckpt_name") or "tiny-sd15"]
    pipe = fake_pipeline(tuple(names), output_dir=tmp_path / "out", input_dir=tmp_path / "in",
                         temp_dir=tmp_path / "t")
    assert LocalWorker(pipe, preview=True)._family_of(loader) == family
