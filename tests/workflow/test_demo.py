"""``ksampler-rt demo``: tiny model -> export -> engines -> split workflow -> PNGs, end to end."""
from ksampler_rt.cli import main
from ksampler_rt.workflow.images import read_png_metadata


def test_demo_writes_the_pngs_and_reports_the_split_differences(tiny_sd15, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--models", str(tiny_sd15.models_dir),
                 "--backend", "onnxruntime-cpu"]) == 0
    out = capsys.readouterr().out
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["split_00001_.png", "split_exact_00001_.png", "unsplit_00001_.png",
                                       "unsplit_again_00001_.png"]
    assert all(str(f) in out for f in files)
    assert "prompt" in read_png_metadata(files[0])
    comfy = float(out.split("ComfyUI semantics:")[1].split()[0])
    exact = float(out.split("exact continuation:")[1].split()[0])
    assert exact == 0.0 and 0.0 < comfy < 1e-2  # ComfyUI's split differs by the scale round trip only


def test_demo_export_keeps_library_warnings_in_a_log_and_shows_progress(tiny_sd15, tmp_path, monkeypatch, capfd):
    """The demo's first run exports the tiny model: the exporter's TracerWarnings go to a log file in the cache
    (one line names it), the console shows the export's step lines."""
    import shutil

    from ksampler_rt.demo import prepare_tiny_checkpoint
    from ksampler_rt.export.tiny import default_tiny_model_dir

    monkeypatch.setenv("KSAMPLER_RT_CACHE", str(tmp_path / "cache"))  # nothing exported there yet
    shutil.copytree(tiny_sd15.source, default_tiny_model_dir("sd15"))  # the same model, not built again
    lines = []
    export_dir = prepare_tiny_checkpoint(tmp_path / "models", log=lines.append)
    console = capfd.readouterr()
    library_log = export_dir.with_name(export_dir.name + ".log")
    assert "TracerWarning: Converting a tensor to a Python boolean" in library_log.read_text()
    assert "Converting a tensor to a Python boolean" not in console.out + console.err
    assert any(line.endswith(f"written to {library_log}") for line in lines)
    for name in ("unet", "clip", "vae_decoder", "vae_encoder"):
        assert f"{name}: exporting with torch.onnx" in console.err and f"{name}: validating" in console.err
    assert not (export_dir / "export.log").exists()  # the demo's log is the one file
