"""The prompt queue of the server (lives on the event loop; only the loop touches it).

Ordered like ComfyUI's: by ``number`` (a counter, negated for ``front``, or the client's own
``number``), ties in arrival order, so plain submissions run FIFO. Bounded: ``put`` raises
:class:`QueueFull` past ``max_pending`` waiting prompts.

Several prompts may be running at once (the server keeps up to ``Worker.concurrency`` in flight):
``get`` moves the next pending prompt to the running set, ``done(item)`` removes it. Running prompts
are listed in the order they started, as ComfyUI's ``currently_running``.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable


class QueueFull(Exception):
    pass


@dataclass(order=True)
class QueueItem:
    number: float
    seq: int
    prompt_id: str = field(compare=False)
    prompt: dict = field(compare=False)
    extra_data: dict = field(compare=False)
    outputs: list = field(compare=False)
    submitted: float = field(compare=False, default_factory=time.perf_counter)

    def as_comfy(self) -> list:
        """ComfyUI's queue / history item: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
        number = int(self.number) if float(self.number).is_integer() else self.number
        return [number, self.prompt_id, self.prompt, self.extra_data, list(self.outputs)]


class PromptQueue:
    def __init__(self, max_pending: int = 100, on_change: Callable[[], None] | None = None, journal=None):
        self.max_pending = max_pending
        self.journal = journal   # a durable_queue.QueueJournal (or None): every change is logged to disk
        self.on_change = on_change or (lambda: None)
        self._heap: list[QueueItem] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._running: dict[str, QueueItem] = {}   # prompt id -> item, in start order

    def next_seq(self) -> int:
        return next(self._seq)

    def put(self, item: QueueItem) -> None:
        if len(self._heap) >= self.max_pending:
            raise QueueFull(f"the queue holds {len(self._heap)} prompts, the most it takes (--max-queue "
                            f"{self.max_pending}); retry when it drains")
        heapq.heappush(self._heap, item)
        if self.journal is not None:
            self.journal.put(item)
        self._wake.set()
        self.on_change()

    async def get(self) -> QueueItem:
        """The next pending prompt (waiting for one), now counted as running."""
        while not self._heap:
            self._wake.clear()
            await self._wake.wait()
        item = heapq.heappop(self._heap)
        self._running[item.prompt_id] = item
        if self.journal is not None:
            self.journal.start(item.prompt_id)
        self.on_change()
        return item

    def done(self, item: QueueItem | str | None = None) -> None:
        """A running prompt (an item or its id) finished; None: the one started first."""
        if item is None:
            if not self._running:
                return
            item = next(iter(self._running))
        prompt_id = item if isinstance(item, str) else item.prompt_id
        if prompt_id not in self._running or (isinstance(item, QueueItem) and self._running[prompt_id] is not item):
            return  # finished already (done is idempotent)
        del self._running[prompt_id]
        if self.journal is not None:
            self.journal.done(prompt_id)
        self.on_change()

    @property
    def running(self) -> list[QueueItem]:
        """The running prompts, in the order they started."""
        return list(self._running.values())

    def is_running(self, prompt_id: str) -> bool:
        return prompt_id in self._running

    def pending(self) -> list[QueueItem]:
        return sorted(self._heap)

    def remaining(self) -> int:
        return len(self._heap) + len(self._running)

    def contains(self, prompt_id: str) -> bool:
        return prompt_id in self._running or any(item.prompt_id == prompt_id for item in self._heap)

    def wipe(self, keep_on_disk: bool = False) -> None:
        """Drop the pending prompts (``keep_on_disk``: from memory only -- a stopping server keeps them for its
        next start)."""
        self._heap.clear()
        if self.journal is not None and not keep_on_disk:
            self.journal.clear_pending()
        self.on_change()

    def delete(self, prompt_id: str) -> bool:
        for i, item in enumerate(self._heap):
            if item.prompt_id == prompt_id:
                self._heap.pop(i)
                heapq.heapify(self._heap)
                if self.journal is not None:
                    self.journal.delete(prompt_id)
                self.on_change()
                return True
        return False

    def __len__(self) -> int:
        return len(self._heap)
