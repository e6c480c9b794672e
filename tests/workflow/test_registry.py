"""The model registry never touches anything outside its folders."""
import pytest

from ksampler_rt.workflow.registry import ModelRegistry


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/b", "a\\b"])
def test_register_refuses_names_that_leave_the_registry(tmp_path, name):
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "precious.txt").write_text("keep")
    registry = ModelRegistry(root)
    with pytest.raises(ValueError, match="expected a plain name"):
        registry.register_checkpoint(name, export)
    with pytest.raises(ValueError, match="expected a plain name"):
        registry.register_lora(export / "manifest.json", name=name or "..")
    assert (root / "precious.txt").read_text() == "keep" and (root / "checkpoints").is_dir()


def test_register_and_resolve(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    registry = ModelRegistry(tmp_path / "models")
    registry.register_checkpoint("sd15", export)
    assert registry.checkpoint_names() == ["sd15"] and registry.checkpoint("sd15").resolve() == export.resolve()
    with pytest.raises(ValueError, match=r"ckpt_name: received 'sdxl', expected one of .*sd15"):
        registry.checkpoint("sdxl")
