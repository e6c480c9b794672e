"""The jobs API's job view (ksampler_rt/serve/jobs.py) on hand-built ComfyUI-shaped queue and history data."""
from __future__ import annotations

import pytest

from ksampler_rt.serve import jobs

WF = {"extra_pnginfo": {"workflow": {"id": "wf-1"}}}


def _queue_item(pid, number, create_time, extra=None):
    return [number, pid, {"1": {"class_type": "X"}}, {"create_time": create_time, **(extra or {})}, ["9"]]


def _history(pid, number, create_time, status_str, events, outputs=None):
    return {"prompt": [number, pid, {"1": {}}, {"create_time": create_time, **WF}, ["9"]],
            "outputs": outputs or {},
            "status": {"status_str": status_str, "completed": status_str == "success",
                       "messages": [[e, {"prompt_id": pid, "timestamp": t, **d}] for e, t, d in events]}}


RUNNING = [_queue_item("r1", 3, 3000)]
PENDING = [_queue_item("p1", 4, 4000, WF), _queue_item("p2", 5, 5000)]
HISTORY = {
    "h-ok": _history("h-ok", 1, 1000, "success", [("execution_start", 1100, {}), ("execution_success", 1600, {})],
                     {"9": {"images": [{"filename": "t_00001_.png", "subfolder": "", "type": "temp"},
                                       {"filename": "a_00001_.png", "subfolder": "", "type": "output"}]}}),
    "h-err": _history("h-err", 2, 2000, "error",
                      [("execution_start", 2100, {}),
                       ("execution_error", 2900, {"node_id": "3", "node_type": "KSampler",
                                                  "exception_message": "boom", "exception_type": "ValueError"})]),
    "h-int": _history("h-int", 0, 500, "error", [("execution_start", 600, {}), ("execution_interrupted", 700, {})]),
}


def test_statuses_and_fields():
    body = jobs.list_jobs(RUNNING, PENDING, HISTORY)
    by_id = {j["id"]: j for j in body["jobs"]}
    assert {k: v["status"] for k, v in by_id.items()} == {
        "r1": "in_progress", "p1": "pending", "p2": "pending", "h-ok": "completed", "h-err": "failed",
        "h-int": "cancelled"}
    ok = by_id["h-ok"]
    assert (ok["execution_start_time"], ok["execution_end_time"], ok["outputs_count"]) == (1100, 1600, 2)
    assert ok["preview_output"]["filename"] == "a_00001_.png"  # a saved image wins over the temp one
    assert ok["preview_output"]["nodeId"] == "9" and ok["preview_output"]["mediaType"] == "images"
    assert ok["workflow_id"] == "wf-1" and ok["priority"] == 1
    assert by_id["h-err"]["execution_error"]["exception_message"] == "boom"
    assert "execution_error" not in ok and "workflow" not in ok  # None values pruned; no payload in lists
    assert body["pagination"] == {"offset": 0, "limit": None, "total": 6, "has_more": False}


def test_sorting_filtering_paging():
    ids = [j["id"] for j in jobs.list_jobs(RUNNING, PENDING, HISTORY)["jobs"]]
    assert ids == ["p2", "p1", "r1", "h-err", "h-ok", "h-int"]  # newest first
    q = jobs.parse_list_query({"status": "completed,failed", "sort_order": "asc"})
    assert [j["id"] for j in jobs.list_jobs(RUNNING, PENDING, HISTORY, **q)["jobs"]] == ["h-ok", "h-err"]
    q = jobs.parse_list_query({"sort_by": "execution_duration"})
    assert [j["id"] for j in jobs.list_jobs(RUNNING, PENDING, HISTORY, **q)["jobs"]][:2] == ["h-err", "h-ok"]
    page = jobs.list_jobs(RUNNING, PENDING, HISTORY, **jobs.parse_list_query({"limit": "2", "offset": "1"}))
    assert [j["id"] for j in page["jobs"]] == ["p1", "r1"]
    assert page["pagination"] == {"offset": 1, "limit": 2, "total": 6, "has_more": True}
    wf = jobs.list_jobs(RUNNING, PENDING, HISTORY, workflow_id="wf-1")["jobs"]
    assert sorted(j["id"] for j in wf) == ["h-err", "h-int", "h-ok", "p1"]


def test_detail_view():
    job = jobs.get_job("h-ok", RUNNING, PENDING, HISTORY)
    assert job["outputs"]["9"]["images"][1]["type"] == "output"
    assert job["execution_status"]["status_str"] == "success"
    assert job["workflow"]["prompt"] == {"1": {}}
    pending = jobs.get_job("p1", RUNNING, PENDING, HISTORY)
    assert pending["status"] == "pending" and pending["workflow"]["extra_data"]["create_time"] == 4000
    assert jobs.get_job("nope", RUNNING, PENDING, HISTORY) is None


@pytest.mark.parametrize("query, message", [
    ({"status": "done"}, r"status: received 'done', expected a comma-separated subset"),
    ({"sort_by": "name"}, r"sort_by: received 'name', expected one of created_at, execution_duration"),
    ({"sort_order": "up"}, r"sort_order: received 'up', expected 'asc' or 'desc'"),
    ({"limit": "0"}, r"limit: received '0', expected an integer >= 1"),
    ({"offset": "x"}, r"offset: received 'x', expected an integer >= 0"),
])
def test_bad_queries(query, message):
    with pytest.raises(ValueError, match=message):
        jobs.parse_list_query(query)


def test_jobs_routes_on_a_real_server(servers):
    """/api/jobs and /api/jobs/{id} answer from the live queue and history (a finished prompt, an unknown id,
    a bad query), as ComfyUI's newer core does."""
    import aiohttp
    from serve_helpers import Client, run, txt2img

    srv = servers.start()

    async def main():
        async with aiohttp.ClientSession() as session:
            client = await Client(session, srv.url).connect()
            answer = await client.submit(txt2img(steps=2),
                                         extra_data={"extra_pnginfo": {"workflow": {"id": "wf-9"}}})
            await client.wait_done(answer["prompt_id"])
            out = {}
            for path in (f"/api/jobs/{answer['prompt_id']}", "/api/jobs?status=completed&limit=5",
                         "/jobs/00000000-0000-4000-8000-000000000000", "/api/jobs?sort_by=name"):
                async with session.get(srv.url + path) as r:
                    out[path] = (r.status, await r.json())
            await client.close()
            return answer["prompt_id"], out

    pid, out = run(main())
    status, job = out[f"/api/jobs/{pid}"]
    assert status == 200 and job["id"] == pid and job["status"] == "completed"
    assert job["workflow_id"] == "wf-9" and job["outputs_count"] == 1 and isinstance(job["create_time"], int)
    assert job["preview_output"]["filename"].endswith(".png") and job["outputs"]["9"]["images"]
    assert job["execution_end_time"] >= job["execution_start_time"]
    status, listing = out["/api/jobs?status=completed&limit=5"]
    assert status == 200 and [j["id"] for j in listing["jobs"]] == [pid] and "workflow" not in listing["jobs"][0]
    assert listing["pagination"] == {"offset": 0, "limit": 5, "total": 1, "has_more": False}
    assert out["/jobs/00000000-0000-4000-8000-000000000000"] == (404, {"error": "Job not found"})
    status, body = out["/api/jobs?sort_by=name"]
    assert status == 400 and "sort_by: received 'name'" in json_text(body)


def json_text(body) -> str:
    import json
    return json.dumps(body)
