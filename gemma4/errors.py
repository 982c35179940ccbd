"""Errors the engine raises for bad input: each carries one line a user can act on."""


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded: missing file or tensor, wrong shape, unknown field value."""


class AudioError(ValueError):
    """Audio that cannot be used: not audio, damaged or truncated, empty, or too long."""
