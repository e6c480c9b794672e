"""SaveImage writes exclusively: two processes on one folder never share or lose a file, a planted symlink is
never followed, the counter moves on past names taken meanwhile."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ksampler_rt.workflow import images
from ksampler_rt.workflow.images import check_filename_prefix, save_images

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from ksampler_rt.workflow.images import save_images
    folder, seed = sys.argv[1], int(sys.argv[2])
    names = []
    for i in range(35):
        image = np.full((1, 4, 4, 3), ((seed * 35 + i) % 251) / 255.0, np.float32)
        names += [r["filename"] for r in save_images(image, folder, "race")]
    print("\\n".join(names))
""")


def test_two_processes_writing_one_folder_get_distinct_files(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(seed)], stdout=subprocess.PIPE,
                              text=True) for seed in (0, 1)]
    outputs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    names = outputs[0] + outputs[1]
    assert len(names) == 70 and len(set(names)) == 70          # every save got its own name
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(names)                               # no temporary file left, none lost
    values = set()
    for seed, listed in enumerate(outputs):                     # each file holds what its writer wrote
        for i, name in enumerate(listed):
            value = int(np.asarray(Image.open(tmp_path / name))[0, 0, 0])
            assert value == int(((seed * 35 + i) % 251) / 255.0 * 255)
            values.add((seed, i))
    assert len(values) == 70


def test_a_symlink_at_the_old_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".shot_00001_.png.tmp").symlink_to(victim)   # where the writer used to put its temporary file
    (result,) = save_images(np.zeros((1, 4, 4, 3), np.float32), out, "shot")
    assert victim.read_text() == "precious"
    assert result["filename"] == "shot_00001_.png" and not (out / "shot_00001_.png").is_symlink()


def test_a_name_taken_by_a_link_is_skipped_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "a_0.png").symlink_to(victim)
    name, taken = images._create_exclusive(tmp_path, b"data", lambda i: f"a_{i}.png")
    assert (name, taken) == ("a_1.png", 1)
    assert victim.read_text() == "precious" and (tmp_path / "a_1.png").read_bytes() == b"data"
    assert sorted(os.listdir(tmp_path)) == ["a_0.png", "a_1.png", "victim.txt"]


@pytest.mark.parametrize("prefix, expected", [("ComfyUI", ("", "ComfyUI")), ("sub/dir/name", ("sub/dir", "name")),
                                              ("./a", ("", "a")), ("a\\b", ("a", "b"))])
def test_filename_prefix_split(prefix, expected):
    assert check_filename_prefix(prefix) == expected


@pytest.mark.parametrize("prefix", ["../x", "a/../../x", "/etc/x", "C:/x", "a\x00", "..", ".hidden/x", "x/.y", "",
                                    "sub/", "x" * 201, 7])
def test_filename_prefix_refused(prefix):
    with pytest.raises(ValueError, match="filename_prefix: received"):
        check_filename_prefix(prefix)
