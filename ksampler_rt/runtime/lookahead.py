"""One generic look-ahead worker: a daemon thread computing numbered items ahead of a consumer.

Both noise prefetchers of :mod:`.noise_sources` use it: the default noise stream (item i = the
i-th ``randn`` draw) and the Brownian tree's planned increments (item i = the i-th planned query).
The worker computes ``compute(0), compute(1), ...`` in order, at most ``ahead`` items past the
consumer's position (``first_ahead`` before the consumer's first take), while the consumer waits
on something that releases the GIL (a denoiser call). Items the consumer skips are dropped, and
results never depend on timing: a consumer that gets :data:`MISS` computes the item itself.

``mark(i)``, called under the lock just before item i starts, records what the consumer needs to
undo the item (the generator state before a draw); :meth:`Lookahead.tag` reads it back.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

__all__ = ["MISS", "Lookahead"]

MISS = object()  # take(): the item is not available, compute it yourself


class Lookahead:
    """Computes ``compute(i)`` for i = 0, 1, ... (``count`` items, None = no end) in a daemon thread.

    The worker stops at the end of the plan, on :meth:`close`, and at the first exception of
    ``compute`` (kept in ``error``; the consumer's own computation raises it again where it
    matters). ``thread_init`` / ``thread_exit`` run in the thread around its work.
    """

    def __init__(self, compute: Callable[[int], object], *, count: Optional[int] = None, ahead: int = 2,
                 first_ahead: Optional[int] = None, mark: Optional[Callable[[int], object]] = None,
                 name: str = "ksrt-lookahead", thread_init: Optional[Callable[[], None]] = None,
                 thread_exit: Optional[Callable[[], None]] = None):
        if int(ahead) < 1:
            raise ValueError(f"ahead: received {ahead!r}, expected an int >= 1")
        self._compute = compute
        self._mark = mark
        self._count = count
        self._ahead = int(ahead)
        self._limit = self._ahead if first_ahead is None else max(1, int(first_ahead))
        self._init = thread_init
        self._exit = thread_exit
        self._cv = threading.Condition()
        self._ready: dict = {}      # index -> result, not yet taken
        self._tags: dict = {}       # index -> mark(index), for started items at or past the position
        self._computing = None      # index in progress
        self._position = 0          # every index below it is taken or given up
        self._closed = False
        self._stopped = False       # the worker has exited
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Lookahead":
        self.thread.start()
        return self

    @property
    def position(self) -> int:
        """The consumer's position: the lowest index not yet taken or given up."""
        return self._position

    # -- consumer side -------------------------------------------------------------------------
    def take(self, i: int, wait: bool = True):
        """Item ``i``'s result, or :data:`MISS`. Either way item i and every item below it are given
        up (the worker moves on past them).

        ``wait=True``: wait until item i is ready unless the worker cannot deliver it (closed,
        stopped, or i already given up). ``wait=False``: wait only while item i is in progress.
        """
        cv = self._cv
        with cv:
            if wait:
                while (i not in self._ready and i >= self._position and not self._closed
                       and not self._stopped):
                    cv.wait()
            else:
                while self._computing == i:
                    cv.wait()
            value = self._ready.pop(i, MISS)
            if i + 1 > self._position:
                self._position = i + 1
                self._limit = self._ahead
                for k in [k for k in self._ready if k <= i]:
                    del self._ready[k]
                # a miss keeps item i's mark: the consumer may need it to redo item i itself
                last = i if value is MISS else i + 1
                for k in [k for k in self._tags if k < last]:
                    del self._tags[k]
                cv.notify_all()
            return value

    def tag(self, i: int, fallback: Optional[Callable[[], object]] = None):
        """``mark(i)`` if item i has started, else ``fallback()`` (evaluated under the lock, so the
        worker starts no item meanwhile), else None."""
        with self._cv:
            if i in self._tags:
                return self._tags[i]
            return fallback() if fallback is not None else None

    def close(self, join: bool = True) -> None:
        """Stop the worker and drop the results not taken (the marks stay); with ``join``, wait
        for the item in progress to finish. Idempotent."""
        with self._cv:
            self._closed = True
            self._ready.clear()
            self._cv.notify_all()
        t = self.thread
        if join and t.ident is not None and t is not threading.current_thread():
            t.join()

    # -- worker side ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self._init is not None:
            self._init()
        try:
            self._loop()
        finally:
            with self._cv:
                self._stopped = True
                self._cv.notify_all()
            if self._exit is not None:
                self._exit()

    def _loop(self) -> None:
        cv = self._cv
        i = 0
        while True:
            with cv:
                while not self._closed and not self._done(i) and i >= self._position + self._limit:
                    cv.wait()
                i = max(i, self._position)
                if self._closed or self._done(i):
                    return
                if self._mark is not None:
                    self._tags[i] = self._mark(i)
                self._computing = i
            try:
                value = self._compute(i)
            except BaseException as e:  # the consumer's own computation raises it again
                with cv:
                    self._computing = None
                    self.error = e
                    cv.notify_all()
                return
            with cv:
                self._computing = None
                if not self._closed and i >= self._position:
                    self._ready[i] = value
                cv.notify_all()
            i += 1

    def _done(self, i: int) -> bool:
        return self._count is not None and i >= self._count
