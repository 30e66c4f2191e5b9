"""Decisions of federation without sockets: the destination DB loader, the CTI database, number
conversion, routing of foreign domains, MX choice, hops and the retry schedule."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from mailgw.config import ConfigError, DkimKey, HostPort, load_config
from mailgw.destinations import (Destination, Destinations, NumberRoute, OwnRange, PeerAcceptance, Proof, Require,
                                 TlsMode, domain_for_number, load_destinations, localise, to_extension, to_external,
                                 unmet_proofs)
from mailgw.directory import load_directory
from mailgw.outbound import next_retry
from mailgw.relay import caller_number, check_hops, hop_count, received_header
from mailgw.request import parse_request
from mailgw.resources import shipped
from mailgw.routing import RouteKind, mx_destination, route_recipient
from mailgw.status import Refused

CONFIG = load_config(None)
DIRECTORY = load_directory(shipped("config", "directory.yaml"))
DKIM_KEY = DkimKey("a.example", "mail", "MIIB")
PEER_B = Destination("b.example", HostPort("127.0.0.1", 2526))
DB = Destinations(peers=(PEER_B,), numbers=(NumberRoute("044890XXXX", "b.example"),),
                  own_numbers=(OwnRange("035555", "", 4), OwnRange("0120", "", 3)))


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "destinations.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_the_shipped_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGW_PEER_B_PASSWORD", "s3cret")
    db = load_destinations(shipped("config", "destinations.yaml"))
    peer = db.peer("B.Example")
    assert peer is not None and (peer.host, peer.tls, peer.login, peer.password) == \
        (HostPort("gw.b.example", 2525), TlsMode.STARTTLS, "a.example", "s3cret")
    assert db.peer_by_login("b.example") is peer
    assert domain_for_number("0448901234", db) == "b.example"
    assert "s3cret" not in repr(peer)


@pytest.mark.parametrize(("data", "message"), [
    ({"destinations": {"b.example": {"tls": "starttls"}}}, "destinations.b.example.host: required"),
    ({"destinations": {"b.example": {"host": "h:25", "tls": "ssl"}}}, "must be none, starttls or tls"),
    ({"destinations": {"b.example": {"host": "h:25", "tls": "none", "login": "a", "password": "p"}}},
     "no password in clear"),
    ({"destinations": {"b.example": {"host": "h:25", "accept": {"login": "b.example"}}}}, "go together"),
    ({"destinations": {"b.example": {"host": "h:25", "hots": 1}}}, "hots"),
    ({"numbers": [{"pattern": "04[9-1]X", "domain": "b.example"}]}, "numbers[1].pattern"),
    ({"own_numbers": [{"external": "03-5555", "digits": 4}]}, "own_numbers[1]"),
    ({"peers": {}}, "peers"),
    ({"sign": {"domain": "a.example", "selector": "mail"}}, "sign: needs domain, selector and key"),
    ({"sign": {"domain": "a.example", "selector": "mail", "key": "missing.pem"}}, "sign.key: cannot read"),
    ({"destinations": {"b.example": {"host": "h:25", "accept": {"dkim": {"selector": "s"}}}}}, "needs selector and public_key"),
    ({"destinations": {"b.example": {"host": "h:25", "accept": {"login": "b", "secret": "s", "require": "either"}}}},
     "destinations.b.example.accept.require: must be all .* or any .*, not 'either'"),
    ({"destinations": {"b.example": {"host": "h:25", "accept": {"require": "any"}}}},
     "accept.require: there is nothing to require"),
])
def test_bad_destination_db_names_the_key(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_destinations(write(tmp_path, data))


def test_accept_require_is_read_and_defaults_to_all(tmp_path: Path) -> None:
    dkim = {"selector": "mail", "public_key": "MIIB"}
    db = load_destinations(write(tmp_path, {"destinations": {
        "b.example": {"host": "h:25", "accept": {"login": "b", "secret": "s", "dkim": dkim}},
        "c.example": {"host": "h:25", "accept": {"login": "c", "secret": "s", "dkim": dkim, "require": "any"}}}}))
    assert [p.accept.require for p in db.peers] == [Require.ALL, Require.ANY]
    assert db.peers[1].accept.proofs == (Proof.LOGIN, Proof.DKIM)


@pytest.mark.parametrize(("require", "proven", "missing"), [
    (Require.ALL, set(), (Proof.LOGIN, Proof.DKIM)),
    (Require.ALL, {Proof.LOGIN}, (Proof.DKIM,)),
    (Require.ALL, {Proof.DKIM}, (Proof.LOGIN,)),
    (Require.ALL, {Proof.LOGIN, Proof.DKIM}, ()),
    (Require.ANY, set(), (Proof.LOGIN, Proof.DKIM)),
    (Require.ANY, {Proof.LOGIN}, ()),
    (Require.ANY, {Proof.DKIM}, ()),
])
def test_unmet_proofs(require: Require, proven: set[Proof], missing: tuple[Proof, ...]) -> None:
    both = PeerAcceptance(login="a.example", secret="s", dkim=DKIM_KEY, require=require)
    assert unmet_proofs(both, frozenset(proven)) == missing
    assert unmet_proofs(PeerAcceptance(), frozenset()) == ()  # nothing configured: nothing to prove
    assert unmet_proofs(replace(both, dkim=None), frozenset(proven & {Proof.DKIM})) == (Proof.LOGIN,)


@pytest.mark.parametrize(("external", "extension"), [
    ("0355552000", "2000"), ("0120123", "123"), ("035555200", None), ("0355552000X", None), ("0448901234", None),
])
def test_external_to_extension_and_back(external: str, extension: str | None) -> None:
    assert to_extension(external, DB.own_numbers) == extension
    if extension is not None:
        assert to_external(extension, DB.own_numbers) == external


def test_cti_database_first_match_and_none() -> None:
    assert domain_for_number("0448909999", DB) == "b.example"
    assert domain_for_number("04489099999", DB) is None
    assert domain_for_number("2001", DB) is None


def test_localise_turns_our_external_number_into_the_extension_and_checks_policy() -> None:
    raw = b"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: x\r\n\r\nto: 03-5555-2001\r\n"
    request = parse_request(raw, mail_from="alice@a.example", rcpt_to="cti@a.example", directory=DIRECTORY,
                            config=CONFIG)
    assert request is not None and request.to_number == "0355552001"
    local = localise(request, DB.own_numbers, CONFIG.policy)
    assert (local.to_number, str(local.network)) == ("2001", "extension")
    with pytest.raises(Refused) as refused:
        localise(request, DB.own_numbers, replace(CONFIG.policy, deny=("2001",)))
    assert refused.value.reply.status == "5.7.1"


def test_foreign_domains_relay_only_for_clients_that_may_relay() -> None:
    assert route_recipient("bob@b.example", CONFIG, DIRECTORY, DB, may_relay=True).kind == RouteKind.RELAY
    with pytest.raises(Refused, match="authenticate"):
        route_recipient("bob@b.example", CONFIG, DIRECTORY, DB, may_relay=False)
    with pytest.raises(Refused, match="not a domain this gateway serves or relays to"):
        route_recipient("bob@c.example", CONFIG, DIRECTORY, DB, may_relay=True)
    with_mx = replace(CONFIG, relay=replace(CONFIG.relay, mx=True))
    assert route_recipient("bob@c.example", with_mx, DIRECTORY, DB, may_relay=True).kind == RouteKind.RELAY


def test_mx_choice() -> None:
    assert mx_destination("c.example", [(20, "mx2.c.example."), (10, "mx1.c.example.")]).host == \
        HostPort("mx1.c.example", 25)
    assert mx_destination("c.example", []).host == HostPort("c.example", 25)  # RFC 5321 5.1: the domain itself
    assert mx_destination("c.example", [(0, ".")]) is None  # RFC 7505 null MX


def test_hops_and_trace_headers() -> None:
    now = datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)
    line = received_header(helo="client\r\nX-Evil: 1", peer="127.0.0.1", by="a.example", queue_id="Q", rcpt="b@b.example",
                           now=now)
    assert line.startswith(b"Received: from clientX-Evil:1 ([127.0.0.1])") and line.count(b"\r\n") == 3
    mail = line * 3 + b"X-Mailgw-Caller-Number: 0355552000\r\nSubject: s\r\n\r\nReceived: in the body\r\n"
    assert hop_count(mail) == 3
    assert caller_number(mail) == "0355552000"
    assert caller_number(b"Subject: s\r\n\r\nX-Mailgw-Caller-Number: 1\r\n") is None
    check_hops(mail, 3)
    with pytest.raises(Refused) as refused:
        check_hops(mail, 2)
    assert (refused.value.reply.code, refused.value.reply.status) == (554, "5.4.6")


def test_retry_schedule_doubles_and_never_passes_the_deadline() -> None:
    start = datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)
    deadline = start + timedelta(minutes=40)
    tries, now, attempts = [], start, 0
    while (now := next_retry(now, attempts, 300, 3600, deadline)) is not None:
        tries.append(round((now - start).total_seconds() / 60))
        attempts += 1
        if now >= deadline:
            break
    assert tries == [5, 15, 35, 40]  # 5, 10, 20 minutes apart, then the last try at the deadline
    assert next_retry(deadline, 4, 300, 3600, deadline) is None
