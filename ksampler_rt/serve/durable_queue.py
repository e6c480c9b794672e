"""The prompt queue on disk, so that neither a crash nor a restart loses it.

``queue.jsonl`` in the state folder is an append-only log of the queue's changes: ``put`` (a whole
queue item), ``start``, ``done``, ``delete`` and ``clear`` (the pending prompts). Replaying it gives
the prompts still pending and those that were running when the process ended. On the next start the
server queues the pending ones again, in their order and with their ids, and records each running
one as failed in the history (the process died under it: ``kill -9``, out of memory, power loss).
A clean stop leaves the pending prompts in the log too. The log is rewritten (atomically) when it
holds many more lines than live prompts; a torn or unreadable line is skipped, never the file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from . import jsonl
from .prompt_queue import QueueItem

log = logging.getLogger("ksampler_rt.serve")


def _item_record(item: QueueItem) -> dict:
    return {"number": item.number, "prompt_id": item.prompt_id, "prompt": item.prompt,
            "extra_data": item.extra_data, "outputs": list(item.outputs)}


class QueueJournal:
    def __init__(self, state_dir: str | os.PathLike | None):
        self.path = Path(state_dir) / "queue.jsonl" if state_dir is not None else None
        self._lines = 0
        self._live: dict[str, dict] = {}      # prompt id -> item record (pending or running)
        self._running: set[str] = set()
        self.warnings: list[str] = []

    # -- recovery -----------------------------------------------------------------------------------------
    def recover(self) -> tuple[list[dict], list[dict]]:
        """(pending item records in queue order, item records that were running) from the log."""
        self._live.clear()
        self._running.clear()
        if self.path is None or not self.path.is_file():
            return [], []
        jsonl.replay(self.path, self._apply, self.warnings)
        running = [self._live[i] for i in self._running if i in self._live]
        pending = sorted((r for i, r in self._live.items() if i not in self._running),
                         key=lambda r: float(r["number"]))
        return pending, running

    def _apply(self, record: dict) -> None:
        op = record["op"]
        if op == "put":
            item = record["item"]
            if not (isinstance(item, dict) and isinstance(item.get("prompt_id"), str)
                    and isinstance(item.get("prompt"), dict) and isinstance(item.get("extra_data"), dict)):
                raise ValueError("not a queue item")
            float(item["number"])
            self._live[item["prompt_id"]] = item
        elif op == "start":
            self._running.add(str(record["prompt_id"]))
        elif op in ("done", "delete"):
            self._live.pop(str(record["prompt_id"]), None)
            self._running.discard(str(record["prompt_id"]))
        elif op == "clear":
            for prompt_id in [i for i in self._live if i not in self._running]:
                del self._live[prompt_id]

    # -- changes ------------------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        self._apply(record)
        if self.path is None:
            return
        try:
            jsonl.append(self.path, record)
            self._lines += 1
            if self._lines > 2 * len(self._live) + 64:
                self.compact()
        except OSError as exc:  # a full disk must not stop the queue; the prompt still runs
            log.warning("queue journal: cannot write %s (%s)", self.path, exc)

    def put(self, item: QueueItem) -> None:
        self._append({"op": "put", "item": _item_record(item)})

    def start(self, prompt_id: str) -> None:
        self._append({"op": "start", "prompt_id": prompt_id})

    def done(self, prompt_id: str) -> None:
        self._append({"op": "done", "prompt_id": prompt_id})

    def delete(self, prompt_id: str) -> None:
        self._append({"op": "delete", "prompt_id": prompt_id})

    def clear_pending(self) -> None:
        self._append({"op": "clear"})

    def compact(self) -> None:
        """Rewrite the log as the live prompts only (atomically)."""
        if self.path is None:
            return
        self._lines = jsonl.rewrite(self.path, self._live_records())

    def _live_records(self):
        for prompt_id, item in self._live.items():
            yield {"op": "put", "item": item}
            if prompt_id in self._running:
                yield {"op": "start", "prompt_id": prompt_id}
