"""The AMI wire format against real Asterisk traffic: every recv() chunk of every capture must
reassemble into exactly the messages the transcript shows, however the bytes are split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.pbx.ami import Message, Parser, action, banner_version, parse_block

from .pbx_helpers import CAPTURES


JSONL = sorted(CAPTURES.glob("*.jsonl"))


def server_chunks(path: Path) -> list[bytes]:
    chunks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["dir"] == "recv":
            chunks.append(record["data"].encode("utf-8"))
    return chunks


def transcript_messages(path: Path) -> tuple[str, list[list[str]]]:
    """The banner and the server's messages (as lines) from a ``.txt`` transcript."""
    banner = None
    messages: list[list[str]] = []
    current: list[str] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line == "<<<":
            messages.append(current)
            current = []
        elif line.startswith("<<< "):
            if banner is None:
                banner = line[4:]
            else:
                current.append(line[4:])
    assert banner is not None and not current
    return banner, messages


def parse_all(chunks: list[bytes]) -> tuple[Parser, list[Message]]:
    parser = Parser(expect_banner=True)
    messages: list[Message] = []
    for chunk in chunks:
        messages.extend(parser.feed(chunk))
    return parser, messages


def test_captures_are_present() -> None:
    assert len(JSONL) >= 30
    assert sum(len(server_chunks(p)) for p in JSONL) == 366  # the README's count


@pytest.mark.parametrize("path", JSONL, ids=lambda p: p.stem)
def test_recv_chunks_reassemble_into_the_transcript(path: Path) -> None:
    banner, expected = transcript_messages(path.with_suffix(".txt"))
    parser, messages = parse_all(server_chunks(path))
    assert parser.banner == banner == "Asterisk Call Manager/11.0.0"
    assert [m.lines() for m in messages] == expected
    assert parser.pending == 0


@pytest.mark.parametrize("path", JSONL, ids=lambda p: p.stem)
def test_any_split_of_the_stream_gives_the_same_messages(path: Path) -> None:
    stream = b"".join(server_chunks(path))
    _, whole = parse_all([stream])
    rng = random.Random(path.stem)
    cuts = sorted(rng.sample(range(1, len(stream)), k=min(len(stream) - 1, len(stream) // 7)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    _, split = parse_all(pieces)
    assert split == whole
    _, bytewise = parse_all([stream[i:i + 1] for i in range(min(len(stream), 3000))])
    assert bytewise == whole[:len(bytewise)]


@pytest.mark.parametrize("path", JSONL, ids=lambda p: p.stem)
def test_encoding_a_parsed_message_gives_the_original_bytes(path: Path) -> None:
    stream = b"".join(server_chunks(path))
    _, messages = parse_all([stream])
    banner = b"Asterisk Call Manager/11.0.0\r\n"
    assert stream.startswith(banner)
    assert b"".join(m.encode() for m in messages) == stream[len(banner):]


def test_events_are_told_from_responses_by_event_first() -> None:
    originate_response = parse_block(
        "Event: OriginateResponse\r\nPrivilege: call,all\r\nActionID: a1\r\nResponse: Failure\r\n"
        "Channel: Local/2001@ami-test\r\nReason: 5")
    assert originate_response.is_event and not originate_response.is_response
    assert originate_response.event == "OriginateResponse"
    assert originate_response.response == "Failure"
    reply = parse_block("Response: Success\r\nActionID: a1\r\nMessage: Originate successfully queued")
    assert reply.is_response and not reply.is_event and reply.ok


def test_lookup_ignores_case_keeps_order_and_repeats() -> None:
    msg = parse_block("Action: Originate\r\nvariable: A=1\r\nVariable: B=2\r\nmessage: x: y: z\r\nAccountCode: ")
    assert msg.get("ACTION") == "Originate" and msg["action"] == "Originate"
    assert msg.getall("VARIABLE") == ["A=1", "B=2"]
    assert msg.get("Variable") == "A=1"
    assert msg.get("Message") == "x: y: z"  # split on the first ": " only
    assert msg.get("accountcode") == ""
    assert "accountCode" in msg and "Nope" not in msg
    assert msg.get("Nope") is None and msg.get("Nope", "d") == "d"
    with pytest.raises(KeyError):
        msg["Nope"]
    assert msg.keys() == ["Action", "variable", "Variable", "message", "AccountCode"]


def test_output_spelling_and_empty_values() -> None:
    msg = Message([("Event", "Hangup"), ("AccountCode", ""), ("Cause-txt", "Normal Clearing")])
    assert msg.encode() == b"Event: Hangup\r\nAccountCode: \r\nCause-txt: Normal Clearing\r\n\r\n"


@pytest.mark.parametrize("bad", ["x\r\nAction: Originate", "x\nAction: Hangup", "x\ry"])
def test_encode_refuses_header_injection(bad: str) -> None:
    with pytest.raises(ValueError):
        action("Originate", CallerID=bad).encode()
    with pytest.raises(ValueError):
        Message([(bad, "v")]).encode()


def test_action_builder() -> None:
    msg = action("Originate", [("Variable", "A=1"), ("Variable", "B=2")], Async=True, Data=None, Priority=1)
    assert msg.items() == [("Action", "Originate"), ("Variable", "A=1"), ("Variable", "B=2"),
                           ("Async", "true"), ("Priority", "1")]


def test_utf8_split_across_chunks_and_several_messages_per_chunk() -> None:
    data = "Event: Newchannel\r\nCallerIDName: 山田\r\n\r\nEvent: Hangup\r\nCause: 16\r\n\r\n".encode()
    cut = data.index("山".encode()) + 1  # in the middle of a multi-byte character
    parser = Parser()
    first = parser.feed(data[:cut])
    rest = parser.feed(data[cut:])
    assert first == []
    assert [m.event for m in rest] == ["Newchannel", "Hangup"]
    assert rest[0]["CallerIDName"] == "山田"


def test_unwanted_events_are_dropped_but_responses_and_list_items_kept() -> None:
    data = (b"Event: Newexten\r\nChannel: Local/2001@x-0001;1\r\n\r\n"
            b"Response: Success\r\nActionID: 7\r\nEventList: start\r\n\r\n"
            b"Event: ExtensionStatus\r\nActionID: 7\r\nExten: 2001\r\n\r\n"  # a list item: kept
            b"Event: DeviceStateChange\r\nDevice: PJSIP/2001\r\n\r\n"
            b"Event: Hangup\r\nUniqueid: 1.1\r\n\r\n")
    kept = Parser().feed(data, wanted=lambda name: name == "Hangup")
    assert [(m.event, m.get("ActionID")) for m in kept] == [(None, "7"), ("ExtensionStatus", "7"), ("Hangup", None)]
    assert [m.event for m in Parser().feed(data)] == [
        "Newexten", None, "ExtensionStatus", "DeviceStateChange", "Hangup"]


def test_banner_split_and_banner_sharing_a_chunk() -> None:
    parser = Parser(expect_banner=True)
    assert parser.feed(b"Asterisk Call Man") == []
    assert parser.feed(b"ager/11.0.0\r\nResponse: Success\r\nActionID: 1\r\n\r\nEvent: X\r\n") == [
        Message([("Response", "Success"), ("ActionID", "1")])]
    assert parser.banner == "Asterisk Call Manager/11.0.0"
    assert banner_version(parser.banner) == "11.0.0"
    assert parser.feed(b"\r\n")[0].event == "X"


def test_repr_never_shows_a_secret() -> None:
    msg = action("Login", Username="mailgw", Secret="s3cret-value")
    assert "s3cret-value" not in repr(msg)


# --- a received message reads its headers from its text -----------------------------------------

_KEYS = ["Event", "event", "EVENT", "ActionID", "actionid", "Response", "Channel", "Key", "Key:x", "Ké", "A B", ""]
_LINE = st.one_of(
    st.builds("{}: {}".format, st.sampled_from(_KEYS), st.sampled_from(["", "v", "a: b", "x:", " ", "é", "Key: y"])),
    st.builds("{}:".format, st.sampled_from(_KEYS)),
    st.sampled_from(["", "stray", "Key:x", ":", ": ", "Key :v", "\r", "Key:\rv"]))


@settings(max_examples=3000, deadline=None)
@given(st.lists(_LINE, min_size=1, max_size=8))
def test_a_received_message_reads_every_header_as_the_split_fields_do(lines: list[str]) -> None:
    block = "\r\n".join(lines)
    received, split = Message._received(block), parse_block(block)
    for key in ["Event", "event", "ActionID", "Response", "Channel", "Key", "key", "Ké", "A B", "Missing", ""]:
        assert received.get(key) == split.get(key), key
        assert received.get(key, "-") == split.get(key, "-"), key
    assert (received.event, received.action_id) == (split.event, split.action_id)
    assert received.items() == split.items() and received == split
