"""Errors raised while loading a model directory; each message names the file or field and the
fix."""


class ModelLoadError(Exception):
    """A model directory cannot be loaded."""


class ModelConfigError(ModelLoadError, ValueError):
    """config.json is missing a field or asks for something this engine does not support."""
