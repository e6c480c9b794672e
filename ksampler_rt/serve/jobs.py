"""ComfyUI's jobs API (``GET /api/jobs``, ``GET /api/jobs/{job_id}``) over the server's queue and history.

Newer ComfyUI serves one job view of a prompt wherever it is (pending, running, finished), so clients
poll one route instead of stitching ``/queue`` and ``/history`` together. The shapes follow ComfyUI
core's ``comfy_execution/jobs.py`` and its ``/api/jobs`` routes (read from ComfyUI's main branch,
late 2026; 0.3.64 has no jobs routes):

* a job: ``id``, ``status`` (``pending``, ``in_progress``, ``completed``, ``failed``, ``cancelled``),
  ``priority`` (the queue number), ``create_time`` (ms, from ``extra_data["create_time"]``),
  ``execution_start_time`` / ``execution_end_time`` (ms, from the history messages),
  ``execution_error`` (the ``execution_error`` message's data), ``outputs_count``,
  ``preview_output`` (the first saved image, else the first temp image), ``workflow_id`` (the UI
  workflow's id from ``extra_pnginfo``); keys whose value is None are left out;
* the detail view adds ``outputs``, ``execution_status`` and ``workflow`` (``prompt`` and ``extra_data``);
* the list: ``{"jobs": [...], "pagination": {"offset", "limit", "total", "has_more"}}``, filtered by
  ``status`` (comma-separated) and ``workflow_id``, sorted by ``sort_by`` (``created_at`` or
  ``execution_duration``) and ``sort_order`` (``asc`` / ``desc``, default desc).

Pure functions of ComfyUI-shaped data (queue items ``[number, prompt_id, prompt, extra_data,
outputs_to_execute]`` and history entries), so they are tested without a server.
"""
from __future__ import annotations

from typing import Mapping, Sequence

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "pending", "in_progress", "completed", "failed", "cancelled"
STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
SORT_KEYS = ("created_at", "execution_duration")
_PREVIEWABLE = ("images", "video", "audio", "3d")


def _pruned(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _meta(extra_data) -> tuple[int | None, str | None]:
    extra = extra_data if isinstance(extra_data, Mapping) else {}
    pnginfo = extra.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, Mapping) else None
    workflow_id = workflow.get("id") if isinstance(workflow, Mapping) else None
    return extra.get("create_time"), workflow_id


def job_from_queue_item(item: Sequence, status: str, *, detail: bool = False) -> dict:
    """A pending or running prompt as a job."""
    number, prompt_id, prompt, extra_data = item[0], item[1], item[2], item[3]
    create_time, workflow_id = _meta(extra_data)
    job = _pruned({"id": prompt_id, "status": status, "priority": number, "create_time": create_time,
                   "outputs_count": 0, "workflow_id": workflow_id})
    if detail:
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _outputs_summary(outputs: Mapping) -> tuple[int, dict | None]:
    count, saved, temp = 0, None, None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, Mapping):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, Mapping):
                    continue
                count += 1
                if media_type in _PREVIEWABLE:
                    entry = {**item, "nodeId": node_id, "mediaType": item.get("mediaType", media_type)}
                    if item.get("type") == "output" and saved is None:
                        saved = entry
                    elif temp is None:
                        temp = entry
    return count, saved or temp


def job_from_history(prompt_id: str, entry: Mapping, *, detail: bool = False) -> dict:
    """A finished prompt (a history entry) as a job."""
    prompt_tuple = entry.get("prompt") or [None, prompt_id, {}, {}, []]
    number, prompt, extra_data = prompt_tuple[0], prompt_tuple[2], prompt_tuple[3]
    create_time, workflow_id = _meta(extra_data)
    status_info = entry.get("status") if isinstance(entry.get("status"), Mapping) else {}
    start = end = error = None
    interrupted = False
    for message in status_info.get("messages") or ():
        if not (isinstance(message, (list, tuple)) and len(message) >= 2 and isinstance(message[1], Mapping)):
            continue
        event, data = message[0], message[1]
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = dict(data) if event == "execution_error" else error
            interrupted = interrupted or event == "execution_interrupted"
    if status_info.get("status_str") == "error":
        status = CANCELLED if interrupted else FAILED
    else:
        status = COMPLETED
    outputs = entry.get("outputs") if isinstance(entry.get("outputs"), Mapping) else {}
    count, preview = _outputs_summary(outputs)
    job = _pruned({"id": prompt_id, "status": status, "priority": number, "create_time": create_time,
                   "execution_start_time": start, "execution_end_time": end, "execution_error": error,
                   "outputs_count": count, "preview_output": preview, "workflow_id": workflow_id})
    if detail:
        job.update(outputs=outputs, execution_status=status_info,
                   workflow={"prompt": prompt, "extra_data": extra_data})
    return job


def get_job(job_id: str, running: Sequence, pending: Sequence, history: Mapping) -> dict | None:
    """The detail view of one job, wherever it is; None when the id is unknown."""
    if job_id in history:
        return job_from_history(job_id, history[job_id], detail=True)
    for items, status in ((running, IN_PROGRESS), (pending, PENDING)):
        for item in items:
            if item[1] == job_id:
                return job_from_queue_item(item, status, detail=True)
    return None


def parse_list_query(query: Mapping[str, str]) -> dict:
    """``GET /api/jobs`` query parameters -> :func:`list_jobs` keywords (ValueError on bad values)."""
    raw = query.get("status", "")
    statuses = [s.strip().lower() for s in raw.split(",") if s.strip()] or None
    bad = [s for s in statuses or () if s not in STATUSES]
    if bad:
        raise ValueError(f"status: received {raw!r}, expected a comma-separated subset of {', '.join(STATUSES)}")
    sort_by = query.get("sort_by", "created_at").lower()
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by: received {sort_by!r}, expected one of {', '.join(SORT_KEYS)}")
    sort_order = query.get("sort_order", "desc").lower()
    if sort_order not in ("asc", "desc"):
        raise ValueError(f"sort_order: received {sort_order!r}, expected 'asc' or 'desc'")
    limit = _int_param(query, "limit", None, minimum=1)
    offset = _int_param(query, "offset", 0, minimum=0)
    return {"statuses": statuses, "workflow_id": query.get("workflow_id"), "sort_by": sort_by,
            "sort_order": sort_order, "limit": limit, "offset": offset}


def _int_param(query: Mapping[str, str], name: str, default, *, minimum: int):
    if name not in query:
        return default
    try:
        value = int(query[name])
    except (TypeError, ValueError):
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}: received {query[name]!r}, expected an integer >= {minimum}")
    return value


def list_jobs(running: Sequence, pending: Sequence, history: Mapping, *, statuses=None, workflow_id=None,
              sort_by: str = "created_at", sort_order: str = "desc", limit: int | None = None,
              offset: int = 0) -> dict:
    """The ``GET /api/jobs`` body: every job (no workflow payloads), filtered, sorted and paged."""
    jobs = [job_from_queue_item(item, IN_PROGRESS) for item in running]
    jobs += [job_from_queue_item(item, PENDING) for item in pending]
    jobs += [job_from_history(pid, entry) for pid, entry in history.items() if isinstance(entry, Mapping)]
    if statuses:
        jobs = [j for j in jobs if j["status"] in statuses]
    if workflow_id is not None:
        jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]
    if sort_by == "execution_duration":
        def key(j):
            start, end = j.get("execution_start_time"), j.get("execution_end_time")
            return end - start if start and end else 0
    else:
        def key(j):
            return j.get("create_time") or 0
    jobs.sort(key=key, reverse=sort_order == "desc")
    total = len(jobs)
    page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
    return {"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": total,
                                         "has_more": offset + len(page) < total}}
