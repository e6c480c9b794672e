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
