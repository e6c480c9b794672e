"""What an export leaves on the console and on disk: library warnings in a log file (not the console), progress
lines, working folders of killed exports removed by the next one, SIGTERM / Ctrl-C cleaning up."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from ksampler_rt.export import workdirs
from ksampler_rt.export.library_log import library_output_to

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _library_logging_configured():
    """transformers binds its stderr handler to whatever ``sys.stderr`` is when it first configures logging;
    under ``capfd`` that is a stream closed after the test, which would break its logging for the session."""
    from ksampler_rt.export.library_log import _configure_lazy_library_logging

    _configure_lazy_library_logging()


# ------------------------------------------------------------------------------------------ library output

def test_library_output_goes_to_the_file_and_everything_is_restored(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in the CLI (pytest adds its own handlers)
    lib = logging.getLogger("transformers.modeling_utils")
    root_logger = logging.getLogger("transformers")
    before = (root_logger.handlers[:], root_logger.propagate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # like `python -W error`: inside the capture a warning must not raise
        with library_output_to(tmp_path / "lib.log") as captured:
            warnings.warn("shape check traced as a constant", UserWarning)
            lib.warning("weights cast with to()")
            logging.getLogger("some.other.library").warning("would reach logging.lastResort")
            with library_output_to(tmp_path / "lib.log") as nested:  # the same file: the same capture
                warnings.warn("nested", DeprecationWarning)
            assert nested is captured
        with pytest.raises(UserWarning):  # the caller's filters are back
            warnings.warn("after", UserWarning)
    console = capfd.readouterr()
    text = (tmp_path / "lib.log").read_text()
    for line in ("shape check traced as a constant", "weights cast with to()", "would reach logging.lastResort",
                 "nested"):
        assert line in text and line not in console.err + console.out
    assert captured.count == 4 and captured.categories == {"UserWarning": 1, "transformers": 1, "some": 1,
                                                          "DeprecationWarning": 1}
    assert "4 library warning/log entries" in captured.summary() and str(tmp_path / "lib.log") in captured.summary()
    assert (root_logger.handlers, root_logger.propagate) == before and logging.getLogger().handlers == []


def test_a_quiet_capture_leaves_no_file(tmp_path):
    with library_output_to(tmp_path / "quiet.log") as captured:
        pass
    assert captured.count == 0 and not (tmp_path / "quiet.log").exists()


def _export_deps():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")


def test_export_keeps_tracer_warnings_out_of_the_console(tmp_path, tiny_sd15_dir, capfd):
    """The TorchScript exporter warns (TracerWarning) on the UNet's shape checks: they belong in the export's
    log file, with one console line naming it, and the console shows the export's progress instead."""
    _export_deps()
    from ksampler_rt.export.onnx_export import export_model

    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as escaped:  # what would reach pytest's (or Python's) reporting
        warnings.simplefilter("always")
        export_model(str(tiny_sd15_dir), str(out), models=["unet"])
    console = capfd.readouterr()
    log = (out / "export.log").read_text()
    assert "TracerWarning: Converting a tensor to a Python boolean" in log
    assert "TracerWarning:" not in console.err + console.out
    assert "Converting a tensor to a Python boolean" not in console.err + console.out
    assert not [w for w in escaped if w.category.__name__ == "TracerWarning"]
    assert "should be kept in float32" not in console.err  # diffusers' logger, when it warns
    assert "Loading weights" not in console.err  # transformers' progress bar
    assert "[export] [1/1] unet: exporting with torch.onnx" in console.err
    assert "[export] [1/1] unet: validating with ONNX Runtime" in console.err
    assert f"written to {out / 'export.log'}" in console.err


def test_failed_export_keeps_its_log_next_to_the_output(tmp_path, tiny_sd15_dir, monkeypatch, capfd):
    _export_deps()
    from ksampler_rt.export import validate as validate_mod
    from ksampler_rt.export.errors import ExportError
    from ksampler_rt.export.onnx_export import export_model

    out = tmp_path / "out"
    real = validate_mod.validate
    monkeypatch.setattr(validate_mod, "validate", lambda *a, **k: dict(real(*a, **k), max_rel_err=0.5))
    with pytest.raises(ExportError, match="unet.onnx failed validation"):
        export_model(str(tiny_sd15_dir), str(out), models=["unet"])
    kept = tmp_path / "out.export.log"
    assert not out.exists() and "TracerWarning" in kept.read_text()
    assert f"written to {kept}" in capfd.readouterr().err
    monkeypatch.setattr(validate_mod, "validate", real)
    export_model(str(tiny_sd15_dir), str(out), models=["unet"])
    assert not kept.exists() and (out / "export.log").is_file()  # the failed attempt's log goes with success


# --------------------------------------------------------------------------------- stale working folders

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _owned(parent: Path, name: str, pid: int, host: str | None = None) -> Path:
    d = parent / name
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"x" * 10)
    if host is not None:
        (d / workdirs.MARKER).write_text(json.dumps({"pid": pid, "host": host}))
    return d


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p.pid
    p.kill()
    p.wait()


def test_stale_folders_of_dead_exports_are_removed_live_ones_kept(tmp_path, monkeypatch, live_pid):
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    parent = tmp_path / "exports"
    out = parent / "model"
    host, dead = socket.gethostname(), _dead_pid()
    gone = [_owned(systmp, f"ksampler-rt-export-{dead}-abc", dead, host),
            _owned(parent, f".model.tmp-{dead}-abc", dead, host),
            _owned(parent, f".model.tmp-{dead}-nomarker", dead),  # this output's, by name
            _owned(parent, f".other.tmp-{dead}-abc", dead, host)]  # another output's, with the marker
    kept = [_owned(systmp, f"ksampler-rt-export-{live_pid}-abc", live_pid, host),  # a running export
            _owned(parent, f".model.tmp-{live_pid}-abc", live_pid, host),
            _owned(systmp, f"ksampler-rt-export-{dead}-xyz", dead, "another-host"),  # a pid of another machine
            _owned(parent, f".other.tmp-{dead}-nomarker", dead),  # not certainly an export's
            _owned(systmp, "ksampler-rt-export-a1b2c3d4", dead, None),  # no owner in the name
            _owned(parent, f".model.old-{dead}-abc", dead)]  # out is not complete: may be the only copy
    removed = workdirs.remove_stale_export_dirs(str(out))
    assert sorted(removed) == sorted(str(p) for p in gone)
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # once out is complete, the replaced export's leftover goes too
    assert workdirs.remove_stale_export_dirs(str(out)) == [str(parent / f".model.old-{dead}-abc")]


def test_the_next_export_removes_a_killed_exports_folders(tmp_path, tiny_sd15_dir, monkeypatch, live_pid, capfd):
    _export_deps()
    from ksampler_rt.export.onnx_export import export_model

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    host, dead = socket.gethostname(), _dead_pid()
    stale = [_owned(systmp, f"ksampler-rt-export-{dead}-abc", dead, host),
             _owned(tmp_path, f".out.tmp-{dead}-abc", dead, host)]
    live = [_owned(systmp, f"ksampler-rt-export-{live_pid}-abc", live_pid, host),
            _owned(tmp_path, f".out.tmp-{live_pid}-abc", live_pid, host)]
    export_model(str(tiny_sd15_dir), str(tmp_path / "out"), models=["clip"])
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)
    err = capfd.readouterr().err
    assert all(f"removed {p}" in err for p in stale)
    # and this export's own folders are gone
    assert sorted(p.name for p in systmp.glob("ksampler-rt-export-*")) == [live[0].name]
    assert sorted(p.name for p in tmp_path.glob(".out.*")) == [live[1].name]


def test_an_interrupted_overwrite_puts_the_previous_export_back(tmp_path, monkeypatch):
    from ksampler_rt.export import onnx_export

    out, new = tmp_path / "out", tmp_path / ".out.tmp-1-x"
    out.mkdir()
    (out / "manifest.json").write_text("previous")
    new.mkdir()
    (new / "manifest.json").write_text("new")
    real = os.rename

    def interrupted(src, dst):
        if str(src) == str(new):
            raise KeyboardInterrupt  # between the two renames of the swap
        real(src, dst)
    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_export._move_into_place(str(new), str(out), overwrite=True)
    assert (out / "manifest.json").read_text() == "previous" and not list(tmp_path.glob(".out.old-*"))


# ---------------------------------------------------------------------------------------------- signals

_CHILD = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores SIGINT)
from ksampler_rt.export import onnx_export

def export_then_wait(spec, path, *a, **k):
    open(sys.argv[3], "w").close()  # the temp folders exist now; the parent sends the signal
    time.sleep(600)
onnx_export.torch_export = export_then_wait
onnx_export.export_model(sys.argv[1], sys.argv[2], models=["clip"])
"""


@pytest.mark.slow  # a child process imports torch + diffusers
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_export_removes_its_folders(tmp_path, tiny_sd15_dir, sig):
    _export_deps()
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    ready = tmp_path / "ready"
    env = dict(os.environ, TMPDIR=str(systmp), PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tiny_sd15_dir), str(tmp_path / "out"), str(ready)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), child.communicate()[1] if child.poll() is not None else "the child never got there"
        assert list(systmp.glob("ksampler-rt-export-*")) and list(tmp_path.glob(".out.tmp-*"))
        child.send_signal(getattr(signal, sig))
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if sig == "SIGTERM":  # re-sent after the clean-up: the process still ends by that signal
        assert child.returncode == -signal.SIGTERM, err
    else:  # Ctrl-C ends the export as a KeyboardInterrupt (Python reports it as -SIGINT or as exit status 1,
        # depending on what runs at interpreter exit); either way it is the interrupt that ended it
        assert child.returncode in (-signal.SIGINT, 1) and "KeyboardInterrupt" in err, (child.returncode, err)
    assert not list(systmp.glob("ksampler-rt-export-*")) and not list(tmp_path.glob(".out*")), err
