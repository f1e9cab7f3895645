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


def kind_and_first_line(error: Exception) -> str:
    """``Kind: first line`` of an exception, or its kind alone where it carries no words (a bare
    ``TimeoutError``), so a message never ends in a dangling colon."""
    words = first_line(error)
    return f"{type(error).__name__}: {words}" if words else type(error).__name__
