"""Saved parts of a long job: a part folder is complete when its ``done.json`` (written last)
names the key of the work it holds, so a killed run redoes only parts without a matching marker."""

from __future__ import annotations

import json
from pathlib import Path

from .results import dump_json


def saved_key(part: Path) -> str | None:
    """The key a part was completed with, or None (no marker: killed while saving, or never done)."""
    try:
        return json.loads((Path(part) / "done.json").read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def mark_done(part: Path, key: str, **info) -> None:
    dump_json({"key": key, **info}, Path(part) / "done.json")


def unmark(part: Path) -> None:
    """Before rewriting a part: a crash mid-write must not leave the old marker on new files."""
    (Path(part) / "done.json").unlink(missing_ok=True)
