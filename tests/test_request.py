"""request: real MIME mails in, an ExchangeRequest, None (ordinary mail) or an exact refusal out."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgw.config import Config, PolicyConfig, RequestConfig, SmtpConfig
from mailgw.directory import Directory, Person
from mailgw.numbering import DIAL_STRING, Network
from mailgw.request import (
    FIELDS, Action, CamponMode, ExchangeRequest, Part, PartKind, Priority, Source, Trigger, parse_request,
)
from mailgw.status import Refused

PEOPLE = Directory(people=(
    Person("alice@a.example", "Alice Archer", "2000", "en"),
    Person("bob@a.example", "Bob Baker", "2001", "en"),
    Person("yamada@a.example", "山田 太郎", "2002", "ja"),
    Person("carol@a.example", "Carol Chen", "2003", "en"),
))
CONFIG = Config()
JST = timezone(timedelta(hours=9))
NOW = datetime(2025, 4, 1, 9, 0, tzinfo=JST)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "request-format.md"


# --- building mails ------------------------------------------------------------------------------

def mail(body: str = "", *, headers=(), charset: str = "utf-8", cte: str | None = None,
         sender: str = "alice@a.example", to: str = "bob@a.example", subject: str = "call") -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = "<m1@a.example>"
    for name, value in dict(headers).items() if isinstance(headers, dict) else headers:
        message[name] = value
    message.set_content(body, charset=charset, cte=cte)
    return message


def with_yaml(message: EmailMessage, text: str, *, charset: str = "utf-8", cte: str | None = None) -> EmailMessage:
    message.add_attachment(text.encode(charset), maintype="application", subtype="x-cti+yaml",
                           disposition="inline", cte=cte, params={"charset": charset})
    return message


def raw_mail(head: str, body: bytes | str = b"") -> bytes:
    """A mail written byte by byte, for what EmailMessage refuses to produce."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    lines = ["From: alice@a.example", "To: cti@a.example", "Subject: call", *head.strip("\n").split("\n")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def to_bytes(message: EmailMessage | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.as_bytes(policy=email_policy.SMTP)


def parse(message: EmailMessage | bytes, *, rcpt: str = "bob@a.example", mail_from: str = "alice@a.example",
          config: Config = CONFIG, directory: Directory = PEOPLE, now: datetime = NOW) -> ExchangeRequest | None:
    return parse_request(to_bytes(message), mail_from=mail_from, rcpt_to=rcpt, directory=directory, config=config,
                         now=now)


def refusal(message: EmailMessage | bytes, **kwargs) -> str:
    with pytest.raises(Refused) as caught:
        parse(message, **kwargs)
    return str(caught.value)


def to_cti(body: str = "", **kwargs) -> ExchangeRequest | None:
    return parse(mail(body, to="cti@a.example", **kwargs), rcpt="cti@a.example")


def refused_at_cti(body: str = "", **kwargs) -> str:
    return refusal(mail(body, to="cti@a.example", **kwargs), rcpt="cti@a.example")


# --- ordinary mail -------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    "Hi Bob,\n\nlunch at 12?\n",
    "Dear Bob: thanks!\n",
    "Meeting at 10:30, room 2.\n",
    "\n\nSubject: the report\nSent: yesterday\n\nsee below",  # key: value lines, but none is a field
    "http://example.com/to: 2001\n",
    "",
])
def test_ordinary_mail_to_a_person_is_not_a_request(body):
    assert parse(mail(body)) is None


def test_ordinary_multipart_mail_with_attachments_is_not_a_request():
    message = mail("Photos attached.")
    message.add_alternative("<p>Photos attached.</p>", subtype="html")
    message.add_attachment(b"\x89PNG...", maintype="image", subtype="png", filename="a.png")
    assert parse(message) is None


def test_ordinary_mail_from_a_stranger_is_not_a_request():
    assert parse(mail("hello", sender="zed@b.example"), mail_from="zed@b.example") is None


def test_ordinary_mail_in_a_broken_charset_is_still_delivered():
    body = "こんにちは、山田です。".encode("shift_jis")
    assert parse(raw_mail("To: bob@a.example\nContent-Type: text/plain; charset=utf-8", body)) is None
    assert parse(raw_mail("Content-Type: text/plain; charset=x-klingon", b"nuqneH")) is None


def test_ordinary_mail_with_a_broken_structure_or_over_the_limits_is_still_delivered():
    no_boundary = raw_mail("MIME-Version: 1.0\nContent-Type: multipart/mixed", "hello")
    assert parse(no_boundary) is None
    many = mail("150 photos")
    for n in range(150):
        many.add_attachment(b"x", maintype="image", subtype="png", filename=f"{n}.png")
    assert parse(many) is None


@pytest.mark.parametrize("rcpt", ["bob@a.example", "cti@a.example"])
def test_our_own_result_mails_are_never_requests(rcpt):
    result = mail("to: 2002\n\nYour call was answered.",
                  headers={"X-CTI-Request": "abc123", "X-CTI-Outcome": "answered", "X-CTI-Status": "2.0.0"})
    assert parse(result, rcpt=rcpt) is None


def test_auto_replies_and_reports_are_never_requests():
    auto = mail("to: 2002\n\nI am on holiday.", headers={"Auto-Submitted": "auto-replied"})
    assert parse(auto, rcpt="cti@a.example") is None
    report = raw_mail('Content-Type: multipart/report; report-type=delivery-status; boundary="b"',
                      "--b\r\nContent-Type: text/plain\r\n\r\nto: 2002\r\n--b--\r\n")
    assert parse(report, rcpt="cti@a.example") is None


def test_automatically_generated_requests_are_still_requests():
    # Scripts that page someone mark their mail auto-generated; that is exactly who sends requests.
    request = parse(mail("to: 2002", headers={"Auto-Submitted": "auto-generated"}, to="cti@a.example"),
                    rcpt="cti@a.example")
    assert request is not None and request.to_number == "2002"


# --- source 1: the directory ---------------------------------------------------------------------

def test_a_mail_to_a_person_calls_that_person_from_the_senders_phone():
    request = parse(mail("", headers={"X-CTI-Dry-Run": "yes"}))
    assert request is not None
    assert (request.action, request.to_number, request.from_number) == (Action.CONNECT, "2001", "2000")
    assert request.network == Network.EXTENSION
    assert request.sources == {"to": Source.DIRECTORY, "from": Source.DIRECTORY, "dry-run": Source.HEADER}
    assert (request.sender, request.recipient, request.language) == ("alice@a.example", "bob@a.example", "en")


def test_defaults():
    request = to_cti("to: 2001")
    assert request == replace(request, action=Action.CONNECT, trigger=Trigger.ON_RECEIPT, notify=True,
                              monitor=15 * 60.0, monitor_capped=False, retry=False, mode=CamponMode.RETRY, at=None,
                              priority=Priority.NORMAL, confidential=False, scenario_name=None,
                              scenario_inline=None, request_ref=None, dry_run=False)


def test_language_is_the_senders_else_the_gateways():
    assert to_cti("to: 2001", sender="yamada@a.example").language == "ja"
    stranger = parse(mail("to: 2001\nfrom: 2003", sender="zed@b.example", to="cti@a.example"),
                     rcpt="cti@a.example", mail_from="zed@b.example", config=replace(CONFIG, language="ja"))
    assert stranger.language == "ja"
    assert stranger.sender == "zed@b.example"


def test_the_sender_is_the_from_header_else_mail_from():
    no_from = b"To: cti@a.example\r\nSubject: x\r\n\r\nto: 2002\r\n"
    assert parse(no_from, rcpt="cti@a.example", mail_from="Bob@A.Example").sender == "bob@a.example"
    assert parse(no_from, rcpt="cti@a.example", mail_from="bob@a.example").from_number == "2001"
    garbage_from = b"From: <<<>>>@@@ ,,, \"\r\nTo: cti@a.example\r\n\r\nto: 2002\r\n"
    assert parse(garbage_from, rcpt="cti@a.example", mail_from="bob@a.example").sender == "bob@a.example"
    assert refusal(no_from, rcpt="cti@a.example", mail_from="") == \
        "550 5.6.0 field 'from': not given and sender <> is not in the directory"


def test_a_service_mailbox_without_fields_is_refused():
    text = ("550 5.6.0 no request fields found: start the mail with lines such as 'to: 2001', "
            "or use X-CTI-* headers (see the request format guide)")
    assert refused_at_cti("Please call Bob.") == text
    assert refusal(mail("hi", to="CTI@A.Example"), rcpt="CTI@A.Example") == text
    config = replace(CONFIG, requests=RequestConfig(service_mailboxes=("calls", "desk@a.example")))
    assert refusal(mail("hi"), rcpt="desk@a.example", config=config) == text
    assert parse(mail("hi"), rcpt="cti@a.example", config=config) is None  # no longer a service mailbox


def test_recipient_address_is_normalised():
    assert parse(mail("to: 2001"), rcpt="Bob@A.EXAMPLE").recipient == "bob@a.example"


# --- source 2: the command block -----------------------------------------------------------------

def test_a_full_command_block():
    request = to_cti("""
action: camp-on
to: 03-1234-5678
from: 2003
network: public
trigger: on-read
notify: no
monitor: 1h30m
retry: yes
mode: watch
at: 2025-04-02T10:00:00+09:00
priority: express
confidential: yes
scenario: voice-then-connect
request: r-1
dry-run: yes

Hello, this is the text after the block.
to: 9999 is not read here
""")
    assert request.to_json() | {"parts": [], "sources": {}} == {
        "version": 1, "action": "camp-on", "to_number": "0312345678", "from_number": "2003",
        "network": "public", "trigger": "on-read", "notify": False, "monitor": 5400.0, "monitor_capped": False,
        "retry": True, "mode": "watch", "at": "2025-04-02T10:00:00+09:00", "priority": "express",
        "confidential": True, "scenario_name": "voice-then-connect", "scenario_inline": None,
        "request_ref": "r-1", "dry_run": True, "sender": "alice@a.example", "language": "en",
        "recipient": "cti@a.example", "subject": "call", "message_id": "<m1@a.example>", "parts": [],
        "sources": {},
    }
    assert set(request.sources.values()) == {Source.BLOCK}


def test_the_block_ends_at_a_line_that_is_not_key_value():
    request = to_cti("\n\n  to: 2002\nPlease call me at 10:30.\nfrom: 9999\n")
    assert (request.to_number, request.from_number) == ("2002", "2000")


def test_keys_are_case_insensitive_full_width_and_underscored():
    request = to_cti("ＴＯ：２００２\nDry_Run: YES\nPRIORITY : Express\n")
    assert (request.to_number, request.dry_run, request.priority) == ("2002", True, Priority.EXPRESS)


def test_an_unknown_key_in_a_block_is_refused():
    assert refused_at_cti("to: 2002\nxyz: 1\n") == "550 5.6.0 unknown field 'xyz'"
    assert refusal(mail("form: 2000\nto: 2001\n")) == "550 5.6.0 unknown field 'form'"


def test_the_same_key_twice():
    assert to_cti("to: 2002\nto: 2002\n").to_number == "2002"
    assert refused_at_cti("to: 2002\nto: 2003\n") == \
        "550 5.6.0 field 'to': given twice with different values ('2002' in the command block, " \
        "'2003' in the command block)"


def test_an_empty_value_is_refused():
    assert refused_at_cti("to:\n") == "550 5.6.0 field 'to': no value given"


def test_a_text_plain_attachment_is_not_the_body():
    message = EmailMessage()
    message["From"], message["To"] = "alice@a.example", "cti@a.example"
    message.make_mixed()
    message.add_attachment("to: 9999\n", filename="notes.txt")
    message.add_attachment("to: 2002\n", disposition="inline")
    assert parse(message, rcpt="cti@a.example").to_number == "2002"


def test_an_attached_mail_is_never_read_for_fields():
    inner = mail("to: 9999\n", headers={"X-CTI-To": "9999"})
    outer = mail("to: 2002\n\nforwarding this", to="cti@a.example")
    outer.add_attachment(inner)
    request = parse(outer, rcpt="cti@a.example")
    assert request.to_number == "2002"
    assert [p.content_type for p in request.parts] == ["text/plain", "message/rfc822"]
    forwarded = mail("FYI, see the attached mail.")
    forwarded.add_attachment(inner)
    assert parse(forwarded) is None  # ordinary mail, although the attached one was a request


# --- every field and alias, from each explicit source ---------------------------------------------

FUTURE = "2025-04-01T10:00:00+09:00"
SAMPLES = {  # field -> (value to write, attribute, expected)
    "action": ("camp-on", "action", Action.CAMP_ON),
    "to": ("2002", "to_number", "2002"),
    "from": ("2003", "from_number", "2003"),
    "network": ("public", "network", Network.PUBLIC),
    "trigger": ("on-read", "trigger", Trigger.ON_READ),
    "notify": ("no", "notify", False),
    "monitor": ("1h30m", "monitor", 5400.0),
    "retry": ("yes", "retry", True),
    "mode": ("watch", "mode", CamponMode.WATCH),
    "at": (FUTURE, "at", datetime(2025, 4, 1, 10, 0, tzinfo=JST)),
    "priority": ("express", "priority", Priority.EXPRESS),
    "confidential": ("yes", "confidential", True),
    "scenario": ("voice-then-connect", "scenario_name", "voice-then-connect"),
    "request": ("r-123.4_5", "request_ref", "r-123.4_5"),
    "dry-run": ("yes", "dry_run", True),
}
ALL_KEYS = [(spec.name, key) for spec in FIELDS for key in (spec.name, *spec.aliases)]
ASCII_KEYS = [(name, key) for name, key in ALL_KEYS if key.isascii()]


def test_the_samples_cover_every_field():
    assert set(SAMPLES) == {spec.name for spec in FIELDS}


def _check_field(request: ExchangeRequest, name: str, source: Source) -> None:
    _, attribute, expected = SAMPLES[name]
    assert getattr(request, attribute) == expected
    assert request.sources[name] == source


@pytest.mark.parametrize("name, key", ALL_KEYS)
def test_every_field_and_alias_in_the_command_block(name, key):
    value = SAMPLES[name][0]
    base = "" if name == "to" else "to: 2002\n"
    _check_field(to_cti(f"{base}{key}: {value}\n"), name, Source.BLOCK)


@pytest.mark.parametrize("name, key", ASCII_KEYS)
def test_every_field_and_alias_as_a_header(name, key):
    value = SAMPLES[name][0]
    headers = {f"X-CTI-{key.title()}": value}
    if name != "to":
        headers["x-cti-TO"] = "2002"  # header names are case-insensitive
    _check_field(to_cti("", headers=headers), name, Source.HEADER)


@pytest.mark.parametrize("name, key", ALL_KEYS)
def test_every_field_and_alias_in_the_yaml_part(name, key):
    value = SAMPLES[name][0]
    base = "" if name == "to" else "to: '2002'\n"
    message = with_yaml(mail("Details attached.", to="cti@a.example"), f"{base}{key}: {value}\n")
    _check_field(parse(message, rcpt="cti@a.example"), name, Source.YAML)


# --- values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("written, action", [
    ("connect", Action.CONNECT), ("Connect", Action.CONNECT), ("接続", Action.CONNECT),
    ("camp-on", Action.CAMP_ON), ("campon", Action.CAMP_ON), ("camp_on", Action.CAMP_ON),
    ("ＣＡＭＰ－ＯＮ", Action.CAMP_ON),
    ("cancel", Action.CANCEL), ("取消", Action.CANCEL), ("取り消し", Action.CANCEL),
    ("monitor", Action.MONITOR), ("監視", Action.MONITOR),
])
def test_action_words(written, action):
    assert to_cti(f"action: {written}\nto: 2002\nrequest: r1\n").action == action


@pytest.mark.parametrize("written, value", [
    ("yes", True), ("YES", True), ("true", True), ("on", True), ("1", True), ("はい", True), ("ｙｅｓ", True),
    ("no", False), ("No", False), ("false", False), ("off", False), ("0", False), ("いいえ", False),
])
def test_yes_and_no(written, value):
    request = to_cti(f"to: 2002\nnotify: {written}\nretry: {written}\nconfidential: {written}\ndry-run: {written}\n")
    assert (request.notify, request.retry, request.confidential, request.dry_run) == (value,) * 4


@pytest.mark.parametrize("line, reply", [
    ("notify: maybe", "550 5.6.0 field 'notify': 'maybe' is not yes or no"),
    ("action: dance", "550 5.6.0 field 'action': 'dance' is not one of connect, camp-on, cancel, monitor"),
    ("network: pstn", "550 5.6.0 field 'network': 'pstn' is not one of extension, toll, public"),
    ("trigger: later", "550 5.6.0 field 'trigger': 'later' is not one of on-receipt, on-read"),
    ("mode: loop", "550 5.6.0 field 'mode': 'loop' is not one of retry, watch"),
    ("priority: high", "550 5.6.0 field 'priority': 'high' is not one of normal, express"),
    ("monitor: 5 minutes later", "550 5.6.0 field 'monitor': '5 minutes later' is not a duration"),
    ("monitor: 0s", "550 5.6.0 field 'monitor': '0s' is not a duration longer than zero"),
    ("monitor: -5m", "550 5.6.0 field 'monitor': '-5m' is not a duration longer than zero"),
    ("at: tomorrow", "550 5.6.0 field 'at': 'tomorrow' is not an ISO 8601 date-time (e.g. 2025-04-01T09:30+09:00)"),
    ("at: 2025-04-01T08:58:00+09:00", "550 5.6.0 field 'at': 2025-04-01T08:58:00+09:00 is in the past"),
    ("scenario: Voice Then", "550 5.6.0 field 'scenario': 'Voice Then' is not a scenario name "
                             "(a-z, 0-9 and '-', at most 64)"),
    ("scenario: ../etc/passwd", "550 5.6.0 field 'scenario': '../etc/passwd' is not a scenario name "
                                "(a-z, 0-9 and '-', at most 64)"),
    ("request: a b", "550 5.6.0 field 'request': 'a b' is not a request id "
                     "(letters, digits, '.', '_', '-', at most 64)"),
    ("to: abc", "550 5.6.0 field 'to': 'abc' is not a phone number"),
    ("to: 2001;2002", "550 5.6.0 field 'to': '2001;2002' is not a phone number"),
    ("from: 0312345678&", "550 5.6.0 field 'from': '0312345678&' is not a phone number"),
    ("to: zed@a.example", "550 5.6.0 field 'to': zed@a.example is not in the directory"),
    ("to: Zed <zed@b.example>", "550 5.6.0 field 'to': zed@b.example is not in the directory"),
    ("to: @", "550 5.6.0 field 'to': '@' is not in the directory"),
])
def test_values_that_cannot_be_understood(line, reply):
    base = "" if line.startswith("to:") else "to: 2002\n"
    assert refused_at_cti(f"{base}{line}\n") == reply


def test_at_a_minute_ago_is_still_now():
    assert to_cti("to: 2002\nat: 2025-04-01T08:59:30+09:00").at == NOW - timedelta(seconds=30)


def test_at_without_offset_is_local_time():
    request = to_cti("to: 2002\nat: 2099-01-01T10:00")
    assert request.at == datetime(2099, 1, 1, 10, 0).astimezone()
    assert request.at.tzinfo is not None
    assert to_cti("to: 2002\nat: 2099-01-01").at == datetime(2099, 1, 1).astimezone()
    assert to_cti("to: 2002\nat: ２０９９－０１－０１Ｔ１０：００Ｚ").at == datetime(2099, 1, 1, 10, tzinfo=timezone.utc)


@pytest.mark.parametrize("written, seconds, capped", [
    ("5m", 300.0, False), ("90s", 90.0, False), ("1h30m", 5400.0, False), ("300", 300.0, False),
    ("８h", 8 * 3600.0, False), ("10h", 8 * 3600.0, True), ("99999999h", 8 * 3600.0, True),
])
def test_monitor_is_a_duration_capped_by_config(written, seconds, capped):
    request = to_cti(f"to: 2002\nmonitor: {written}")
    assert (request.monitor, request.monitor_capped) == (seconds, capped)


def test_numbers_are_normalised_and_classified():
    request = to_cti("to: ０３－１２３４－５６７８\nfrom: +81 90 1234 5678")
    assert (request.to_number, request.from_number, request.network) == ("0312345678", "09012345678",
                                                                        Network.PUBLIC)
    assert to_cti("to: 2002").network == Network.EXTENSION
    assert to_cti("to: 2002\nnetwork: toll").network == Network.TOLL  # an explicit network is kept
    premium = replace(CONFIG, policy=PolicyConfig(allow=("XXXX", "0*"), deny=()))
    assert parse(mail("to: 0990123456", to="cti@a.example"), rcpt="cti@a.example",
                 config=premium).network == Network.TOLL


def test_directory_addresses_stand_for_extensions():
    request = to_cti("to: Bob Baker <bob@a.example>\nfrom: CAROL@a.example")
    assert (request.to_number, request.from_number) == ("2001", "2003")


# --- the dialling policy -------------------------------------------------------------------------

def test_both_numbers_are_checked_against_policy():
    assert refused_at_cti("to: 0990123456") == \
        "550 5.7.1 field 'to': number 0990123456 is not allowed by policy (deny '0990*')"
    assert refused_at_cti("to: 2002\nfrom: +1 650 253 0000") == \
        "550 5.7.1 field 'from': number 01016502530000 is not allowed by policy (deny '010*')"
    assert refused_at_cti("to: 123456") == \
        "550 5.7.1 field 'to': number 123456 is not allowed by policy (it matches no allow pattern)"


# --- requiredness --------------------------------------------------------------------------------

def test_connect_needs_from_and_a_stranger_has_no_default():
    stranger = mail("to: 2002", sender="zed@b.example", to="cti@a.example")
    assert refusal(stranger, rcpt="cti@a.example", mail_from="zed@b.example") == \
        "550 5.6.0 field 'from': not given and sender zed@b.example is not in the directory"


def test_connect_and_camp_on_need_to():
    assert refused_at_cti("from: 2000") == \
        "550 5.6.0 field 'to': not given: 'connect' needs the number to call (e.g. 'to: 2001')"
    assert refused_at_cti("action: camp-on") == \
        "550 5.6.0 field 'to': not given: 'camp-on' needs the number to call (e.g. 'to: 2001')"


def test_cancel_needs_a_request_id():
    assert refused_at_cti("action: cancel") == \
        "550 5.6.0 field 'request': not given: 'cancel' needs the id of the request to cancel"
    stranger = mail("action: cancel\nrequest: q1.2", sender="zed@b.example", to="cti@a.example")
    request = parse(stranger, rcpt="cti@a.example", mail_from="zed@b.example")
    assert (request.action, request.request_ref, request.to_number, request.from_number) == \
        (Action.CANCEL, "q1.2", None, None)
    assert request.network is None


def test_monitor_needs_to():
    assert refused_at_cti("action: monitor") == "550 5.6.0 field 'to': not given: 'monitor' needs the number to watch"
    request = to_cti("action: monitor\nto: 2000")  # watching one's own phone is fine
    assert (request.action, request.to_number) == (Action.MONITOR, "2000")


def test_to_and_from_must_differ():
    assert refusal(mail("", headers={"X-CTI-Action": "connect"}, sender="bob@a.example")) == \
        "550 5.6.0 field 'to': 2001 is also the 'from' number: a call needs two different phones"


# --- source 3: headers ---------------------------------------------------------------------------

def test_rfc2047_encoded_header_values():
    encoded = "=?utf-8?b?" + base64.b64encode("０３－１２３４－５６７８".encode()).decode() + "?="
    request = parse(raw_mail(f"X-CTI-To: {encoded}\nX-CTI-Action: =?iso-2022-jp?b?GyRCQFxCMxsoQg==?="),
                    rcpt="cti@a.example")
    assert (request.to_number, request.action) == ("0312345678", Action.CONNECT)


def test_a_raw_utf8_header_is_read():
    assert parse(raw_mail("X-CTI-Action: 接続\nX-CTI-To: 2002"), rcpt="cti@a.example").to_number == "2002"


def test_unknown_and_undecodable_headers_are_refused():
    assert refused_at_cti("", headers={"X-CTI-Foo": "1", "X-CTI-To": "2002"}) == \
        "550 5.6.0 unknown field 'foo' (header X-CTI-Foo)"
    shift_jis_header = b"From: alice@a.example\r\nX-CTI-To: " + "宛先".encode("shift_jis") + b"\r\n\r\n"
    assert refusal(shift_jis_header, rcpt="cti@a.example") == \
        "550 5.6.0 header X-CTI-To: cannot be decoded (write UTF-8 or RFC 2047 encoded words)"


def test_the_same_header_twice():
    assert refused_at_cti("", headers=[("X-CTI-To", "2002"), ("X-CTI-To", "2003")]) == \
        "550 5.6.0 field 'to': given twice with different values ('2002' in X-CTI-To, '2003' in X-CTI-To)"


# --- source 4: the YAML part ---------------------------------------------------------------------

def yaml_request(text: str, **kwargs) -> ExchangeRequest | None:
    return parse(with_yaml(mail("See the attached request.", to="cti@a.example"), text, **kwargs),
                 rcpt="cti@a.example")


def yaml_refusal(text: str, **kwargs) -> str:
    return refusal(with_yaml(mail("See the attached request.", to="cti@a.example"), text, **kwargs),
                   rcpt="cti@a.example")


def test_yaml_values_are_read_as_written():
    request = yaml_request("to: 0312345670\nfrom: +81 90 1234 5678\nnotify: no\nmonitor: 300\n")
    assert (request.to_number, request.from_number, request.notify, request.monitor) == \
        ("0312345670", "09012345678", False, 300.0)  # not octal, '+' kept


def test_an_inline_scenario_keeps_its_yaml_text():
    request = yaml_request("""
to: "2002"
scenario:
  description: Play the voice message, then connect.   # a comment
  steps:
    - play: voice
    - confirm: {ask: "Connect {{ from }} now?", via: mail, timeout: 10m}
    - connect
""")
    assert request.scenario_name is None
    assert yaml.safe_load(request.scenario_inline) == {
        "description": "Play the voice message, then connect.",
        "steps": [{"play": "voice"}, {"confirm": {"ask": "Connect {{ from }} now?", "via": "mail",
                                                  "timeout": "10m"}}, "connect"],
    }
    assert request.sources["scenario"] == Source.YAML


def test_yaml_in_shift_jis_and_base64():
    request = yaml_request("宛先: '2002'\n動作: 接続\n", charset="shift_jis", cte="base64")
    assert (request.to_number, request.action) == ("2002", Action.CONNECT)


@pytest.mark.parametrize("text, reply", [
    ("to: &a '2002'\nfrom: *a\n", "550 5.6.0 the application/x-cti+yaml part: anchors and aliases are not allowed"),
    ('a: &a ["lol","lol"]\nb: &b [*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b]\n',
     "550 5.6.0 the application/x-cti+yaml part: anchors and aliases are not allowed"),
    ("- '2002'\n", "550 5.6.0 the application/x-cti+yaml part must hold a mapping of fields (field: value)"),
    ("", "550 5.6.0 the application/x-cti+yaml part must hold a mapping of fields (field: value)"),
    ("just text", "550 5.6.0 the application/x-cti+yaml part must hold a mapping of fields (field: value)"),
    ("to: [2002\n", "550 5.6.0 the application/x-cti+yaml part is not valid YAML "
                    "(expected ',' or ']', but got '<stream end>' at line 2)"),
    ("to: '2002'\n---\nto: '2003'\n", "550 5.6.0 the application/x-cti+yaml part is not valid YAML "
                                      "(but found another document at line 2)"),
    ("to: '2002'\ncolour: red\n", "550 5.6.0 unknown field 'colour' in the application/x-cti+yaml part"),
    ("steps: [connect]\n", "550 5.6.0 unknown field 'steps' in the application/x-cti+yaml part "
                           "(an inline scenario goes under 'scenario:')"),
    ("[1, 2]: x\n", "550 5.6.0 unknown field '?' in the application/x-cti+yaml part"),
    ("to: ['2002', '2003']\n", "550 5.6.0 field 'to': must be a single value in the application/x-cti+yaml part"),
    ("to: '2002'\nscenario: [play, connect]\n", "550 5.6.0 field 'scenario': must be a scenario name or an inline "
                                                "scenario (a mapping) in the application/x-cti+yaml part"),
    ("to: '2002'\nscenario: {steps: !!python/object/apply:os.system ['true']}\n",
     "550 5.6.0 field 'scenario': not a valid inline scenario (could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system')"),
    ('to: "2002\\r\\nAction: Originate"\n', "550 5.6.0 field 'to': contains a line break or control character"),
])
def test_yaml_problems(text, reply):
    assert yaml_refusal(text) == reply


def test_a_yaml_part_over_64_kib_is_refused():
    text = "to: '2002'\n" + "#" * (64 * 1024) + "\n"
    assert yaml_refusal(text) == "552 5.3.4 the application/x-cti+yaml part is larger than 64 KiB"


def test_a_deeply_nested_yaml_part_is_refused():
    reply = yaml_refusal("to: '2002'\nscenario: " + "[" * 5000 + "]" * 5000 + "\n")
    assert reply.startswith(("552 5.3.4", "550 5.6.0"))


def test_two_yaml_parts_are_refused():
    message = with_yaml(with_yaml(mail("two", to="cti@a.example"), "to: '2002'"), "to: '2002'")
    assert refusal(message, rcpt="cti@a.example") == \
        "550 5.6.0 more than one application/x-cti+yaml part (parts 2 and 3)"


def test_an_undecodable_yaml_part_is_refused():
    message = mail("see attached", to="cti@a.example")
    message.add_attachment("宛先: 2002".encode("shift_jis"), maintype="application", subtype="x-cti+yaml")
    assert refusal(message, rcpt="cti@a.example") == \
        "550 5.6.0 part 2 (application/x-cti+yaml): the text is not valid utf-8"


# --- merging the sources -------------------------------------------------------------------------

def test_the_same_field_from_two_sources_with_different_values():
    assert refused_at_cti("to: 2001\n", headers={"X-CTI-To": "2002"}) == \
        "550 5.6.0 field 'to': given twice with different values ('2001' in the command block, '2002' in X-CTI-To)"
    message = with_yaml(mail("", headers={"X-CTI-To": "2002"}, to="cti@a.example"), "to: '2003'")
    assert refusal(message, rcpt="cti@a.example") == \
        "550 5.6.0 field 'to': given twice with different values " \
        "('2002' in X-CTI-To, '2003' in the application/x-cti+yaml part)"
    message = with_yaml(mail("", headers={"X-CTI-Scenario": "short"}, to="cti@a.example"),
                        "to: '2002'\nscenario: {steps: [connect]}")
    assert refusal(message, rcpt="cti@a.example") == \
        "550 5.6.0 field 'scenario': given twice with different values " \
        "('short' in X-CTI-Scenario, (an inline scenario) in the application/x-cti+yaml part)"


def test_the_same_value_written_differently_is_no_conflict():
    message = with_yaml(mail("to: 03-1234-5678\nmonitor: 5m\n宛先：０３１２３４５６７８\n",
                             headers={"X-CTI-To": "(03) 1234 5678", "X-CTI-Monitor": "300s"}, to="cti@a.example"),
                        "to: +81 3 1234 5678\nmon: 300\n")
    request = parse(message, rcpt="cti@a.example")
    assert (request.to_number, request.monitor) == ("0312345678", 300.0)
    assert request.sources["to"] == Source.BLOCK  # the first source that gave it


def test_a_mail_to_a_person_conflicts_with_another_to():
    assert refusal(mail("to: 2002")) == \
        "550 5.6.0 field 'to': the mail is addressed to bob@a.example (extension 2001) but the command block " \
        "says '2002'"
    assert refusal(mail("", headers={"X-CTI-To": "0312345678"})) == \
        "550 5.6.0 field 'to': the mail is addressed to bob@a.example (extension 2001) but X-CTI-To says '0312345678'"
    request = parse(mail("to: bob@a.example\nmonitor: 5m"))
    assert (request.to_number, request.sources["to"]) == ("2001", Source.BLOCK)


def test_an_explicit_from_replaces_the_senders_number():
    request = parse(mail("from: 090-1234-5678"))
    assert (request.to_number, request.from_number) == ("2001", "09012345678")
    assert request.sources == {"to": Source.DIRECTORY, "from": Source.BLOCK}


# --- charsets and transfer encodings -------------------------------------------------------------

JAPANESE_BLOCK = "宛先：２００２\n発信元：０３−１２３４−５６７８\n動作：接続\n\n山田です。よろしくお願いします。\n"


@pytest.mark.parametrize("body, charset, cte", [
    (JAPANESE_BLOCK, "iso-2022-jp", None),
    (JAPANESE_BLOCK, "shift_jis", None),
    (JAPANESE_BLOCK, "euc-jp", None),
    (JAPANESE_BLOCK, "utf-8", None),
    (JAPANESE_BLOCK, "utf-8", "base64"),
    (JAPANESE_BLOCK, "utf-8", "quoted-printable"),
    (JAPANESE_BLOCK, "shift_jis", "base64"),
    ("to: 2002\nfrom: 03-1234-5678\n\nGrüße aus Köln\n", "iso-8859-1", None),
    ("to: 2002\nfrom: 03-1234-5678\n\nGrüße aus Köln\n", "iso-8859-1", "quoted-printable"),
    ("to: 2002\nfrom: 03-1234-5678\n\nplain\n", "us-ascii", None),
])
def test_charsets(body, charset, cte):
    request = to_cti(body, charset=charset, cte=cte)
    assert (request.to_number, request.from_number) == ("2002", "0312345678")


def test_cp932_from_a_japanese_phone_labelled_shift_jis():
    body = "宛先：０３－１２３４－５６７８\n\n①よろしく".encode("cp932")  # FF0D and ① are CP932, not JIS
    request = parse(raw_mail("Content-Type: text/plain; charset=Shift_JIS", body), rcpt="cti@a.example")
    assert request.to_number == "0312345678"


def test_no_charset_means_utf8():
    body = "宛先：2002\n\nこんにちは".encode("utf-8")
    assert parse(raw_mail("Content-Type: text/plain", body), rcpt="cti@a.example").to_number == "2002"
    assert parse(raw_mail("", body), rcpt="cti@a.example").to_number == "2002"


@pytest.mark.parametrize("head, body, reply", [
    ("Content-Type: text/plain", "to: 2002\n\n山田".encode("shift_jis"),
     "550 5.6.0 part 1 (text/plain): the text is not valid utf-8"),
    ("Content-Type: text/plain; charset=iso-2022-jp", "to: 2002\n\n山田".encode("shift_jis"),
     "550 5.6.0 part 1 (text/plain; charset=iso-2022-jp): the text is not valid iso-2022-jp"),
    ("Content-Type: text/plain; charset=us-ascii", "to: 2002\n\nGrüße".encode("latin-1"),
     "550 5.6.0 part 1 (text/plain; charset=us-ascii): the text is not valid us-ascii"),
    ("Content-Type: text/plain; charset=x-klingon", b"to: 2002\n",
     "550 5.6.0 part 1 (text/plain; charset=x-klingon): unknown charset 'x-klingon'"),
    ("Content-Type: text/plain; charset=base64", b"to: 2002\n",
     "550 5.6.0 part 1 (text/plain; charset=base64): unknown charset 'base64'"),
])
def test_undecodable_requests_are_refused(head, body, reply):
    assert refusal(raw_mail(head, body), rcpt="cti@a.example") == reply
    assert refusal(raw_mail(head, body).replace(b"To: cti@", b"To: bob@")) == reply  # a block, so a request


def test_an_undecodable_body_of_a_header_request_is_refused():
    message = raw_mail("X-CTI-To: 2002\nContent-Type: text/plain; charset=utf-8", "山田".encode("shift_jis"))
    assert refusal(message, rcpt="cti@a.example") == \
        "550 5.6.0 part 1 (text/plain; charset=utf-8): the text is not valid utf-8"


# --- header injection ----------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    raw_mail("X-CTI-To: =?utf-8?q?2002=0D=0AAction=3A_Originate?="),
    raw_mail("X-CTI-To: =?utf-8?q?2002=00?="),
    raw_mail("Content-Type: text/plain", b"to: 20\x0002\n"),
    raw_mail("Content-Type: text/plain", "to: 2002\u2028action: cancel\n"),
])
def test_line_breaks_and_nul_in_values_are_refused(message):
    assert refusal(message, rcpt="cti@a.example") == "550 5.6.0 field 'to': contains a line break or control character"


# --- limits against hostile input ----------------------------------------------------------------

def nested(levels: int) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\nto: 2002\r\n"
    for level in range(levels):
        boundary = f"b{level}".encode()
        body = (b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--" + boundary + b"\r\n"
                + body + b"\r\n--" + boundary + b"--\r\n")
    return b"From: alice@a.example\r\nTo: cti@a.example\r\n" + body


def test_mime_nesting_limit():
    assert parse(nested(10), rcpt="cti@a.example").to_number == "2002"
    assert refusal(nested(11), rcpt="cti@a.example") == "552 5.3.4 MIME nesting deeper than 10 levels"
    assert refusal(nested(3000), rcpt="cti@a.example") == "552 5.3.4 MIME nesting deeper than 10 levels"


def test_part_count_limit():
    def with_parts(count: int) -> EmailMessage:
        message = mail("to: 2002", to="cti@a.example")
        for n in range(count - 1):
            message.add_attachment(b"x", maintype="application", subtype="octet-stream", filename=f"{n}.bin")
        return message
    assert len(parse(with_parts(100), rcpt="cti@a.example").parts) == 100
    assert refusal(with_parts(101), rcpt="cti@a.example") == "552 5.3.4 more than 100 MIME parts"


def test_value_length_limit():
    assert refused_at_cti("to: 2002\nrequest: " + "a" * 1001) == \
        "552 5.3.4 field 'request': value longer than 1000 characters"
    assert refusal(raw_mail("X-CTI-To: 2002\nX-CTI-Request: " + "a" * 1001), rcpt="cti@a.example") == \
        "552 5.3.4 field 'request': value longer than 1000 characters"
    assert yaml_refusal("to: '2002'\nrequest: " + "a" * 1001) == \
        "552 5.3.4 field 'request': value longer than 1000 characters"


def test_command_block_line_limit():
    assert to_cti("to: 2002\n" + "dry-run: yes\n" * 49).dry_run
    assert refused_at_cti("to: 2002\n" + "dry-run: yes\n" * 50) == "552 5.3.4 command block longer than 50 lines"


def test_cti_header_count_limit():
    assert parse(raw_mail("X-CTI-To: 2002\n" + "X-CTI-Dry-Run: yes\n" * 49), rcpt="cti@a.example").dry_run
    assert refusal(raw_mail("X-CTI-To: 2002\n" + "X-CTI-Dry-Run: yes\n" * 50), rcpt="cti@a.example") == \
        "552 5.3.4 more than 50 X-CTI-* headers"


def test_message_size_limit():
    small = replace(CONFIG, smtp=SmtpConfig(max_message_size=500))
    assert refusal(mail("to: 2002\n\n" + "x" * 600, to="cti@a.example"), rcpt="cti@a.example", config=small) == \
        "552 5.3.4 message too big: the limit is 500 bytes"


# --- malformed MIME ------------------------------------------------------------------------------

@pytest.mark.parametrize("message, reply", [
    (raw_mail("X-CTI-To: 2002\nMIME-Version: 1.0\nContent-Type: multipart/mixed", "to: 2002"),
     "550 5.6.0 malformed MIME: multipart without a boundary"),
    (raw_mail('Content-Type: multipart/mixed; boundary="b"',
              "--b\r\nContent-Type: text/plain\r\n\r\nto: 2002\r\n"),
     "550 5.6.0 malformed MIME: multipart without its closing boundary (truncated?)"),
    (raw_mail('X-CTI-To: 2002\nContent-Type: multipart/mixed; boundary="b"', "no parts here\r\n"),
     "550 5.6.0 malformed MIME: multipart whose boundary never occurs"),
    (b"From: alice@a.example\r\nX-CTI-To: 2002\r\nhello there\r\n",
     "550 5.6.0 malformed MIME: no blank line between the header and the body"),
    (raw_mail("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64",
              base64.b64encode(b"to: 2002\n")[:-2] + b"!!"),
     "550 5.6.0 malformed MIME: part 1 (text/plain; charset=utf-8) has broken base64"),
])
def test_malformed_mime_requests_are_refused(message, reply):
    assert refusal(message, rcpt="cti@a.example") == reply


# --- parts ---------------------------------------------------------------------------------------

def test_the_parts_list():
    message = mail("scenario: voice-then-connect\nto: 2002\n\nVoice and FAX attached.", to="cti@a.example")
    message.add_attachment(b"RIFF....WAVE", maintype="audio", subtype="wav", filename="greeting.wav",
                           cid="<voice1@a.example>")
    message.add_attachment(b"II*\x00page", maintype="image", subtype="tiff", filename="page.tif")
    message.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="../../etc/passwd")
    message.add_attachment(b"\x00\x01", maintype="application", subtype="octet-stream")
    message.add_attachment("notes", filename="notes.txt")
    request = parse(message, rcpt="cti@a.example")
    assert request.parts == (
        Part(1, "text/plain", None, None,
             len("scenario: voice-then-connect\r\nto: 2002\r\n\r\nVoice and FAX attached.\r\n"), PartKind.TEXT),
        Part(2, "audio/wav", "greeting.wav", "voice1@a.example", 12, PartKind.VOICE),
        Part(3, "image/tiff", "page.tif", None, 8, PartKind.FAX),
        Part(4, "application/pdf", "passwd", None, 8, PartKind.FAX),  # a name, never a path
        Part(5, "application/octet-stream", None, None, 2, PartKind.OTHER),
        Part(6, "text/plain", "notes.txt", None, len("notes\r\n"), PartKind.TEXT),
    )


def test_subject_and_message_id():
    request = parse(mail("to: 2001", subject="折り返しお願いします"))
    assert (request.subject, request.message_id) == ("折り返しお願いします", "<m1@a.example>")


# --- storing and resuming ------------------------------------------------------------------------

def test_to_json_round_trips_through_json_text():
    request = yaml_request("to: '2002'\nat: 2025-04-02T10:00:00+09:00\nscenario: {steps: [connect]}\n")
    stored = json.dumps(request.to_json(), ensure_ascii=False)
    assert ExchangeRequest.from_json(json.loads(stored)) == request


def test_from_json_refuses_an_unknown_version():
    with pytest.raises(ValueError):
        ExchangeRequest.from_json({"version": 2})


_texts = st.text(max_size=30)
_parts = st.builds(Part, index=st.integers(1, 100), content_type=_texts, filename=st.none() | _texts,
                   content_id=st.none() | _texts, size=st.integers(0, 10**7), kind=st.sampled_from(PartKind))
_requests = st.builds(
    ExchangeRequest,
    action=st.sampled_from(Action), to_number=st.none() | st.from_regex(DIAL_STRING, fullmatch=True),
    from_number=st.none() | st.from_regex(DIAL_STRING, fullmatch=True), network=st.none() | st.sampled_from(Network),
    trigger=st.sampled_from(Trigger), notify=st.booleans(),
    monitor=st.floats(min_value=0, max_value=1e9, allow_nan=False), monitor_capped=st.booleans(),
    retry=st.booleans(), mode=st.sampled_from(CamponMode),
    at=st.none() | st.datetimes(timezones=st.sampled_from([timezone.utc, JST, timezone(timedelta(hours=-5))])),
    priority=st.sampled_from(Priority), confidential=st.booleans(), scenario_name=st.none() | _texts,
    scenario_inline=st.none() | st.text(), request_ref=st.none() | _texts, dry_run=st.booleans(), sender=_texts,
    language=_texts, recipient=_texts, subject=st.text(), message_id=_texts,
    parts=st.lists(_parts, max_size=4).map(tuple),
    sources=st.dictionaries(st.sampled_from([spec.name for spec in FIELDS]), st.sampled_from(Source)),
)


@settings(max_examples=300, deadline=None)
@given(_requests)
def test_any_request_round_trips_through_json(request):
    assert ExchangeRequest.from_json(json.loads(json.dumps(request.to_json()))) == request


# --- whatever the bytes: None, a request, or a Refused ------------------------------------------

class _Unexpected(logging.Handler):
    """Fails the test when the parser's last-resort handler was needed (a case nobody foresaw)."""

    def __enter__(self):
        self.records = []
        logging.getLogger("mailgw.request").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("mailgw.request").removeHandler(self)
        assert not self.records, self.records[0].getMessage()

    def emit(self, record):
        self.records.append(record)


def check_any_outcome(raw: bytes, rcpt: str) -> None:
    with _Unexpected():
        try:
            request = parse_request(raw, mail_from="alice@a.example", rcpt_to=rcpt, directory=PEOPLE, config=CONFIG,
                                    now=NOW)
        except Refused as refused:
            reply = refused.reply
            assert reply.code >= 500 and reply.status.startswith("5.")
            assert reply.text.strip()
            assert "\r" not in reply.text and "\n" not in reply.text
            return
    if request is not None:
        assert request.to_number is None or DIAL_STRING.fullmatch(request.to_number)
        assert request.from_number is None or DIAL_STRING.fullmatch(request.from_number)
        assert ExchangeRequest.from_json(json.loads(json.dumps(request.to_json()))) == request


_rcpts = st.sampled_from(["bob@a.example", "cti@a.example"])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000), _rcpts)
def test_arbitrary_bytes(raw, rcpt):
    check_any_outcome(raw, rcpt)


_field_names = st.sampled_from([key for _, key in ASCII_KEYS] + ["Outcome", "Foo", ""])
_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_charsets = st.sampled_from(["utf-8", "us-ascii", "iso-2022-jp", "shift_jis", "euc-jp", "iso-8859-1", "x-unknown",
                             "base64", ""])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_field_names, _values), max_size=5), _values, _charsets,
       st.sampled_from(["", "base64", "quoted-printable", "8bit"]), _rcpts)
def test_arbitrary_header_and_body_text_in_a_valid_envelope(headers, body, charset, cte, rcpt):
    head = ["From: alice@a.example", f"To: {rcpt}", "MIME-Version: 1.0"]
    head += [f"X-CTI-{name}: {value}" for name, value in headers]
    head.append(f"Content-Type: text/plain; charset={charset}" if charset else "Content-Type: text/plain")
    encoding = charset if charset not in ("", "x-unknown", "base64") else "utf-8"
    data = body.encode(encoding, errors="replace")
    if cte:
        head.append(f"Content-Transfer-Encoding: {cte}")
        if cte == "base64":
            data = base64.encodebytes(data)
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", errors="surrogateescape") + data
    check_any_outcome(raw, rcpt)


_VALID = to_bytes(with_yaml(
    mail("宛先：０３－１２３４－５６７８\nmonitor: 5m\n\nhello", headers={"X-CTI-Trigger": "on-read"}, charset="utf-8",
         to="cti@a.example"),
    "scenario:\n  steps: [{play: voice}, connect]\npriority: express\n"))


def test_a_charset_folded_over_two_lines_is_named_on_one_reply_line():
    """Found by the mutation test: a quoted charset parameter that spans a folded header line put
    CR LF into the refusal (an SMTP reply must be one line)."""
    raw = (b"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: text/plain; charset="x\r\n  y"\r\n\r\nto: 2001\r\n')
    with pytest.raises(Refused) as refused:
        parse_request(raw, mail_from="alice@a.example", rcpt_to="cti@a.example", directory=PEOPLE, config=CONFIG,
                      now=NOW)
    assert refused.value.reply.text.startswith("part 1 (text/plain; charset=x\\r\\n  y): unknown charset")
    check_any_outcome(raw, "cti@a.example")


def test_the_mutation_seed_is_a_valid_request():
    assert parse(_VALID, rcpt="cti@a.example").priority == Priority.EXPRESS


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.sampled_from(["flip", "insert", "delete", "cut"]),
                          st.binary(min_size=1, max_size=8)), min_size=1, max_size=6), _rcpts)
def test_mutated_valid_requests(mutations, rcpt):
    raw = bytearray(_VALID)
    for position, operation, data in mutations:
        position = min(position, max(len(raw) - 1, 0))
        if operation == "flip" and raw:
            raw[position] ^= data[0]
        elif operation == "insert":
            raw[position:position] = data
        elif operation == "delete":
            del raw[position:position + len(data)]
        elif operation == "cut":
            del raw[position:]
    check_any_outcome(bytes(raw), rcpt)


# --- the docs list every field and alias ---------------------------------------------------------

@pytest.mark.skipif(not DOCS.exists(), reason="docs/request-format.md not written yet")
@pytest.mark.parametrize("name, key", ALL_KEYS)
def test_the_user_guide_lists_every_field_and_alias(name, key):
    assert f"`{key}`" in DOCS.read_text(encoding="utf-8")


def _mail_examples() -> list[str]:
    blocks = DOCS.read_text(encoding="utf-8").split("```")[1::2]
    return [block.lstrip("\n") for block in blocks if block.lstrip("\n").startswith("From: ")]


@pytest.mark.skipif(not DOCS.exists(), reason="docs/request-format.md not written yet")
def test_the_user_guides_mail_examples_are_requests():
    examples = _mail_examples()
    assert len(examples) == 2
    for example in examples:
        raw = example.replace("\n", "\r\n").encode("utf-8")
        rcpt = "cti@a.example" if "To: cti@" in example else "bob@a.example"
        request = parse(raw, rcpt=rcpt)
        assert request is not None and request.from_number == "2000"
    assert request.scenario_inline is not None
    assert [part.kind for part in request.parts] == [PartKind.TEXT, PartKind.OTHER, PartKind.VOICE]
