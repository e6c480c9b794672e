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
