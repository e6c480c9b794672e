"""Placeholder: filled in by its owner."""
SAMPLERS: dict = {}
