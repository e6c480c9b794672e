"""Several prompts in flight: a worker with ``concurrency`` 2 behind the real server.

The fake worker reports progress every few milliseconds until the test releases the prompt (or it is
interrupted), so a test decides exactly which prompts are running when it looks at /queue.
"""
from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
from serve_helpers import Client, of_type, run, txt2img

from ksampler_rt.serve.prompt_queue import PromptQueue, QueueItem
from ksampler_rt.serve.worker import PromptInterrupted, RunResult


class GateWorker:
    """A Worker of ``concurrency`` N: a prompt runs (one ``progress`` per 10 ms on node 3) until
    ``release(prompt_id)``, ``auto_steps`` steps, or its interrupt flag."""

    def __init__(self, concurrency: int = 2, auto_steps: int | None = None):
        self.concurrency = concurrency
        self.auto_steps = auto_steps
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.active = 0
        self.max_active = 0
        self.gates: dict[str, threading.Event] = {}

    def gate(self, prompt_id: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(prompt_id, threading.Event())

    def release(self, prompt_id: str) -> None:
        self.gate(prompt_id).set()

    def run(self, prompt_id, prompt, extra_data, on_event, is_interrupted) -> RunResult:
        gate = self.gate(prompt_id)
        with self.lock:
            self.started.append(prompt_id)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            on_event("executing", {"node": "3", "display_node": "3", "prompt_id": prompt_id})
            step = 0
            while not gate.is_set() and (self.auto_steps is None or step < self.auto_steps):
                if is_interrupted():
                    raise PromptInterrupted({"prompt_id": prompt_id, "node_id": "3", "node_type": "KSampler",
                                             "executed": []})
                step += 1
                on_event("progress", {"value": step, "max": 1000, "prompt_id": prompt_id, "node": "3"})
                time.sleep(0.01)
            output = {"images": [{"filename": f"{prompt_id}.png", "subfolder": "", "type": "output"}]}
            on_event("executed", {"node": "9", "display_node": "9", "output": output, "prompt_id": prompt_id})
            return RunResult(outputs={"9": output}, seconds=0.0)
        finally:
            with self.lock:
                self.active -= 1

    def free(self, unload_models: bool = False, free_memory: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def wait_all(client: Client, prompt_ids) -> list:
    """Messages until the final ``executing`` of every prompt in ``prompt_ids`` (any completion order)."""
    left, messages = set(prompt_ids), []
    while left:
        m = await client.receive()
        messages.append(m)
        if isinstance(m, dict) and m["type"] == "executing" and m["data"]["node"] is None:
            left.discard(m["data"]["prompt_id"])
    return messages


def _ids(entries) -> list[str]:
    return [entry[1] for entry in entries]


def test_two_prompts_run_at_once_queue_lists_both_and_interrupt_by_id(servers):
    worker = GateWorker(concurrency=2)
    srv = servers.start(worker=worker)

    async def main():
        async with aiohttp.ClientSession() as session:
            a = await Client(session, srv.url).connect()
            b = await Client(session, srv.url).connect()
            p1 = (await a.submit(txt2img(seed=1)))["prompt_id"]
            p2 = (await b.submit(txt2img(seed=2)))["prompt_id"]
            p3 = (await a.submit(txt2img(seed=3)))["prompt_id"]
            await until(lambda: len(worker.started) == 2)
            await asyncio.sleep(0.1)  # a third prompt would have started by now if the server let it
            queue = await a.get_json("/queue")
            remaining = (await a.get_json("/prompt"))["exec_info"]["queue_remaining"]
            async with session.get(srv.url + "/metrics") as r:
                metrics = await r.text()
            # A prompt that is only pending is not interrupted (ComfyUI 0.3.64: nothing happens).
            async with session.post(srv.url + "/interrupt", json={"prompt_id": p3}) as r:
                assert r.status == 200
            async with session.post(srv.url + "/interrupt", json={"prompt_id": p1}) as r:
                assert r.status == 200
            first = await a.wait_done(p1)
            await until(lambda: len(worker.started) == 3)  # p1's slot went to p3
            queue_after = await a.get_json("/queue")
            worker.release(p2)
            second = await b.wait_done(p2)
            worker.release(p3)
            third = await a.wait_done(p3)
            history = await a.get_json("/history")
            await a.close()
            await b.close()
            return (p1, p2, p3), queue, remaining, metrics, first, queue_after, second, third, history

    (p1, p2, p3), queue, remaining, metrics, first, queue_after, second, third, history = run(main(), timeout=30)
    # Both running prompts are listed, in start order, in ComfyUI's shape; the third is pending.
    assert _ids(queue["queue_running"]) == [p1, p2] and _ids(queue["queue_pending"]) == [p3]
    number, prompt_id, prompt, extra_data, outputs = queue["queue_running"][0]
    assert (number, prompt_id, outputs) == (0, p1, ["9"]) and prompt["3"]["inputs"]["seed"] == 1
    assert "client_id" in extra_data
    assert remaining == 3
    assert "ksampler_rt_queue_running 2.0" in metrics and "ksampler_rt_concurrency 2.0" in metrics
    # Interrupting p1 stopped p1 only.
    assert [d["prompt_id"] for d in of_type(first, "execution_interrupted")] == [p1]
    assert _ids(queue_after["queue_running"]) == [p2, p3] and queue_after["queue_pending"] == []
    assert of_type(second, "execution_success") and not of_type(second, "execution_interrupted")
    assert of_type(third, "execution_success")
    assert worker.started == [p1, p2, p3] and worker.max_active == 2
    # Every message a client got for a prompt is about one of its own prompts.
    for messages, own in ((first + third, {p1, p3}), (second, {p2})):
        for kind in ("execution_start", "executing", "progress", "executed", "execution_success",
                     "progress_state"):
            assert {d["prompt_id"] for d in of_type(messages, kind)} <= own, kind
    assert {d["prompt_id"] for d in of_type(second, "progress")} == {p2}
    # History and metrics agree with what happened.
    assert history[p1]["status"]["status_str"] == "error"
    assert history[p1]["status"]["messages"][-1][0] == "execution_interrupted"
    for pid in (p2, p3):
        assert history[pid]["status"]["status_str"] == "success"
        assert history[pid]["outputs"]["9"]["images"][0]["filename"] == f"{pid}.png"
    server = srv.server
    assert server.runs == {} and server.queue.running == [] and server.queue.remaining() == 0
    assert server.metrics.prompts.labels("interrupted")._value.get() == 1  # noqa: SLF001
    assert server.metrics.prompts.labels("success")._value.get() == 2  # noqa: SLF001
    assert server.metrics.queue_running._value.get() == 0  # noqa: SLF001


def test_dispatch_stays_fifo_with_two_slots(servers):
    worker = GateWorker(concurrency=2)
    srv = servers.start(worker=worker)

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            answers = [await client.submit(txt2img(seed=i)) for i in range(2)]
            await until(lambda: len(worker.started) == 2)
            answers += [await client.submit(txt2img(seed=i)) for i in range(2, 7)]
            jumper = await client.submit(txt2img(seed=99), front=True)
            pending = await client.get_json("/queue")
            for answer in answers + [jumper]:
                worker.release(answer["prompt_id"])
            await wait_all(client, [a["prompt_id"] for a in answers + [jumper]])
            queue = await client.get_json("/queue")
            await client.close()
            return answers, jumper, pending, queue

    answers, jumper, pending, queue = run(main(), timeout=30)
    ids = [a["prompt_id"] for a in answers]
    assert _ids(pending["queue_running"]) == ids[:2]
    assert _ids(pending["queue_pending"]) == [jumper["prompt_id"], *ids[2:]]
    # Started in queue order (the front prompt overtakes the pending ones), never more than 2 at once.
    assert worker.started == [*ids[:2], jumper["prompt_id"], *ids[2:]]
    assert worker.max_active == 2
    assert queue == {"queue_running": [], "queue_pending": []}


def test_interrupt_without_prompt_id_stops_every_running_prompt(servers):
    worker = GateWorker(concurrency=2)
    srv = servers.start(worker=worker)

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            p1, p2, p3 = [(await client.submit(txt2img(seed=i)))["prompt_id"] for i in range(3)]
            await until(lambda: len(worker.started) == 2)
            async with session.post(srv.url + "/interrupt") as r:
                assert r.status == 200
            done = await wait_all(client, [p1, p2])  # in either order
            worker.release(p3)  # it was pending: it runs normally
            done += await client.wait_done(p3)
            await client.close()
            return (p1, p2, p3), done

    (p1, p2, p3), done = run(main(), timeout=30)
    assert sorted(d["prompt_id"] for d in of_type(done, "execution_interrupted")) == sorted([p1, p2])
    assert [d["prompt_id"] for d in of_type(done, "execution_success")] == [p3]


def test_queue_tracks_several_running_prompts():
    async def main():
        q = PromptQueue(max_pending=10)
        for pid in ("a", "b", "c"):
            q.put(QueueItem(q.next_seq(), q.next_seq(), pid, {}, {}, ["9"]))
        _, b = await q.get(), await q.get()
        assert [i.prompt_id for i in q.running] == ["a", "b"] and q.remaining() == 3
        assert q.contains("a") and q.is_running("b") and not q.is_running("c")
        assert not q.delete("a")  # running prompts are not deleted from the queue
        q.done(b)
        q.done(b)  # idempotent
        assert [i.prompt_id for i in q.running] == ["a"] and q.remaining() == 2
        c = await q.get()
        assert [i.prompt_id for i in q.running] == ["a", "c"]
        q.done("a")
        q.done(c)
        assert q.running == [] and q.remaining() == 0 and not q.contains("c")
    asyncio.run(main())
