"""End to end: the real server on a loopback port, driven as ComfyUI's websocket example does."""
from __future__ import annotations

import asyncio
import aiohttp
from serve_helpers import CKPT, Client, make_pipeline, of_type, run, txt2img

from ksampler_rt.serve.preview import decode_preview_frame


def test_txt2img_events_history_and_png_equal_to_pipeline(servers, tmp_path):
    srv = servers.start()
    prompt = txt2img(steps=5)
    extra = {"extra_pnginfo": {"workflow": {"nodes": [], "links": []}}}

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            answer = await client.submit(prompt, extra_data=extra)
            assert answer["node_errors"] == {} and answer["number"] == 0
            messages = await client.wait_done(answer["prompt_id"])
            history = await client.history(answer["prompt_id"])
            image = history["outputs"]["9"]["images"][0]
            png = await client.view(image)
            await client.close()
            return answer["prompt_id"], messages, history, image, png

    prompt_id, messages, history, image, png = run(main())
    kinds = [m["type"] for m in messages if isinstance(m, dict) and m["type"] not in ("status", "progress_state")]
    # ComfyUI's order: start, cached, executing per node (with progress per step), executed, success, null.
    assert kinds[:2] == ["execution_start", "execution_cached"]
    assert kinds[-2:] == ["execution_success", "executing"]
    executing = [d["node"] for d in of_type(messages, "executing")]
    assert executing == ["4", "6", "7", "5", "3", "8", "9", None]
    progress = of_type(messages, "progress")
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(i, 5, "3") for i in range(1, 6)]
    assert all(p["prompt_id"] == prompt_id for p in progress)
    (executed,) = of_type(messages, "executed")
    assert executed["node"] == "9" and executed["output"] == {"images": [image]}
    assert image == {"filename": "txt2img_00001_.png", "subfolder": "", "type": "output"}
    assert not any(isinstance(m, bytes) for m in messages)  # previews are off by default
    states = of_type(messages, "progress_state")
    assert states[-1]["prompt_id"] == prompt_id
    assert {n: (s["state"], s["value"], s["max"]) for n, s in states[-1]["nodes"].items()} == {
        "4": ("finished", 1, 1), "6": ("finished", 1, 1), "7": ("finished", 1, 1), "5": ("finished", 1, 1),
        "3": ("finished", 5, 5), "8": ("finished", 1, 1), "9": ("finished", 1, 1)}
    assert any(s["nodes"].get("3", {}).get("state") == "running" and s["nodes"]["3"]["value"] == 2 for s in states)

    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert [m[0] for m in history["status"]["messages"]] == ["execution_start", "execution_cached",
                                                              "execution_success"]
    number, pid, stored_prompt, extra_data, outputs = history["prompt"]
    assert (number, pid, outputs) == (0, prompt_id, ["9"]) and stored_prompt == prompt
    assert extra_data["client_id"] and extra_data["extra_pnginfo"] == extra["extra_pnginfo"]

    # The same workflow through Pipeline.run_workflow writes the same PNG, byte for byte.
    pipe = make_pipeline(servers.kind, servers.tiny_models, output_dir=tmp_path / "direct",
                         input_dir=tmp_path / "input", temp_dir=tmp_path / "temp")
    result = pipe.run_workflow(prompt, prompt_id=prompt_id, extra_pnginfo=extra["extra_pnginfo"])
    direct = (tmp_path / "direct" / result.ui["9"]["images"][0]["filename"]).read_bytes()
    assert png == direct


def test_previews_cache_and_prompt_queue_fields(servers):
    srv = servers.start(preview=True, preview_size=4)

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            first = await client.wait_done((await client.submit(txt2img(steps=3)))["prompt_id"])
            again = await client.wait_done((await client.submit(txt2img(steps=3)))["prompt_id"])
            reseeded = await client.wait_done((await client.submit(txt2img(steps=3, seed=7)))["prompt_id"])
            front = await client.submit(txt2img(steps=2), front=True)
            await client.wait_done(front["prompt_id"])
            await client.close()
            return first, again, reseeded, front

    first, again, reseeded, front = run(main())
    frames = [m for m in first if isinstance(m, bytes)]
    assert len(frames) == 3
    event, fmt, image = decode_preview_frame(frames[0])
    assert (event, fmt, image.format) == (1, 1, "JPEG") and max(image.size) <= 4
    # Each preview follows its progress message.
    order = [m["type"] if isinstance(m, dict) else "preview" for m in first]
    assert order.count("preview") == 3 and order[order.index("progress") + 1] == "preview"
    # An unchanged graph prefix is served from the cache; SaveImage always runs.
    assert of_type(first, "execution_cached")[0]["nodes"] == []
    assert sorted(of_type(again, "execution_cached")[0]["nodes"]) == ["3", "4", "5", "6", "7", "8"]
    assert [d["node"] for d in of_type(again, "executing")] == ["9", None]
    assert not of_type(again, "progress")
    assert sorted(of_type(reseeded, "execution_cached")[0]["nodes"]) == ["4", "5", "6", "7"]
    assert front["number"] == -3


def test_concurrent_clients_all_complete_in_fifo_order(servers):
    srv = servers.start()
    n_clients, per_client = 4, 3

    async def one_client(session, index):
        client = await Client(session, srv.url).connect()
        submitted = []
        for j in range(per_client):
            answer = await client.submit(txt2img(seed=100 * index + j, steps=2, prefix=f"c{index}"))
            submitted.append(answer)
        done = []
        for answer in submitted:
            messages = await client.wait_done(answer["prompt_id"])
            assert of_type(messages, "execution_success"), messages
            # a client only gets the executed/progress messages of its own prompts
            assert {d["prompt_id"] for d in of_type(messages, "progress")} <= {a["prompt_id"] for a in submitted}
            done.append(answer["prompt_id"])
        await client.close()
        return submitted

    async def main():
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(one_client(session, i) for i in range(n_clients)))
            history = await Client(session, srv.url).get_json("/history")
            queue = await Client(session, srv.url).get_json("/queue")
            return results, history, queue

    results, history, queue = run(main(), timeout=40)
    answers = [a for submitted in results for a in submitted]
    assert len({a["prompt_id"] for a in answers}) == n_clients * per_client
    assert sorted(a["number"] for a in answers) == list(range(n_clients * per_client))
    # History is in completion order: it must be the submission (number) order.
    by_id = {a["prompt_id"]: a["number"] for a in answers}
    completed = [by_id[pid] for pid in history]
    assert completed == sorted(completed) and len(completed) == n_clients * per_client
    assert all(h["status"]["status_str"] == "success" for h in history.values())
    assert queue == {"queue_running": [], "queue_pending": []}


def test_interrupt_stops_between_steps_and_next_prompt_runs(servers):
    srv = servers.start(model="fake", delay=0.02)

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            slow = await client.submit(txt2img(steps=200))
            messages = []
            while True:
                m = await client.receive()
                messages.append(m)
                if m["type"] == "progress" and m["data"]["value"] >= 2:
                    break
            async with session.post(srv.url + "/interrupt", json={"prompt_id": "not-running"}) as r:
                assert r.status == 200  # a targeted interrupt of another prompt does nothing
            async with session.post(srv.url + "/interrupt") as r:
                assert r.status == 200
            messages += await client.wait_done(slow["prompt_id"])
            servers.checkpoint().unet.delay = 0.0
            fast = await client.submit(txt2img(steps=3, seed=5))
            after = await client.wait_done(fast["prompt_id"])
            history = await client.history(slow["prompt_id"])
            await client.close()
            return slow, messages, after, history

    slow, messages, after, history = run(main(), timeout=30)
    (interrupted,) = of_type(messages, "execution_interrupted")
    assert interrupted["prompt_id"] == slow["prompt_id"]
    assert interrupted["node_id"] == "3" and interrupted["node_type"] == "KSampler"
    assert set(interrupted["executed"]) == {"4", "6", "7", "5"}
    steps = [p["value"] for p in of_type(messages, "progress")]
    assert 2 <= max(steps) < 100
    assert not of_type(messages, "execution_success")
    assert history["status"]["status_str"] == "error" and history["status"]["completed"] is False
    assert history["status"]["messages"][-1][0] == "execution_interrupted"
    assert of_type(after, "execution_success") and len(of_type(after, "progress")) == 3


def test_queue_full_answers_429_and_queue_edits(servers):
    srv = servers.start(model="fake", delay=0.02, max_queue=2)

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            running = await client.submit(txt2img(steps=500))
            while True:  # wait until it left the queue for the worker
                m = await client.receive()
                if m["type"] == "execution_start":
                    break
            b = await client.submit(txt2img(steps=3, seed=1))
            c = await client.submit(txt2img(steps=3, seed=2))
            async with session.post(srv.url + "/prompt", json={"prompt": txt2img(seed=3)}) as r:
                full = (r.status, await r.json())
            queue = await client.get_json("/queue")
            async with session.post(srv.url + "/queue", json={"delete": [c["prompt_id"]]}) as r:
                assert r.status == 200
            after_delete = await client.get_json("/queue")
            async with session.post(srv.url + "/queue", json={"clear": True}) as r:
                assert r.status == 200
            cleared = await client.get_json("/queue")
            async with session.post(srv.url + "/interrupt", json={}) as r:
                assert r.status == 200
            await client.wait_done(running["prompt_id"])
            metrics = await (await session.get(srv.url + "/metrics")).text()
            await client.close()
            return running, b, c, full, queue, after_delete, cleared, metrics

    running, b, c, full, queue, after_delete, cleared, metrics = run(main(), timeout=30)
    status, body = full
    assert status == 429
    assert body["error"]["type"] == "queue_full" and body["node_errors"] == {}
    assert body["error"]["extra_info"] == {"max_queue": 2}
    assert [item[1] for item in queue["queue_running"]] == [running["prompt_id"]]
    assert [item[1] for item in queue["queue_pending"]] == [b["prompt_id"], c["prompt_id"]]
    assert queue["queue_pending"][0][0] == b["number"] and queue["queue_pending"][0][4] == ["9"]
    assert [item[1] for item in after_delete["queue_pending"]] == [b["prompt_id"]]
    assert cleared["queue_pending"] == []
    assert 'ksampler_rt_prompts_rejected_total{reason="queue_full"} 1.0' in metrics


def test_invalid_prompts_are_refused_before_queueing_and_worker_survives(servers):
    srv = servers.start(max_body_mb=0.05)

    async def post(session, body, raw=False):
        kwargs = {"data": body} if raw else {"json": body}
        async with session.post(srv.url + "/prompt", **kwargs) as r:
            return r.status, await r.json()

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            results = {}
            missing = txt2img()
            del missing["3"]["inputs"]["seed"]
            missing["5"]["inputs"]["width"] = 3
            results["missing"] = await post(session, {"prompt": missing})
            bad_link = txt2img()
            bad_link["8"]["inputs"]["samples"] = ["6", 0]
            results["bad_link"] = await post(session, {"prompt": bad_link})
            unknown = txt2img()
            unknown["3"]["class_type"] = "NoSuchNode"
            results["unknown"] = await post(session, {"prompt": unknown})
            results["no_prompt"] = await post(session, {"client_id": "x"})
            results["not_json"] = await post(session, b"{not json", raw=True)
            results["not_object"] = await post(session, [1, 2, 3])
            results["prompt_list"] = await post(session, {"prompt": [1, 2]})
            results["prompt_path"] = await post(session, {"prompt": "/etc/hostname"})  # never read as a file
            results["inputs_not_dict"] = await post(session, {"prompt": {"1": {"class_type": "SaveImage",
                                                                               "inputs": 5}}})
            results["too_large"] = await post(session, {"prompt": txt2img(text="x" * 100_000)})
            queue = await client.get_json("/queue")
            answer = await client.submit(txt2img(steps=2))
            done = await client.wait_done(answer["prompt_id"])
            await client.close()
            return results, queue, done

    results, queue, done = run(main())
    status, body = results["prompt_path"]
    assert status == 400 and "expected an object" in body["error"]["message"] + body["error"].get("details", "")
    status, body = results["missing"]
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"]
    assert set(errors) == {"3", "5"}
    assert errors["3"]["class_type"] == "KSampler"
    assert errors["3"]["errors"][0]["type"] == "required_input_missing"
    assert errors["3"]["errors"][0]["extra_info"]["input_name"] == "seed"
    assert errors["5"]["errors"][0]["type"] == "value_not_valid"
    assert errors["3"]["dependent_outputs"] == ["9"]
    assert results["bad_link"][0] == 400
    assert results["bad_link"][1]["node_errors"]["8"]["errors"][0]["type"] == "return_type_mismatch"
    status, body = results["unknown"]
    assert status == 400 and body["error"]["type"] == "invalid_prompt" and "3" in body["node_errors"]
    assert results["no_prompt"] == (400, {"error": {"type": "no_prompt", "message": "No prompt provided",
                                                    "details": "No prompt provided", "extra_info": {}},
                                          "node_errors": {}})
    for key in ("not_json", "not_object", "prompt_list", "inputs_not_dict"):
        status, body = results[key]
        assert status == 400 and set(body) == {"error", "node_errors"}, key
    assert results["too_large"][0] == 413
    assert queue == {"queue_running": [], "queue_pending": []}
    assert of_type(done, "execution_success")


def test_exception_in_a_prompt_is_execution_error_and_next_runs(servers):
    srv = servers.start(model="fake")

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            bad = await client.submit(txt2img(text="__raise__ please"))
            good = await client.submit(txt2img(steps=2))
            bad_messages = await client.wait_done(bad["prompt_id"])
            good_messages = await client.wait_done(good["prompt_id"])
            history = await client.history(bad["prompt_id"])
            await client.close()
            return bad_messages, good_messages, history

    bad_messages, good_messages, history = run(main())
    (error,) = of_type(bad_messages, "execution_error")
    assert error["node_id"] == "6" and error["node_type"] == "CLIPTextEncode"
    assert error["exception_type"] == "RuntimeError" and "__raise__" in error["exception_message"]
    assert isinstance(error["traceback"], list) and error["current_inputs"]["text"] == ["__raise__ please"]
    assert set(error["executed"]) == {"4"}
    assert not of_type(bad_messages, "execution_success")
    assert history["status"]["status_str"] == "error" and history["outputs"] == {}
    assert of_type(good_messages, "execution_success")


def test_restart_keeps_history_and_runs_the_pending_prompts_again(servers):
    srv = servers.start(model="fake", delay=0.02)

    async def first_life():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            done = await client.submit(txt2img(steps=2))
            await client.wait_done(done["prompt_id"])
            pending = await client.submit(txt2img(steps=300, seed=9))
            queued = await client.submit(txt2img(steps=2, seed=10))
            await client.close()
            return done, pending, queued, client.client_id

    done, pending, queued, client_id = run(first_life())
    servers.stop_all()  # a clean stop: the running prompt is interrupted, the queued one kept on disk
    srv2 = servers.start(model="fake")

    async def second_life():
        async with aiohttp.ClientSession() as session:
            client = Client(session, srv2.url, client_id)   # the same client reconnects
            await client.connect()
            await client.wait_done(queued["prompt_id"])
            history = await client.get_json("/history")
            queue = await client.get_json("/queue")
            png = await client.view(history[done["prompt_id"]]["outputs"]["9"]["images"][0])
            again = await client.submit(txt2img(steps=2, seed=11))
            await client.wait_done(again["prompt_id"])
            after = await client.get_json("/history")
            await client.close()
            return history, queue, png, after, again

    history, queue, png, after, again = run(second_life())
    assert queue == {"queue_running": [], "queue_pending": []}
    assert history[done["prompt_id"]]["status"]["status_str"] == "success"
    assert history[pending["prompt_id"]]["status"]["messages"][-1][0] == "execution_interrupted"
    assert history[queued["prompt_id"]]["status"]["status_str"] == "success"   # queued before the stop, run after
    assert history[queued["prompt_id"]]["prompt"][1] == queued["prompt_id"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(after)[-1] == again["prompt_id"] and len(after) == 4

def test_info_endpoints_metrics_and_origin_guard(server):
    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, server.url).connect()
            answer = await client.submit(txt2img(steps=3))
            await client.wait_done(answer["prompt_id"])
            info = await client.get_json("/object_info")
            one = await client.get_json("/object_info/KSampler")
            none = await client.get_json("/object_info/NoSuchNode")
            stats = await client.get_json("/system_stats")
            prompt_info = await client.get_json("/prompt")
            checkpoints = await client.get_json("/models/checkpoints")
            metrics = await (await session.get(server.url + "/metrics")).text()
            async with session.post(server.url + "/prompt", json={"prompt": txt2img()},
                                    headers={"Origin": "http://evil.example"}) as r:
                forbidden = r.status
            async with session.get(server.url + "/queue", headers={"Origin": server.url}) as r:
                same_origin = r.status
            await client.close()
            return info, one, none, stats, prompt_info, checkpoints, metrics, forbidden, same_origin

    info, one, none, stats, prompt_info, checkpoints, metrics, forbidden, same_origin = run(main())
    assert {"KSampler", "KSamplerAdvanced", "CheckpointLoaderSimple", "SaveImage", "LoadImage"} <= set(info)
    ks = one["KSampler"]
    assert ks == info["KSampler"] and none == {}
    assert ks["input"]["required"]["seed"][0] == "INT" and ks["input"]["required"]["model"] == ["MODEL"]
    assert "euler" in ks["input"]["required"]["sampler_name"][0]
    assert ks["output"] == ["LATENT"] and ks["output_node"] is False and ks["name"] == "KSampler"
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [CKPT]
    assert stats["system"]["comfyui_version"] and stats["devices"][0]["type"] in ("cpu", "cuda")
    assert prompt_info == {"exec_info": {"queue_remaining": 0}}
    assert checkpoints == [CKPT]
    assert 'ksampler_rt_prompts_total{status="success"} 1.0' in metrics
    assert "ksampler_rt_sampling_steps_total 3.0" in metrics
    assert 'ksampler_rt_stage_seconds_count{stage="execute"} 1.0' in metrics
    assert 'ksampler_rt_node_seconds_count{class_type="KSampler"} 1.0' in metrics
    assert "ksampler_rt_steps_per_second" in metrics and "ksampler_rt_queue_pending 0.0" in metrics
    assert forbidden == 403 and same_origin == 200


def test_messages_without_client_id_follow_comfyui_routing(server):
    """No client_id: progress / executing are broadcast, add_message events are not sent."""
    async def main():
        async with aiohttp.ClientSession() as session:
            watcher = await Client(session, server.url).connect()
            async with session.post(server.url + "/prompt", json={"prompt": txt2img(steps=2)}) as r:
                prompt_id = (await r.json())["prompt_id"]
            messages = []
            for _ in range(100):
                m = await watcher.receive()
                messages.append(m)
                if m["type"] == "executing" and m["data"]["node"] == "9":
                    break
            history = {}
            for _ in range(100):
                history = await watcher.get_json(f"/history/{prompt_id}")
                if history:
                    break
                await asyncio.sleep(0.02)
            await watcher.close()
            return messages, history

    messages, history = run(main())
    kinds = {m["type"] for m in messages}
    assert {"executing", "progress"} <= kinds
    assert not kinds & {"execution_start", "execution_cached", "executed"}
    assert history and next(iter(history.values()))["status"]["status_str"] == "success"


def test_garbage_requests_never_break_the_server(server):
    bodies = [b"[]", b"5", b'{"delete": 5}', b'{"delete": [null, {"a": 1}, "x"]}', b"null", b'{"clear": "yes"}',
              b"\xff\xfe", b"", b'{"prompt": {"1": null}}', b'{"prompt": {"1": {"class_type": 5}}}',
              b'{"prompt": {"9": {"class_type": "SaveImage", "inputs": {"images": ["404", 0]}}}}',
              b'{"prompt": {}, "number": "x"}', b'{"prompt": {}, "extra_data": 3}']

    async def main():
        statuses = {}
        async with aiohttp.ClientSession() as session:
            client = await Client(session, server.url).connect()
            await client.ws.send_str("not json")
            await client.ws.send_bytes(b"\x00\x01")
            await client.ws.send_str('{"type": "feature_flags", "data": 5}')
            for path in ("/prompt", "/queue", "/history", "/interrupt", "/free"):
                for body in bodies:
                    async with session.post(server.url + path, data=body) as r:
                        statuses.setdefault(r.status, []).append((path, body))
            for path in ("/history?max_items=x", "/history/%2E%2E", "/view?filename=", "/object_info/..",
                         "/models/../../etc"):
                async with session.get(server.url + path) as r:
                    statuses.setdefault(r.status, []).append((path, b""))
            answer = await client.submit(txt2img(steps=2))
            done = await client.wait_done(answer["prompt_id"])
            await client.close()
            return statuses, done

    statuses, done = run(main())
    assert set(statuses) <= {200, 400, 404}, {k: v for k, v in statuses.items() if k not in (200, 400, 404)}
    assert of_type(done, "execution_success")
