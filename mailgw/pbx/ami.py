"""The AMI (Asterisk Manager Interface) wire format: messages, an incremental parser, encoding.

AMI is a line protocol over TCP. After connecting, the server sends one banner line
(``Asterisk Call Manager/11.0.0\\r\\n``, with no blank line after it). From then on both sides
exchange *messages*: ``Key: Value\\r\\n`` lines ended by an empty ``\\r\\n``. A message is one of

* an action (client to server): first header ``Action:``;
* a response to an action: ``Response: Success|Error|Goodbye``, with the request's ``ActionID``;
* an event: ``Event: <Name>``. Some events also carry ``Response:`` (``OriginateResponse``) or
  ``ActionID:`` (items of list actions), so **an event is recognised by ``Event:`` first**.

What this module gets right, because real servers and clients depend on it:

* Header names are matched without regard to case on input (``action: ping`` works), but the
  spelling is kept exactly as given on output (``ActionID``, ``Cause-txt``, ``CID-CallingPres``).
* Headers are ordered and may repeat (``Variable:`` in Originate, ``Output:`` in Command), so a
  message is a list of pairs, not a dict. ``get`` returns the first value, ``getall`` every one.
* A value may itself contain ``": "``; lines are split on the *first* ``": "`` only.
* An empty value is written with its trailing space (``AccountCode: \\r\\n``).
* One ``recv()`` may hold several messages or end in the middle of one; ``Parser`` buffers and
  splits on ``\\r\\n\\r\\n``.
* Values written by us must not contain CR or LF: a caller ID or number with an embedded line
  break would inject headers (or whole actions). ``Message.encode`` refuses them.

The parser sits on the hot path of both the driver and the simulator, so it avoids per-message
regexes and builds the case-insensitive index lazily: most events are only ever asked for their
``Event:`` name (the first header), and for those no index is built at all.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Mapping
from typing import Callable, overload

BANNER_PREFIX = "Asterisk Call Manager/"
EOL = "\r\n"
END_OF_MESSAGE = "\r\n\r\n"

Field = tuple[str, str]
_SECRET_KEYS = frozenset({"secret", "key"})
_SCAN_LIMIT = 24  # messages up to this many headers are searched in place, longer ones indexed
_UNKNOWN = object()  # Message._find: only the split fields can tell


class Message:
    """One AMI message: ordered ``(key, value)`` pairs with case-insensitive lookup.

    Treat instances as immutable once built; build new ones with ``Message([...])`` or
    ``msg.with_fields(...)``.
    """

    __slots__ = ("_pairs", "_index", "_block", "_lower")

    def __init__(self, fields: Iterable[Field] | Mapping[str, str] = ()) -> None:
        if isinstance(fields, Mapping):
            fields = fields.items()
        self._pairs: list[Field] | None = [(str(k), "" if v is None else str(v)) for k, v in fields]
        self._index: dict[str, str] | None = None
        self._block: str | None = None
        self._lower: str | None = None

    @classmethod
    def _trusted(cls, fields: list[Field]) -> Message:
        """Wrap an already well-formed list without copying (parser and builders)."""
        msg = object.__new__(cls)
        msg._pairs = fields
        msg._index = None
        msg._block = None
        msg._lower = None
        return msg

    @classmethod
    def _received(cls, block: str) -> Message:
        """A message as it came off the wire, split into fields only when something needs them
        all: most events are asked for two or three headers, found in the text itself."""
        msg = object.__new__(cls)
        msg._pairs = None
        msg._index = None
        msg._block = block
        msg._lower = None
        return msg

    @property
    def _fields(self) -> list[Field]:
        pairs = self._pairs
        if pairs is None:
            pairs = self._pairs = _split_fields(self._block or "")
        return pairs

    def _find(self, key: str) -> str | None | object:
        """``get(key)`` read from the text of a received message: the value, None when no line
        has the key, or _UNKNOWN when only splitting the fields can tell (non-ASCII text, whose
        lower case may differ in length)."""
        block = self._block
        assert block is not None
        lower = self._lower
        if lower is None:
            if not block.isascii():
                return _UNKNOWN
            lower = self._lower = block.lower()
        wanted = key.lower()
        size = len(wanted)
        colon: int | None = size if lower.startswith(wanted + ":") else None  # the first line's key
        needle, start = EOL + wanted + ":", 0
        while True:
            if colon is None:
                found = lower.find(needle, start)
                if found < 0:
                    return None
                colon = found + 2 + size
            after = block[colon + 1:colon + 2]
            if after == " ":  # "Key: value"
                end = block.find(EOL, colon + 2)
                return block[colon + 2:] if end < 0 else block[colon + 2:end]
            if after == "" or block.startswith(EOL, colon + 1):  # "Key:" with nothing after it
                return ""
            start, colon = colon, None  # "Key:x" is another key's line: look further on

    # --- lookup ----------------------------------------------------------------------------------

    def _lookup(self) -> dict[str, str]:
        index = self._index
        if index is None:
            index = {}
            for key, value in self._fields:
                index.setdefault(key.lower(), value)
            self._index = index
        return index

    @overload
    def get(self, key: str) -> str | None: ...

    @overload
    def get(self, key: str, default: str) -> str: ...

    def get(self, key: str, default: str | None = None) -> str | None:
        """First value of ``key`` (any case), or ``default``."""
        if self._pairs is None:
            found = self._find(key)
            if found is not _UNKNOWN:
                return default if found is None else found  # type: ignore[return-value]
        index = self._index
        fields = self._fields
        if index is None and len(fields) <= _SCAN_LIMIT:
            # An in-order scan beats building the index for the one or two lookups most messages
            # get. Comparing lengths first keeps lower() off nearly every non-matching header.
            size = len(key)
            wanted = None
            for k, v in fields:
                if k == key:
                    return v
                if len(k) == size:
                    if wanted is None:
                        wanted = key.lower()
                    if k.lower() == wanted:
                        return v
            return default
        if index is None:
            index = self._lookup()
        return index.get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._lookup()

    def getall(self, key: str) -> list[str]:
        """Every value of a repeated header, in wire order."""
        wanted = key.lower()
        return [v for k, v in self._fields if k.lower() == wanted]

    def items(self) -> list[Field]:
        return list(self._fields)

    def keys(self) -> list[str]:
        return [k for k, _ in self._fields]

    def __iter__(self) -> Iterator[Field]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def lines(self) -> list[str]:
        """The message as text lines without CRLF (``AccountCode: `` keeps its space)."""
        return [f"{k}: {v}" for k, v in self._fields]

    # --- kind ------------------------------------------------------------------------------------

    @property
    def event(self) -> str | None:
        """The event name, or None when this is not an event. Checked before ``Response:``."""
        block = self._block
        if self._pairs is None and block is not None:
            if block.startswith("Event: "):  # where Asterisk always puts it
                end = block.find(EOL)
                return block[7:] if end < 0 else block[7:end]
            if block.startswith("Response: "):
                return None
        fields = self._fields
        if fields:
            first = fields[0][0]
            if first == "Event":  # where Asterisk always puts it
                return fields[0][1]
            if first == "Response":  # a response: no need to look further
                return None
        return self._lookup().get("event")

    @property
    def is_event(self) -> bool:
        return self.event is not None

    @property
    def is_response(self) -> bool:
        """A reply to an action. ``OriginateResponse`` carries ``Response:`` but is an event."""
        return self.event is None and self.get("Response") is not None

    @property
    def response(self) -> str | None:
        return self.get("Response")

    @property
    def action(self) -> str | None:
        return self.get("Action")

    @property
    def action_id(self) -> str | None:
        if self._pairs is None:
            return self.get("ActionID")
        fields = self._fields
        if len(fields) > 1 and fields[1][0] == "ActionID":  # the 2nd line of every response
            return fields[1][1]
        return self.get("ActionID")

    @property
    def message(self) -> str | None:
        return self.get("Message")

    @property
    def ok(self) -> bool:
        """``Response: Success`` (or ``Goodbye`` to a Logoff)."""
        return (self.get("Response") or "").lower() in ("success", "goodbye")

    # --- building --------------------------------------------------------------------------------

    def with_fields(self, *extra: Field) -> Message:
        return Message._trusted(self._fields + list(extra))

    def encode(self) -> bytes:
        """The message on the wire, UTF-8, ending in the blank line.

        Raises ValueError when a key or value would break the framing (CR/LF anywhere, ``:`` or
        an empty key), since that is how header injection would get in.
        """
        fields = self._fields
        text = "".join([f"{k}: {v}\r\n" for k, v in fields]) + "\r\n"
        # Exactly one CR and one LF per line plus the terminator, else a value smuggled a break.
        if text.count("\n") != len(fields) + 1 or text.count("\r") != len(fields) + 1:
            raise ValueError("AMI header names and values must not contain CR or LF")
        for key, _ in fields:
            if not key or ":" in key or key != key.strip():
                raise ValueError(f"invalid AMI header name {key!r}")
        return text.encode("utf-8")

    # --- dunder ----------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._fields == other._fields

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container; compare by value

    def __repr__(self) -> str:
        # Never show credentials, even in a traceback or a debug log line.
        head = ", ".join(f"{k}={'***' if k.lower() in _SECRET_KEYS else repr(v)}" for k, v in self._fields[:4])
        more = f", … +{len(self._fields) - 4}" if len(self._fields) > 4 else ""
        return f"Message({head}{more})"


def action(name: str, fields: Iterable[Field] | Mapping[str, str] = (), **headers: object) -> Message:
    """Build an action: ``Action: name`` first, then ``fields`` (pairs may repeat), then kwargs.

    ``None`` values are left out; booleans become ``true``/``false`` as Asterisk spells them.
    """
    pairs: list[Field] = [("Action", name)]
    if fields:
        items = fields.items() if hasattr(fields, "items") else fields
        for key, value in items:  # type: ignore[union-attr]
            if value is not None:
                pairs.append((key, _header_value(value)))
    for key, value in headers.items():
        if value is not None:
            pairs.append((key, _header_value(value)))
    return Message._trusted(pairs)


def _header_value(value: object) -> str:
    if type(value) is str:
        return value  # type: ignore[return-value]
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def parse_block(block: str) -> Message:
    """One message from its text without the final blank line (CRLF-separated lines)."""
    return Message._trusted(_split_fields(block))


def _has_fields(block: str) -> bool:
    """Whether ``_split_fields(block)`` finds a header: a line with ": " or ending in ":"."""
    return ": " in block or ":\r\n" in block or block.endswith(":")


def _split_fields(block: str) -> list[Field]:
    fields: list[Field] = []
    append = fields.append
    for line in block.split(EOL):
        key, sep, value = line.partition(": ")
        if sep:
            append((key, value))
        elif line.endswith(":"):  # "Key:" with nothing after it: an empty value, leniently
            append((line[:-1], ""))
        # anything else (empty line, stray text) carries no header: skip it
    return fields


_ACTION_ID_LINE = EOL + "ActionID: "


class Parser:
    """Turns a byte stream into Messages. Feed it every chunk ``recv()`` returns.

    ``expect_banner=True`` (client side) consumes the server's first line
    (``Asterisk Call Manager/11.0.0``) and keeps it in ``banner``; the banner has no blank line
    after it, so it must be taken off before splitting messages.
    """

    __slots__ = ("_buffer", "_decoder", "_want_banner", "banner")

    def __init__(self, *, expect_banner: bool = False) -> None:
        self._buffer = ""
        # Incremental: a multi-byte UTF-8 character may be split across two recv() chunks.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._want_banner = expect_banner
        self.banner: str | None = None

    def feed(self, data: bytes, wanted: Callable[[str], bool] | None = None) -> list[Message]:
        """The whole messages completed by ``data``. With ``wanted``, an event whose name (its
        first line, as Asterisk writes it) it rejects is dropped unparsed: a PBX sends many events
        per call (Newexten, DeviceStateChange, ...) that no listener reads. Events that carry an
        ActionID are always kept: they may be the items of a list reply whose start is in this
        same chunk, not dispatched yet."""
        text = self._decoder.decode(data)
        if self._buffer:
            text = self._buffer + text
        if self._want_banner:
            text = self._take_banner(text)
            if self._want_banner:  # banner line not complete yet
                self._buffer = text
                return []
        if END_OF_MESSAGE not in text:
            self._buffer = text
            return []
        blocks = text.split(END_OF_MESSAGE)
        self._buffer = blocks.pop()
        messages = []
        for block in blocks:
            if block:
                if wanted is not None and block.startswith("Event: ") and _ACTION_ID_LINE not in block:
                    end = block.find(EOL)
                    if not wanted(block[7:end] if end >= 0 else block[7:]):
                        continue
                if block.startswith("Event: ") or _has_fields(block):  # stray blank lines carry nothing
                    messages.append(Message._received(block))
        return messages

    def _take_banner(self, text: str) -> str:
        line, sep, rest = text.partition(EOL)
        if not sep:
            if len(text) < len(BANNER_PREFIX) and BANNER_PREFIX.startswith(text):
                return text  # still arriving
            if not text.startswith(BANNER_PREFIX):
                self._want_banner = False  # a server without a banner: parse it as messages
            return text
        self._want_banner = False
        if line.startswith(BANNER_PREFIX) or ": " not in line:
            self.banner = line
            return rest
        return text

    @property
    def pending(self) -> int:
        """Characters buffered that do not form a whole message yet."""
        return len(self._buffer)


def banner_version(banner: str | None) -> str | None:
    """``11.0.0`` from ``Asterisk Call Manager/11.0.0``."""
    if not banner or "/" not in banner:
        return None
    return banner.rsplit("/", 1)[1].strip()
