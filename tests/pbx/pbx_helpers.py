"""Helpers for the PBX tests: constants, a raw AMI socket client for wire-level checks, phone
books, a PbxConfig pointing at a simulator. Every wait is bounded."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mailgw.config import AmiConfig, PbxConfig
from mailgw.pbx.ami import Message, Parser
from mailgw.pbx.phones import PhoneBook, parse_phone_book

SCALE = 0.02  # simulated time runs 50x faster: "answers after 1 s" takes 20 ms
USER, SECRET = "mailgw", "mailgw-secret"
CAPTURES = Path(__file__).parent / "captures"
WAIT = 5.0  # upper bound for any single wait in these tests


class RawAmi:
    """A bare AMI client on a real socket: sends exactly what a test writes, keeps every message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = Parser(expect_banner=True)
        self.inbox: deque[Message] = deque()
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> RawAmi:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, *pairs: tuple[str, str]) -> None:
        self.writer.write("".join(f"{k}: {v}\r\n" for k, v in pairs).encode() + b"\r\n")

    async def _fill(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        if not data:
            self.eof = True
            raise EOFError("server closed the connection")
        self.inbox.extend(self.parser.feed(data))

    async def next(self, timeout: float = WAIT) -> Message:
        while not self.inbox:
            await self._fill(timeout)
        return self.inbox.popleft()

    async def until(self, predicate: Callable[[Message], bool], timeout: float = WAIT) -> tuple[Message, list[Message]]:
        """The first message matching ``predicate`` and every message before it."""
        before: list[Message] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.next(max(0.01, deadline - loop.time()))
            if predicate(msg):
                return msg, before
            before.append(msg)

    async def response(self, action_id: str | None = None, timeout: float = WAIT) -> tuple[Message, list[Message]]:
        return await self.until(lambda m: m.is_response and (action_id is None or m.action_id == action_id),
                                timeout)

    async def event(self, name: str, timeout: float = WAIT, **fields: str) -> Message:
        msg, _ = await self.until(
            lambda m: m.event == name and all(m.get(k) == v for k, v in fields.items()), timeout)
        return msg

    async def login(self, events: str = "on") -> Message:
        self.send(("Action", "Login"), ("ActionID", "login"), ("Username", USER), ("Secret", SECRET),
                  ("Events", events))
        reply, _ = await self.response("login")
        assert reply.get("Message") == "Authentication accepted", reply
        return reply

    async def wait_closed(self, timeout: float = WAIT) -> None:
        while not self.eof:
            try:
                await self._fill(timeout)
            except EOFError:
                return

    def close(self) -> None:
        self.writer.close()


def phone_book(phones: dict[str, Any], default: Any = None, talk_time: float = 20) -> PhoneBook:
    raw: dict[str, Any] = {"talk_time": talk_time, "phones": phones}
    if default is not None:
        raw["default"] = default
    return parse_phone_book(raw)


def pbx_config(port: int) -> PbxConfig:
    return replace(PbxConfig(), ami=AmiConfig(host="127.0.0.1", port=port, username=USER, secret=SECRET))
