"""Errors diffmem raises for bad input. The CLI prints their message, never a traceback."""


class DiffmemError(Exception):
    """Base class: a problem the user can fix, described in the message."""


class ModelLoadError(DiffmemError):
    """The model could not be loaded (missing folder, not a pipeline, unsupported, ...)."""


class InputError(DiffmemError, ValueError):
    """Bad user input: prompts, files, options."""


def first_line(error: Exception, limit: int = 300) -> str:
    """An exception's first line, at most ``limit`` characters: Pillow's or the OS's words, which name
    the file to mend, without what follows them."""
    lines = str(error).splitlines()
    return lines[0][:limit] if lines else ""
