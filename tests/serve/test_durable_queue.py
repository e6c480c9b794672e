"""The queue survives ``kill -9``: pending prompts run again at the next start, the one that was running is
recorded as failed with a reason (history and WebSocket); the history file survives bad bytes."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap

import aiohttp

from ksampler_rt.serve.history import History
from serve_helpers import Client, of_type, run, txt2img

SERVER = textwrap.dedent("""
    import asyncio, sys
    from ksampler_rt.serve.server import PromptServer, ServerConfig
    from ksampler_rt.serve.testing import fake_pipeline
    out, inp, tmp = sys.argv[1:4]
    pipe = fake_pipeline(("tiny-sd15",), delay=0.05, output_dir=out, input_dir=inp, temp_dir=tmp)
    async def main():
        server = PromptServer(ServerConfig(port=0), pipeline=pipe)
        port = await server.start()
        print(f"http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")


def test_kill_9_keeps_the_queue_and_reports_the_lost_prompt(servers, tmp_path):
    dirs = servers.dirs()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, dirs["output_dir"], dirs["input_dir"], dirs["temp_dir"]],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)

        async def first_life():
            async with aiohttp.ClientSession() as session:
                client = await Client(session, url, "client-1").connect()
                lost = await client.submit(txt2img(steps=2000, seed=1))
                pending = [await client.submit(txt2img(steps=2, seed=s)) for s in (2, 3)]
                while True:   # the long prompt is running
                    queue = await client.get_json("/queue")
                    if queue["queue_running"] and queue["queue_running"][0][1] == lost["prompt_id"]:
                        break
                    await asyncio.sleep(0.05)
                await client.close()
                return lost, pending
        lost, pending = run(first_life())
    finally:
        proc.kill()   # SIGKILL: nothing runs on the way out
        proc.wait(10)
        proc.stdout.close()

    srv = servers.start(model="fake")

    async def second_life():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url, "client-1").connect()   # the same client reconnects
            messages = await client.wait_done(lost["prompt_id"])
            for done in pending:
                messages += await client.wait_done(done["prompt_id"])
            history = await client.get_json("/history")
            await client.close()
            return messages, history

    messages, history = run(second_life(), timeout=60)
    errors = of_type(messages, "execution_error")
    assert errors and errors[0]["prompt_id"] == lost["prompt_id"]
    assert "server process ended while this prompt was running" in errors[0]["exception_message"]
    entry = history[lost["prompt_id"]]
    assert entry["status"]["status_str"] == "error" and entry["status"]["messages"][-1][0] == "execution_error"
    for done in pending:   # queued before the kill, run after it, in their order, under their ids
        assert history[done["prompt_id"]]["status"]["status_str"] == "success"
    order = [pid for pid in history if pid in {p["prompt_id"] for p in pending}]
    assert order == [p["prompt_id"] for p in pending]


def test_history_skips_bad_lines_and_non_dict_entries(tmp_path):
    good = {"op": "add", "prompt_id": "a", "entry": {"prompt": [0, "a", {}, {}, []], "outputs": {},
                                                      "status": {"status_str": "success"}}}
    lines = [json.dumps(good).encode(), b"\xff\xfe not utf-8 \x80", json.dumps({"op": "add", "prompt_id": "b",
                                                                                "entry": [1, 2]}).encode(),
             b"[1, 2, 3]", json.dumps({**good, "prompt_id": "c"}).encode(), b"{torn"]
    (tmp_path / "history.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    history = History(tmp_path)
    assert list(history.get()) == ["a", "c"]
    assert len(history.load_warnings) == 4
    assert not (tmp_path / "history.jsonl.corrupt").exists()


def test_queue_journal_survives_a_torn_line_and_compacts_to_the_same_queue(tmp_path):
    """The queue log (serve/jsonl.py, shared with the history): a torn last line is skipped with a warning and
    the next record starts a new line; a compaction keeps exactly the live prompts, the running one running."""
    from ksampler_rt.serve.durable_queue import QueueJournal
    from ksampler_rt.serve.prompt_queue import QueueItem

    def item(i):
        return QueueItem(float(i), i, f"p{i}", {"1": {"class_type": "X", "inputs": {}}}, {"client_id": "c"}, ["1"])

    journal = QueueJournal(tmp_path)
    for i in range(3):
        journal.put(item(i))
    journal.start("p0")
    with open(tmp_path / "queue.jsonl", "ab") as f:
        f.write(b'{"op": "put", "item": {"numb')  # killed mid-write
    again = QueueJournal(tmp_path)
    pending, running = again.recover()
    assert [r["prompt_id"] for r in pending] == ["p1", "p2"] and [r["prompt_id"] for r in running] == ["p0"]
    assert again.warnings == ["queue.jsonl:5: skipped an unreadable line"]
    again.put(item(3))  # after the torn line: on a line of its own
    assert (tmp_path / "queue.jsonl").read_bytes().splitlines()[-1].startswith(b'{"op":"put"')
    for i in range(4, 80):  # enough lines to trigger compaction (more than 2 x live + 64)
        again.put(item(i))
        again.done(f"p{i}")
    third = QueueJournal(tmp_path)
    pending, running = third.recover()
    assert third.warnings == [] and len((tmp_path / "queue.jsonl").read_bytes().splitlines()) < 80
    assert [r["prompt_id"] for r in pending] == ["p1", "p2", "p3"] and [r["prompt_id"] for r in running] == ["p0"]
