"""``ksampler-rt serve`` as a process: starts on loopback, answers, stops cleanly on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest


def test_serve_command_starts_answers_and_stops(tmp_path):
    cmd = [sys.executable, "-m", "ksampler_rt.serve.cli", "serve", "--port", "0", "--fake-checkpoint", "tiny-sd15",
           "--output", str(tmp_path / "out"), "--input", str(tmp_path / "in"), "--temp", str(tmp_path / "tmp")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.monotonic() + 30
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            if match:
                url = match.group(1)
        assert url, "".join(lines)
        with urllib.request.urlopen(url + "/object_info/CheckpointLoaderSimple", timeout=10) as r:
            info = json.loads(r.read())
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["tiny-sd15"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def test_serve_arguments_are_checked():
    from ksampler_rt.serve.cli import main

    with pytest.raises(SystemExit):  # argparse: not one of local, ray
        main(["serve", "--workers", "kubernetes"])
    with pytest.raises(ValueError, match="--max-queue"):
        main(["serve", "--max-queue", "0"])
    with pytest.raises(ValueError, match="--max-batch: received 0"):
        main(["serve", "--max-batch", "0"])
    with pytest.raises(ValueError, match="--batch-wait-ms: received -1"):
        main(["serve", "--batch-wait-ms", "-1"])


def test_deploy_ray_batching_options_reach_the_app_config(tmp_path):
    import argparse

    from ksampler_rt.serve import deploy_cli

    parser = argparse.ArgumentParser()
    deploy_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "app.json"
    args = parser.parse_args(["deploy", "ray", "--max-batch", "8", "--batch-wait-ms", "3", "--write-config", str(out)])
    assert args.func(args) == 0
    app = json.loads(out.read_text())["applications"][0]["args"]
    assert app["max_batch_size"] == 8 and app["batch_wait_timeout_s"] == pytest.approx(0.003)
    legacy = parser.parse_args(["deploy", "ray", "--max-batch-size", "4"])   # the older spelling still works
    assert legacy.max_batch_size == 4
    with pytest.raises(ValueError, match="--max-batch: received 0"):
        bad = parser.parse_args(["deploy", "ray", "--max-batch", "0", "--write-config", str(out)])
        bad.func(bad)
