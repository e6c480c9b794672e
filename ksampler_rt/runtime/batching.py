"""Step-level batching of the UNet calls of concurrent sampling runs (issue 24).

Every prompt keeps its own thread and its own k-diffusion style sampler; they meet at a gather point,
:class:`BatchingUNet`, a drop-in for the UNet callable that :class:`~ksampler_rt.runtime.model.Model`
calls (``unet(x, timestep, context, **kwargs)``). Calls that arrive together and are *compatible* --
same wrapped callable (so the same loaded weights and LoRA state), same row shape of ``x``
(channels x height x width) and dtype, same context length and width, same keyword arguments with the
same trailing shapes -- are stacked along the batch axis (all their cond and uncond rows) up to
``max_batch`` rows, evaluated by one engine call and split back; incompatible calls never share one.

Scheduling (no timer thread, no polling of idle runs):

* One engine call is in flight at a time per wrapped UNet (a GPU runs one at a time anyway, and the
  sessions of some backends must not be entered from two threads at once). Calls that arrive while it
  runs gather and leave together as the next call.
* A call waits for partners only while another *active* run (a thread that called in the last
  ``active_window_s``, and is not waiting in an incompatible group) is expected, and at most
  ``batch_wait_ms``. A lone run therefore calls the engine straight away, on its own thread.
* With ``engine_thread=True`` every engine call runs on one thread owned by the wrapper (ONNX Runtime's
  CUDA-graph sessions must be replayed from the thread that captured them; TensorRT execution contexts
  are not to be shared between threads). Otherwise the calling thread that assembled the batch runs it.
* Interruption: a run declares ``run_scope(is_interrupted)``; its pending call is withdrawn (raising
  :class:`Withdrawn`, an interruption, in its own thread) instead of entering the next engine call, and
  an interrupted run simply stops submitting.
* Failure: a failing batched call is retried one submission at a time, so only the prompts whose own
  call fails see an error (each its own exception object). If every one of those solo calls succeeds, the
  batch itself was the problem (e.g. more rows than the engine's batch profile): the wrapper lowers its
  row limit to what worked and says so through ``log``.

Results: the rows of a prompt are computed by the same engine in a larger batch. Whether that is
bit-identical to its solo call depends on the backend's kernels (see docs/server.md for ORT CPU and
OpenVINO measurements); noise, seeds and sampler state are per run and untouched.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

DEFAULT_BATCH_WAIT_MS = 2.0   # bounded extra latency per step while partners are expected


class Withdrawn(Exception):
    """A run's pending UNet call left the batch because the run was interrupted."""


@dataclass
class RunStats:
    """What the gather point recorded for one run (a prompt): the engine calls it *led* as
    ``(rows, submissions)`` (each engine call is recorded by exactly one run) and the seconds its calls
    waited for partners."""

    engine_calls: list[tuple[int, int]] = field(default_factory=list)
    wait_s: float = 0.0
    calls: int = 0
    partner_waits: int = 0   # calls that held back for expected partners while the engine was free


class _Scope:
    __slots__ = ("is_interrupted", "stats", "batchers")

    def __init__(self, is_interrupted: Callable[[], bool], stats: RunStats):
        self.is_interrupted = is_interrupted
        self.stats = stats
        self.batchers: set = set()   # gather points this run called: it leaves them when it ends


_local = threading.local()


@contextmanager
def run_scope(is_interrupted: Callable[[], bool] = lambda: False) -> Iterator[RunStats]:
    """Mark the current thread as one sampling run: its pending UNet calls are withdrawn once
    ``is_interrupted()`` is true, and the returned :class:`RunStats` collects its batching figures."""
    previous = getattr(_local, "scope", None)
    scope = _Scope(is_interrupted, RunStats())
    _local.scope = scope
    try:
        yield scope.stats
    finally:
        _local.scope = previous
        for batcher in scope.batchers:
            batcher._leave(threading.get_ident())  # noqa: SLF001 -- partners stop expecting this run


def current_stats() -> RunStats | None:
    scope = getattr(_local, "scope", None)
    return None if scope is None else scope.stats


def _signature(value: Any):
    """The part of an argument that must match for two calls to be stacked."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return ("array", value.shape[1:], value.dtype.str)
    if isinstance(value, (bool, int, float, str)):
        return ("value", value)
    return ("object", id(value))


class _Submission:
    __slots__ = ("x", "timestep", "context", "kwargs", "rows", "key", "thread", "scope", "t0", "started",
                 "done", "result", "error")

    def __init__(self, x, timestep, context, kwargs, scope):
        self.x, self.timestep, self.context, self.kwargs = x, timestep, context, kwargs
        self.rows = int(x.shape[0]) if x.ndim else 1
        self.key = (_signature(x), _signature(context),
                    tuple(sorted((k, _signature(v)) for k, v in kwargs.items())))
        self.thread = threading.get_ident()
        self.scope = scope
        self.t0 = time.perf_counter()
        self.started = 0.0
        self.done = False
        self.result = None
        self.error: BaseException | None = None


class BatchingUNet:
    """Gather point for the UNet calls of concurrent runs; see the module docstring.

    ``max_batch``: most rows of one engine call (the engine's maximum batch; 1 disables merging).
    ``batch_wait_ms``: longest wait for expected partners. ``engine_thread``: run every engine call on
    one thread of the wrapper. ``on_call(rows, submissions, seconds)``: called after each engine call.
    """

    def __init__(self, unet: Callable, *, max_batch: int = 8, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                 engine_thread: bool = False, active_window_s: float = 0.25,
                 on_call: Callable[[int, int, float], None] | None = None,
                 log: Callable[[str], None] | None = None):
        if not callable(unet):
            raise TypeError(f"unet: received {type(unet).__name__}, expected a callable unet(x, timestep, context)")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: received {max_batch!r}, expected a positive integer")
        if not (isinstance(batch_wait_ms, (int, float)) and 0 <= batch_wait_ms <= 10_000):
            raise ValueError(f"batch_wait_ms: received {batch_wait_ms!r}, expected a number of milliseconds in "
                             "[0, 10000]")
        self.inner = unet
        self.max_batch = max_batch
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.active_window_s = float(active_window_s)
        self.on_call = on_call
        self.log = log
        self._cond = threading.Condition()
        self._pending: list[_Submission] = []
        self._busy = False
        self._free_since = 0.0                        # when the last engine call ended
        self._last_seen: dict[int, float] = {}        # thread -> last time it submitted or got a result
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ksampler-rt-unet") if engine_thread else None

    # -- the UNet interface ------------------------------------------------------------------------------
    def __call__(self, x, timestep, context=None, **kwargs) -> np.ndarray:
        sub = _Submission(np.asarray(x), timestep, context, kwargs, getattr(_local, "scope", None))
        if sub.scope is not None:
            sub.scope.stats.calls += 1
            sub.scope.batchers.add(self)
        waited = False
        with self._cond:
            self._last_seen[sub.thread] = sub.t0
            self._pending.append(sub)
            try:
                while not sub.done:
                    if not self._busy:
                        batch = self._select(time.perf_counter())
                        if batch is not None:
                            self._run(batch)
                            continue
                        if not waited and sub.scope is not None:
                            sub.scope.stats.partner_waits += 1
                        waited = True
                    self._cond.wait(self._wait_timeout(time.perf_counter()))
            finally:
                if not sub.done:  # e.g. KeyboardInterrupt while waiting: never leave a stale submission behind
                    self._pending = [s for s in self._pending if s is not sub]
            self._last_seen[sub.thread] = time.perf_counter()
        if sub.error is not None:
            raise sub.error
        return sub.result

    def __getattr__(self, name: str):  # engines expose release(), names, ... through the callable
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def join(self) -> None:
        """Announce the calling thread's run as a partner before its first call: calls of other runs wait
        for it (at most ``batch_wait_ms``) until it submits, leaves its run scope or stays idle for
        ``active_window_s``."""
        scope = getattr(_local, "scope", None)
        if scope is not None:
            scope.batchers.add(self)
        with self._cond:
            self._last_seen[threading.get_ident()] = time.perf_counter()

    def withdraw(self, thread_id: int | None = None) -> int:
        """Withdraw the pending (not yet running) calls of a thread (default: all threads whose run scope
        says interrupted); they raise :class:`Withdrawn`. Returns how many were withdrawn."""
        with self._cond:
            keep, gone = [], []
            for s in self._pending:
                hit = s.thread == thread_id if thread_id is not None else _interrupted(s)
                (gone if hit else keep).append(s)
            self._pending = keep
            for s in gone:
                _fail(s, Withdrawn("interrupted: this run's UNet call was withdrawn from the batch"))
                self._last_seen.pop(s.thread, None)
            if gone:
                self._cond.notify_all()
            return len(gone)

    def _leave(self, thread_id: int) -> None:
        with self._cond:
            self._last_seen.pop(thread_id, None)
            self._cond.notify_all()   # a call waiting for this run stops waiting

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"BatchingUNet(max_batch={self.max_batch}, batch_wait_ms={self.batch_wait_s * 1000:g}, {self.inner!r})"

    # -- scheduling (called with the condition held) -------------------------------------------------------
    def _expected_partners(self, now: float) -> int:
        """Active runs with no call pending: they may submit a compatible call soon."""
        pending_threads = {s.thread for s in self._pending}
        stale = [t for t, seen in self._last_seen.items() if now - seen > self.active_window_s]
        for t in stale:
            if t not in pending_threads:
                del self._last_seen[t]
        return sum(1 for t in self._last_seen if t not in pending_threads)

    def _select(self, now: float) -> list[_Submission] | None:
        """The next engine call (the oldest pending submission and compatible ones, up to ``max_batch``
        rows), or None while it should still wait for partners."""
        self._withdraw_interrupted()
        if not self._pending:
            return None
        head = self._pending[0]
        group = [s for s in self._pending if s.key == head.key]
        rows = 0
        batch = []
        for s in group:
            if batch and rows + s.rows > self.max_batch:
                break
            batch.append(s)
            rows += s.rows
        full = self.max_batch <= 1 or rows >= self.max_batch or len(batch) < len(group)
        # the wait counts from when the engine became free: calls that gathered during the previous call
        # still give the runs of that call the chance to join (otherwise two cohorts would alternate forever)
        if not full and now < self._deadline() and self._expected_partners(now) > 0:
            return None
        taken = {id(s) for s in batch}
        self._pending = [s for s in self._pending if id(s) not in taken]
        return batch

    def _withdraw_interrupted(self) -> int:
        gone = [s for s in self._pending if _interrupted(s)]
        if not gone:
            return 0
        ids = {id(s) for s in gone}
        self._pending = [s for s in self._pending if id(s) not in ids]
        for s in gone:
            _fail(s, Withdrawn("interrupted: this run's UNet call was withdrawn from the batch"))
            self._last_seen.pop(s.thread, None)
        self._cond.notify_all()
        return len(gone)

    def _deadline(self) -> float:
        return max(self._pending[0].t0, self._free_since) + self.batch_wait_s

    def _wait_timeout(self, now: float) -> float:
        if self._busy or not self._pending:
            return 0.05   # woken by notify; the timeout only bounds how late an interrupt is noticed
        return max(1e-4, min(0.05, self._deadline() - now))

    def _run(self, batch: list[_Submission]) -> None:
        """Evaluate ``batch`` with the condition released, then hand out the results."""
        self._busy = True
        started = time.perf_counter()
        for s in batch:
            s.started = started
        self._cond.release()
        try:
            if self._executor is not None:
                outcome = self._executor.submit(self._evaluate, batch).result()
            else:
                outcome = self._evaluate(batch)
        except BaseException as exc:  # noqa: BLE001 -- e.g. the engine thread is gone: every caller hears it
            outcome = [(None, exc) for _ in batch]
        finally:
            self._cond.acquire()
            self._busy = False
            self._free_since = time.perf_counter()
        seconds = time.perf_counter() - started
        rows = sum(s.rows for s in batch)
        owner = batch[0].scope
        if owner is not None:
            owner.stats.engine_calls.append((rows, len(batch)))
        for s, (result, error) in zip(batch, outcome):
            if s.scope is not None:
                s.scope.stats.wait_s += s.started - s.t0
            if error is not None:
                _fail(s, error)
            else:
                s.result, s.done = result, True
        self._cond.notify_all()
        if self.on_call is not None:
            try:
                self.on_call(rows, len(batch), seconds)
            except Exception:  # noqa: BLE001 -- metrics never break sampling
                pass

    def _evaluate(self, batch: list[_Submission]) -> list[tuple[Any, BaseException | None]]:
        if len(batch) == 1:
            s = batch[0]
            try:
                return [(self.inner(s.x, s.timestep, s.context, **s.kwargs), None)]
            except BaseException as exc:  # noqa: BLE001 -- handed to the submitting thread
                return [(None, exc)]
        try:
            out = self._stacked(batch)
        except Exception as exc:  # noqa: BLE001 -- retried one by one: only the failing prompts fail
            results = [self._evaluate([s])[0] for s in batch]
            if all(error is None for _, error in results):
                limit = max(s.rows for s in batch)
                if limit < self.max_batch:
                    self.max_batch = limit
                    if self.log:
                        self.log(f"UNet batching: a call of {sum(s.rows for s in batch)} rows failed "
                                 f"({type(exc).__name__}: {exc}) while each prompt's own call worked; "
                                 f"batching at most {limit} rows from now on")
            return results
        bounds = np.cumsum([0] + [s.rows for s in batch])
        # copies: the engine may reuse its output buffer on the next call, while a prompt still reads its rows
        return [(np.array(out[bounds[i]:bounds[i + 1]]), None) for i in range(len(batch))]

    def _stacked(self, batch: list[_Submission]) -> np.ndarray:
        head = batch[0]
        x = np.concatenate([s.x for s in batch])
        t = np.concatenate([_rows(s.timestep, s.rows) for s in batch])
        context = None if head.context is None else np.concatenate([np.asarray(s.context) for s in batch])
        kwargs = {}
        for name, value in head.kwargs.items():
            kwargs[name] = (np.concatenate([np.asarray(s.kwargs[name]) for s in batch])
                            if isinstance(value, np.ndarray) else value)
        out = np.asarray(self.inner(x, t, context, **kwargs))
        if out.shape[:1] != x.shape[:1]:
            raise ValueError(f"the UNet returned {out.shape[0] if out.ndim else 'no'} rows for a batch of "
                             f"{x.shape[0]}")
        return out


def _rows(timestep, rows: int) -> np.ndarray:
    t = np.asarray(timestep).reshape(-1)
    return np.broadcast_to(t, (rows,)) if t.size == 1 and rows != 1 else t


def _interrupted(s: _Submission) -> bool:
    if s.done or s.scope is None:
        return False
    try:
        return bool(s.scope.is_interrupted())
    except Exception:  # noqa: BLE001
        return False


def _fail(s: _Submission, error: BaseException) -> None:
    s.error, s.done = error, True
