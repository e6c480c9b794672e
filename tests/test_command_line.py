"""The ``ksampler-rt`` command on a core-only install: no extra is needed to start it."""
import subprocess
import sys

BLOCK = ("torch", "diffusers", "transformers", "aiohttp", "ray", "matplotlib", "prometheus_client", "peft",
         "torchsde", "tensorrt", "cuda", "cupy")


def test_every_subcommand_registers_without_the_extras():
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCK!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from ksampler_rt.cli import build_parser
parser = build_parser()
print(" ".join(sorted(parser._subparsers._group_actions[0].choices)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == sorted(["bench", "build", "demo", "deploy", "engines", "export", "gpu-check",
                                         "make-tiny-model",
                                         "register", "run", "serve"])
