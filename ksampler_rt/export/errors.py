"""Errors raised by the exporter. Subclasses ValueError so ``ksampler_rt.cli`` prints one line, exit 2."""


class ExportError(ValueError):
    """A user-facing export failure (bad input, validation over tolerance, disk full...)."""
