"""Errors diffmem raises for bad input. The CLI prints their message, never a traceback."""


class DiffmemError(Exception):
    """Base class: a problem the user can fix, described in the message."""


class ModelLoadError(DiffmemError):
    """The model could not be loaded (missing folder, not a pipeline, unsupported, ...)."""


class InputError(DiffmemError, ValueError):
    """Bad user input: prompts, files, options."""
