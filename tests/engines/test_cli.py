import json

import pytest

from ksampler_rt.cli import main


def test_build_list_inspect_prune(tiny_export, cache_root, capsys):
    assert main(["build", str(tiny_export), "--backend", "onnxruntime-cpu"]) == 0
    out = capsys.readouterr().out
    assert "4 engine(s) ready for onnxruntime-cpu" in out
    assert main(["build", str(tiny_export), "--backend", "onnxruntime-cpu", "--models", "unet"]) == 0
    assert "cached" in capsys.readouterr().out

    assert main(["engines", "list"]) == 0
    out = capsys.readouterr().out
    assert str(cache_root / "engines") in out and out.count("[ok]") == 4
    assert main(["engines", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["entries"]
    unet = next(r for r in rows if r["model"] == "unet")
    assert unet["backend"] == "onnxruntime-cpu" and unet["status"] == "ok"

    assert main(["engines", "inspect", unet["name"][:20]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "ok" and info["components"]["model"] == "unet" and "model.onnx" in info["files"]

    f = cache_root / "engines" / unet["name"] / "model.onnx"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    assert main(["engines", "inspect", unet["name"]]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "unusable here" and "checksum" in info["problems"][0]

    assert main(["engines", "prune", "--dry-run"]) == 0
    assert "would remove 1 entry" in capsys.readouterr().out
    assert main(["engines", "prune"]) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert main(["engines", "prune", "--export", str(tiny_export)]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    assert main(["engines", "list"]) == 0
    assert "(no engines)" in capsys.readouterr().out


def test_user_errors_are_one_line(tiny_export, cache_root, capsys):
    assert main(["build", str(tiny_export), "--backend", "onnxruntime-cpu", "--shapes", "512"]) == 2
    err = capsys.readouterr().err
    assert "WIDTHxHEIGHT" in err and err.count("\n") == 1
    assert main(["build", str(tiny_export / "nope"), "--backend", "onnxruntime-cpu"]) == 2
    assert "manifest.json not found" in capsys.readouterr().err
    assert main(["build", str(tiny_export), "--backend", "onnxruntime-cpu", "--precision", "fp16"]) == 2
    assert "re-export" in capsys.readouterr().err
    assert main(["engines", "inspect", "nothing-like-this"]) == 2


def test_tensorrt_build_without_tensorrt(tiny_export, cache_root, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed")
    assert main(["build", str(tiny_export), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "GPU" in err or "ksampler-rt[tensorrt]" in err
