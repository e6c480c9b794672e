"""History of finished prompts, as ComfyUI's ``/history`` serves it, persisted across restarts.

On disk it is an append-only JSON-lines log (``history.jsonl`` in the state folder): one
``{"op": "add", "prompt_id", "entry"}`` line per finished prompt, ``{"op": "delete", ...}`` and
``{"op": "clear"}`` lines for removals. Loading replays the log; the log is compacted (rewritten
atomically) when it holds many more lines than live entries. A torn last line (a crash mid-write)
is skipped, and so is any line that is not UTF-8 JSON or whose entry is not an object (the others load);
a file that cannot be read at all is moved aside and history starts empty.
"""
from __future__ import annotations

import copy
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

from . import jsonl

MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class History:
    def __init__(self, state_dir: str | os.PathLike | None, max_items: int = MAXIMUM_HISTORY_SIZE):
        self.max_items = max(1, int(max_items))
        self.path = Path(state_dir) / "history.jsonl" if state_dir is not None else None
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self._lines = 0
        self._lock = threading.RLock()
        self.load_warnings: list[str] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load()

    # -- persistence ------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            self._lines = jsonl.replay(self.path, self._apply, self.load_warnings)
        except OSError as exc:
            aside = self.path.with_suffix(".jsonl.corrupt")
            os.replace(self.path, aside)
            self.load_warnings.append(f"{self.path.name}: unreadable ({exc.strerror}); moved to {aside.name}, "
                                      "history starts empty")
            self._entries.clear()
            self._lines = 0
            return
        self._compact_if_needed()

    def _apply(self, record: dict) -> None:
        op = record.get("op")   # a record that is not an object raises AttributeError: skipped
        if op == "add":
            if not isinstance(record["entry"], dict):
                raise TypeError("a history entry must be an object")
            prompt_id = str(record["prompt_id"])
            self._entries.pop(prompt_id, None)
            self._entries[prompt_id] = record["entry"]
            while len(self._entries) > self.max_items:
                self._entries.popitem(last=False)
        elif op == "delete":
            self._entries.pop(str(record["prompt_id"]), None)
        elif op == "clear":
            self._entries.clear()

    def _append(self, record: dict) -> None:
        if self.path is None:
            return
        jsonl.append(self.path, record)
        self._lines += 1
        self._compact_if_needed()

    def _compact_if_needed(self) -> None:
        if self.path is None or self._lines <= 2 * len(self._entries) + 64:
            return
        self._lines = jsonl.rewrite(self.path, ({"op": "add", "prompt_id": prompt_id, "entry": entry}
                                                for prompt_id, entry in self._entries.items()))

    # -- ComfyUI's PromptQueue history API --------------------------------------------------------------
    def add(self, prompt_id: str, entry: dict) -> None:
        """Store a finished prompt (``entry``: prompt, outputs, status, meta) and persist it."""
        entry = json.loads(json.dumps(entry, default=str))  # a JSON-clean private copy
        prompt = entry.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 3 and isinstance(prompt[3], dict):
            for key in SENSITIVE_EXTRA_DATA_KEYS:
                prompt[3].pop(key, None)
        record = {"op": "add", "prompt_id": str(prompt_id), "entry": entry}
        with self._lock:
            self._apply(record)
            self._append(record)

    def get(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        with self._lock:
            if prompt_id is not None:
                entry = self._entries.get(prompt_id)
                return {} if entry is None else {prompt_id: copy.deepcopy(entry)}
            out = {}
            if offset < 0 and max_items is not None:
                offset = len(self._entries) - max_items
            for i, (key, entry) in enumerate(self._entries.items()):
                if i >= offset:
                    out[key] = copy.deepcopy(entry)
                    if max_items is not None and len(out) >= max_items:
                        break
            return out

    def delete(self, prompt_id: str) -> None:
        with self._lock:
            if prompt_id in self._entries:
                record = {"op": "delete", "prompt_id": str(prompt_id)}
                self._apply(record)
                self._append(record)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._append({"op": "clear"})

    def __contains__(self, prompt_id) -> bool:
        return prompt_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)
