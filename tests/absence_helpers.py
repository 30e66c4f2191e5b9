"""Shared by the absence tests and bench/absence_bench.py: a directory whose people read mail
outside the gateway's domain (so missed-call mail leaves by SMTP, to the sink), a customer list,
and incoming calls placed on the simulator over AMI, awaited until the gateway has recorded them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

import yaml

from mailgw.customers import parse_customers, read_entries
from mailgw.gateway import Gateway
from mailgw.store import IncomingRow, NoticeRow

DIRECTORY = {
    "representative": "desk@b.example",
    "people": [
        {"address": "tanaka@b.example", "name": "Tanaka Ichiro", "extension": "2000", "language": "en"},
        {"address": "bob@b.example", "name": "Bob Baker", "extension": "2001", "language": "en"},
        {"address": "yamada@b.example", "name": "山田 太郎", "extension": "2002", "language": "ja"},
        {"address": "dave@b.example", "name": "Dave Dunn", "extension": "2004", "language": "en"},
        {"address": "desk@b.example", "name": "Front Desk", "extension": "2010", "language": "en"},
    ],
}

CUSTOMERS_CSV = """name,department,contact,phone,fax,address,importance,owner,owner_address
XX Corp,Sales,Yamada Taro,03-1234-5678,03-1234-5679,"1-2-3 Chiyoda, Tokyo",A,Tanaka Ichiro,tanaka@b.example
ＹＹ商事,営業部,鈴木 花子,+81 6-1111-2222,,大阪市北区,B,山田 太郎,yamada@b.example
"""


def write_directory(tmp_path: Path) -> Path:
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(DIRECTORY, allow_unicode=True), encoding="utf-8")
    return path


async def import_customers(gw: Gateway, tmp_path: Path, text: str = CUSTOMERS_CSV) -> None:
    path = tmp_path / "customers.csv"
    path.write_text(text, encoding="utf-8")
    result = parse_customers(read_entries(path), gw.config.numbering.region)
    assert not result.rejected, result.rejected
    await gw.store.replace_customers([c.row() for c in result.customers])


class CallEnds:
    """Await incoming calls as the gateway durably records them (with any notice decided)."""

    def __init__(self, gw: Gateway) -> None:
        assert gw.call_history is not None
        self.latest: dict[str, tuple[IncomingRow, NoticeRow | None]] = {}
        self._changed = asyncio.Event()
        gw.call_history.listeners.append(self._on_recorded)

    def _on_recorded(self, rows: list[IncomingRow], notices: list[NoticeRow]) -> None:
        by_call = {n.call_id: n for n in notices}
        for row in rows:
            self.latest[row.id] = (row, by_call.get(row.id))
        self._changed.set()

    async def wait(self, call_id: str, timeout: float = 10.0, *,
                   until: Callable[[IncomingRow], bool] = lambda row: row.ended_at is not None,
                   ) -> tuple[IncomingRow, NoticeRow | None]:
        """The call's record once ``until`` holds for it (default: it has ended)."""
        async with asyncio.timeout(timeout):
            while call_id not in self.latest or not until(self.latest[call_id][0]):
                self._changed.clear()
                await self._changed.wait()
        return self.latest[call_id]


async def missed_call(gw: Gateway, tmp_path: Path, **call: object) -> str:
    """The customer list imported, Tanaka absent, and XX Corp's call to him missed (recorded, its
    notice decided): the call's id. ``call``: more of ``place_incoming``'s options."""
    await import_customers(gw, tmp_path)
    await gw.store.set_absence("tanaka@b.example", until=None, note="", source="test")
    ends = CallEnds(gw)
    call_id = await place_incoming(gw, "0312345678", "2000", answer="nobody", **call)  # type: ignore[arg-type]
    row, notice = await ends.wait(call_id)
    assert notice is not None and notice.recipient == "tanaka@b.example" and row.answered_by is None
    return call_id


async def place_incoming(gw: Gateway, caller: str | None, to: str, *, answer: str | None = None,
                         ring_time: float = 20.0, message: Path | None = None) -> str:
    """An incoming call from outside on the simulator (SimIncoming over AMI); its trunk Uniqueid.
    ``message``: an audio file the caller records as a voice message when nobody answers."""
    assert gw.pbx is not None
    fields = [("CallerID", caller or "withheld"), ("To", to), ("RingTime", f"{ring_time:g}")]
    if answer:
        fields.append(("Answer", answer))
    if message is not None:
        fields.append(("Message", str(message)))
    reply = await gw.pbx.client.action("SimIncoming", fields)
    assert reply.ok, reply
    return reply.get("Uniqueid") or ""
