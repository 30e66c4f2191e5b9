"""Where the shipped data (example config, templates, phone book, scenarios) lives.

In a wheel the top-level folders are packed into ``mailgw/_data``; in a source checkout or an
editable install they are the repository's own top-level folders.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped(*parts: str) -> Path:
    """Path of a shipped file or folder, e.g. ``shipped("templates")``."""
    packed = _PACKAGE.joinpath("_data", *parts)
    if packed.exists():
        return packed
    return _PACKAGE.parent.joinpath(*parts)
