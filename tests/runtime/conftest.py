"""Shared fixtures for the runtime tests.

The analytic networks (analytic_unet.py: the numpy twins of the networks the golden ComfyUI data was made
with) are imported by name, ``from analytic_unet import AnalyticUNet``: pytest puts this folder, which has
no ``__init__.py``, on ``sys.path`` (its default "prepend" import mode), as tests/serve does for
serve_helpers.
"""
import pytest


@pytest.fixture(scope="session")
def analytic_unet_cls():
    from analytic_unet import AnalyticUNet

    return AnalyticUNet
