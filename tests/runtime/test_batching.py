"""Step-level batching (ksampler_rt.runtime.batching): concurrent sampling runs share UNet calls.

The reference is each run's solo result (the same ksampler call without the gather point). The analytic
UNet works row by row with numpy, so stacking rows cannot change a row's value: batched results must be
bit-identical. (Engines: tests/serve/test_serve_batching.py, with the tolerance measured per backend.)
Rows are tagged through the conditioning (run k's cond is filled with k + 0.25, its uncond with -(k + 0.25)),
so the recording UNet knows which runs shared each call. No test here depends on timing: batch_wait_ms is
set far above any step time, so runs meet deterministically (a call waits until every active run has
submitted or left), and the only way to be slow is to be wrong.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ksampler_rt.runtime import Model, ksampler
from ksampler_rt.runtime.batching import BatchingUNet, Withdrawn, run_scope

WAIT_MS = 5000.0   # far above any step: runs meet at every step unless the scheduler is wrong
WINDOW_S = 60.0    # a run counts as active until it leaves its scope (not after a short idle time)


def batching(inner, **options) -> BatchingUNet:
    options.setdefault("batch_wait_ms", WAIT_MS)
    return BatchingUNet(inner, active_window_s=WINDOW_S, **options)


class TaggingUNet:
    """The analytic UNet, recording which runs' rows each call carried (and on which thread it ran)."""

    def __init__(self, inner, fail_tag: float | None = None, max_rows: int | None = None):
        self.inner, self.fail_tag, self.max_rows = inner, fail_tag, max_rows
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, x, timestep, context, **kwargs):
        tags = sorted({round(abs(float(v)) - 0.25) for v in np.asarray(context)[:, 0, 0]})
        with self._lock:
            self.calls.append({"tags": tags, "rows": int(np.shape(x)[0]), "hw": tuple(np.shape(x)[2:]),
                               "tokens": int(np.shape(context)[1]), "thread": threading.get_ident()})
        if self.max_rows is not None and np.shape(x)[0] > self.max_rows:
            raise RuntimeError(f"batch {np.shape(x)[0]} is above this engine's profile ({self.max_rows})")
        if self.fail_tag is not None and self.fail_tag in tags:
            raise RuntimeError(f"engine failure on run {self.fail_tag}")
        return self.inner(x, timestep, context, **kwargs)


def _cond(tag: int, tokens: int, sign: float = 1.0):
    return [[np.full((1, tokens, 8), sign * (tag + 0.25), np.float32), {}]]


def _sample(model, tag: int, sampler: str, steps: int, size: int, tokens: int = 77, cfg: float = 6.0,
            is_interrupted=lambda: False):
    latent = {"samples": np.zeros((1, 4, size, size), np.float32)}

    def callback(i, total, x, denoised):
        if is_interrupted():
            raise KeyboardInterrupt  # never reached in these tests: withdrawal raises first
    return ksampler(model, 100 + tag, steps, cfg, sampler, "karras", _cond(tag, tokens), _cond(tag, tokens, -1.0),
                    latent, callback=callback)["samples"]


def _in_threads(jobs: dict, *batchers: BatchingUNet) -> dict:
    """Run ``jobs`` (tag -> fn) each on its own thread inside a run scope, every run announced to the
    gather points ``batchers`` before any starts; tag -> result or exception."""
    out: dict = {}
    start = threading.Barrier(len(jobs))

    def body(tag, fn):
        with run_scope(getattr(fn, "is_interrupted", lambda: False)) as stats:
            for b in getattr(fn, "batchers", batchers):
                b.join()
            start.wait()
            try:
                out[tag] = fn()
            except BaseException as exc:  # noqa: BLE001 -- checked by the test
                out[tag] = exc
            out[("stats", tag)] = stats

    threads = [threading.Thread(target=body, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a run never finished"
    return out


RUNS = {  # tag: (sampler, steps, latent size, context tokens)
    1: ("euler", 6, 8, 77),
    2: ("dpmpp_2m", 9, 8, 77),
    3: ("heun", 5, 8, 77),           # two model calls per step
    4: ("euler_ancestral", 7, 8, 77),
    5: ("uni_pc", 8, 16, 77),        # another latent size: never shares a call with the 8x8 runs
    6: ("dpmpp_sde", 6, 8, 154),     # another context length: never shares either
    7: ("lms", 6, 16, 77),
}


def test_batched_runs_equal_their_solo_runs_and_incompatible_runs_never_share(analytic_unet_cls):
    solo = {tag: _sample(Model(analytic_unet_cls(), "sd15"), tag, *spec) for tag, spec in RUNS.items()}

    engine = TaggingUNet(analytic_unet_cls())
    model = Model(batching(engine, max_batch=64), "sd15")
    out = _in_threads({tag: (lambda tag=tag, spec=spec: _sample(model, tag, *spec)) for tag, spec in RUNS.items()},
                      model.unet)

    for tag in RUNS:
        assert not isinstance(out[tag], BaseException), out[tag]
        assert np.array_equal(out[tag], solo[tag]), f"run {tag} differs from its solo run"
    shared = [c for c in engine.calls if len(c["tags"]) > 1]
    assert shared, "no call was shared"
    assert max(len(c["tags"]) for c in shared) >= 3
    for c in engine.calls:  # compatibility: same latent size and context length within a call
        sizes = {RUNS[t][2] for t in c["tags"]}
        tokens = {RUNS[t][3] for t in c["tags"]}
        assert len(sizes) == 1 and len(tokens) == 1, c
    # every model call of every run was evaluated exactly once (solo call counts = batched row counts)
    rows = {tag: 0 for tag in RUNS}
    for c in engine.calls:
        for t in c["tags"]:
            rows[t] += c["rows"] // len(c["tags"])
    recount = TaggingUNet(analytic_unet_cls())
    for tag, spec in RUNS.items():
        _sample(Model(recount, "sd15"), tag, *spec)
    assert rows == {tag: sum(c["rows"] for c in recount.calls if c["tags"] == [tag]) for tag in RUNS}


def test_two_gather_points_never_mix_their_runs(analytic_unet_cls):
    """Two wrapped engines (two weight sets, e.g. two checkpoints): runs of one never reach the other."""
    a, b = TaggingUNet(analytic_unet_cls()), TaggingUNet(analytic_unet_cls())
    models = {"a": Model(batching(a, max_batch=32), "sd15"),
              "b": Model(batching(b, max_batch=32), "sd15")}
    jobs = {}
    for tag in range(1, 7):
        model = models["a" if tag % 2 else "b"]
        jobs[tag] = lambda tag=tag, model=model: _sample(model, tag, "euler", 5, 8)
        jobs[tag].batchers = (model.unet,)   # a run announces itself where it will call
    out = _in_threads(jobs)
    assert all(isinstance(out[t], np.ndarray) for t in jobs)
    assert {t for c in a.calls for t in c["tags"]} == {1, 3, 5}
    assert {t for c in b.calls for t in c["tags"]} == {2, 4, 6}
    assert max(len(c["tags"]) for c in a.calls) > 1 and max(len(c["tags"]) for c in b.calls) > 1


def test_max_batch_bounds_the_rows_of_a_call(analytic_unet_cls):
    engine = TaggingUNet(analytic_unet_cls())
    model = Model(batching(engine, max_batch=4), "sd15")
    solo = {tag: _sample(Model(analytic_unet_cls(), "sd15"), tag, "euler", 5, 8) for tag in range(1, 6)}
    out = _in_threads({tag: (lambda tag=tag: _sample(model, tag, "euler", 5, 8)) for tag in range(1, 6)}, model.unet)
    assert all(np.array_equal(out[t], solo[t]) for t in solo)
    assert max(c["rows"] for c in engine.calls) == 4   # two CFG runs (2 rows each) per call, never three


def test_a_lone_run_calls_the_engine_directly_without_waiting(analytic_unet_cls):
    engine = TaggingUNet(analytic_unet_cls())
    model = Model(batching(engine, max_batch=16), "sd15")
    with run_scope() as stats:
        out = _sample(model, 1, "dpmpp_2m", 8, 8)
    assert np.array_equal(out, _sample(Model(analytic_unet_cls(), "sd15"), 1, "dpmpp_2m", 8, 8))
    assert stats.partner_waits == 0                    # never held back for a partner
    assert {c["thread"] for c in engine.calls} == {threading.get_ident()}   # on the caller's own thread
    assert stats.engine_calls == [(2, 1)] * len(engine.calls)


def test_engine_thread_runs_every_call_on_one_thread(analytic_unet_cls):
    engine = TaggingUNet(analytic_unet_cls())
    batcher = batching(engine, max_batch=1, engine_thread=True)
    model = Model(batcher, "sd15")
    out = _in_threads({tag: (lambda tag=tag: _sample(model, tag, "euler", 4, 8)) for tag in range(1, 4)}, batcher)
    assert all(isinstance(out[t], np.ndarray) for t in range(1, 4))
    threads = {c["thread"] for c in engine.calls}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert all(len(c["tags"]) == 1 for c in engine.calls)   # max_batch 1: serialised, never merged
    batcher.close()


def test_an_interrupted_run_leaves_the_batch_and_the_others_are_undisturbed(analytic_unet_cls):
    engine = TaggingUNet(analytic_unet_cls())
    model = Model(batching(engine, max_batch=64), "sd15")
    solo = {tag: _sample(Model(analytic_unet_cls(), "sd15"), tag, "dpmpp_2m", 10, 8) for tag in (1, 3)}
    calls_of_2 = []

    def interrupted() -> bool:   # run 2 is interrupted once 3 of its calls were evaluated
        calls_of_2[:] = [c for c in engine.calls if 2 in c["tags"]]
        return len(calls_of_2) >= 3

    def run2():
        return _sample(model, 2, "dpmpp_2m", 10, 8)
    run2.is_interrupted = interrupted
    out = _in_threads({1: lambda: _sample(model, 1, "dpmpp_2m", 10, 8), 2: run2,
                       3: lambda: _sample(model, 3, "dpmpp_2m", 10, 8)}, model.unet)
    assert isinstance(out[2], Withdrawn)
    assert sum(2 in c["tags"] for c in engine.calls) == 3    # its rows left the next call
    for tag in (1, 3):
        assert np.array_equal(out[tag], solo[tag])


def test_a_failing_call_fails_only_the_runs_in_it(analytic_unet_cls):
    engine = TaggingUNet(analytic_unet_cls(), fail_tag=2)
    batcher = batching(engine, max_batch=64)
    model = Model(batcher, "sd15")
    solo = {tag: _sample(Model(analytic_unet_cls(), "sd15"), tag, "euler", 6, 8) for tag in (1, 3, 4)}
    out = _in_threads({tag: (lambda tag=tag: _sample(model, tag, "euler", 6, 8)) for tag in (1, 2, 3, 4)}, batcher)
    assert isinstance(out[2], RuntimeError) and "run 2" in str(out[2])
    for tag in (1, 3, 4):
        assert np.array_equal(out[tag], solo[tag]), tag
    assert any(len(c["tags"]) > 1 and 2 in c["tags"] for c in engine.calls)  # it did share a call first
    assert batcher.max_batch == 64   # the batch was not to blame: batching stays on


def test_an_engine_refusing_large_batches_lowers_the_limit(analytic_unet_cls):
    engine = TaggingUNet(analytic_unet_cls(), max_rows=4)
    logs = []
    batcher = batching(engine, max_batch=64, log=logs.append)
    model = Model(batcher, "sd15")
    solo = {tag: _sample(Model(analytic_unet_cls(), "sd15"), tag, "euler", 6, 8) for tag in range(1, 5)}
    out = _in_threads({tag: (lambda tag=tag: _sample(model, tag, "euler", 6, 8)) for tag in range(1, 5)}, batcher)
    assert all(np.array_equal(out[t], solo[t]) for t in solo)
    assert batcher.max_batch == 2 and logs and "at most 2 rows" in logs[0]


def test_bad_options_name_the_parameter(analytic_unet_cls):
    with pytest.raises(ValueError, match="max_batch: received 0"):
        BatchingUNet(analytic_unet_cls(), max_batch=0)
    with pytest.raises(ValueError, match="batch_wait_ms: received -1"):
        BatchingUNet(analytic_unet_cls(), batch_wait_ms=-1)
    with pytest.raises(TypeError, match="unet: received int"):
        BatchingUNet(3)
