"""RCPT decisions: local people and service mailboxes are taken; nothing else (no open relay)."""

from __future__ import annotations

import pytest

from mailgw.config import load_config
from mailgw.directory import load_directory
from mailgw.resources import shipped
from mailgw.routing import RouteKind, route_recipient
from mailgw.status import Refused

CONFIG = load_config(None)
DIRECTORY = load_directory(shipped("config", "directory.yaml"))


@pytest.mark.parametrize(("address", "kind", "normalised"), [
    ("bob@a.example", RouteKind.PERSON, "bob@a.example"),
    ("Bob@A.Example", RouteKind.PERSON, "bob@a.example"),
    ("cti@a.example", RouteKind.SERVICE, "cti@a.example"),
])
def test_local_recipients_are_taken(address: str, kind: RouteKind, normalised: str) -> None:
    route = route_recipient(address, CONFIG, DIRECTORY)
    assert (route.kind, route.address) == (kind, normalised)


@pytest.mark.parametrize(("address", "code", "status"), [
    ("nobody@a.example", 550, "5.1.1"),
    ("bob@b.example", 550, "5.7.1"),
    ("bob@a.example.evil.example", 550, "5.7.1"),
    ("not an address", 501, "5.1.3"),
])
def test_everything_else_is_refused(address: str, code: int, status: str) -> None:
    with pytest.raises(Refused) as caught:
        route_recipient(address, CONFIG, DIRECTORY)
    assert (caught.value.reply.code, caught.value.reply.status) == (code, status)
