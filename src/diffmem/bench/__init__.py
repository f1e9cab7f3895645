"""Benchmarks on labelled prompt sets."""

from __future__ import annotations

from ..core.errors import InputError


def check_max_prompts(max_prompts: int | None) -> None:
    """A limit on a benchmark's prompts: None for all of them, else at least 1 (0 must not mean all,
    nor a negative number all but the last few)."""
    if max_prompts is not None and (isinstance(max_prompts, bool) or int(max_prompts) != max_prompts or max_prompts < 1):
        raise InputError(f"max_prompts must be a whole number of at least 1 (or None for all), got {max_prompts!r}")
