"""The vendored captures must stay identical to the shared reference they were copied from."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent / "captures"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "reference" / "asterisk-ami" / "captures"


@pytest.mark.skipif(not SHARED.is_dir(), reason="no shared/ reference beside this clone")
def test_vendored_captures_match_the_shared_reference() -> None:
    shared = {p.name: p.read_bytes() for p in SHARED.iterdir() if p.is_file()}
    vendored = {p.name: p.read_bytes() for p in HERE.iterdir() if p.is_file() and p.name != "README.md"}
    assert vendored == shared
