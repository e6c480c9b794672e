"""Shared fixtures for the runtime tests."""
import importlib.util
from pathlib import Path

import pytest


def load_analytic_unet_module():
    """tests/runtime/analytic_unet.py (the numpy twin of the UNet the golden ComfyUI data was made with)."""
    path = Path(__file__).with_name("analytic_unet.py")
    spec = importlib.util.spec_from_file_location("ksampler_rt_tests_analytic_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def analytic_unet_cls():
    return load_analytic_unet_module().AnalyticUNet
