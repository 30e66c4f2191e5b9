"""Two offices federated by mail (seed 004, embodiments 2 and 3), on real sockets.

Gateway a (a.example) and gateway b (b.example) each run their own AMI simulator; they relay to
each other over SMTP with STARTTLS (each trusting the other's self-signed certificate) and SMTP
AUTH as peers, as configured in their destinations.yaml. Gateway b trusts no network: it acts on
requests from a.example only when gateway a relayed them, logged in.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
import yaml

from mailgw.auth import hash_secret
from mailgw.config import Config, HostPort
from mailgw.gateway import Gateway
from mailgw.store import MessageRow, Store

from .conftest import Sink, dkim_key_pair, maildir_messages, placed_calls, request_mail, running_gateway, submit, wait_stage

PEER_A_PASSWORD = "a-relays-to-b"
PEER_B_PASSWORD = "b-relays-to-a"


def free_port() -> int:
    """A loopback port nobody listens on now (the peer's address must be known before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_yaml(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    path.chmod(0o600)
    return path


@dataclass
class Office:
    domain: str
    root: Path
    port: int

    @property
    def cert(self) -> Path:
        return self.root / "var" / "tls" / "cert.pem"


def peer_entry(peer: Office, *, login: str, password: str, accept_login: str, accept_password: str) -> dict:
    return {"host": f"127.0.0.1:{peer.port}", "tls": "starttls", "ca": str(peer.cert),
            "login": login, "password": password,
            "accept": {"login": accept_login, "secret": hash_secret(accept_password)}}


@dataclass
class Federation:
    tmp: Path
    make_config: Callable[..., Config]
    sink: Sink
    a: Office
    b: Office

    def config_a(self, *, sign: bytes | None = None, login: bool = True, **relay: object) -> Config:
        """Gateway a; ``sign``: a's DKIM private key (PEM) to sign what it relays; ``login``: AUTH at b."""
        peer_b = peer_entry(self.b, login="a.example", password=PEER_A_PASSWORD, accept_login="b.example",
                            accept_password=PEER_B_PASSWORD)
        if not login:
            del peer_b["login"], peer_b["password"]
        db: dict = {"destinations": {"b.example": peer_b},
                    "numbers": [{"pattern": "044890XXXX", "domain": "b.example"}],
                    "own_numbers": [{"external": "035555", "digits": 4}]}   # 03-5555-2000 reaches 2000
        if sign is not None:
            self.a.root.mkdir(parents=True, exist_ok=True)
            (self.a.root / "dkim.pem").write_bytes(sign)
            db["sign"] = {"domain": "a.example", "selector": "mail", "key": "dkim.pem"}
        dests = write_yaml(self.a.root / "destinations.yaml", db)
        return self._config(self.a, dests, None, relay)

    def config_b(self, *, accept_password: str = PEER_A_PASSWORD, accept_login: bool = True,
                 accept_dkim: str | None = None, require: str | None = None, **relay: object) -> Config:
        """Gateway b; it accepts a's relayed requests with AUTH (``accept_login``) and/or a's DKIM
        signature (``accept_dkim``: a's public key), both or either (``require``: all, any)."""
        peer_a = peer_entry(self.a, login="b.example", password=PEER_B_PASSWORD, accept_login="a.example",
                            accept_password=accept_password)
        if not accept_login:
            del peer_a["accept"]
        if accept_dkim is not None:
            peer_a.setdefault("accept", {})["dkim"] = {"selector": "mail", "public_key": accept_dkim}
        if require is not None:
            peer_a["accept"]["require"] = require
        dests = write_yaml(self.b.root / "destinations.yaml", {
            "destinations": {"a.example": peer_a},
            "numbers": [{"pattern": "035555XXXX", "domain": "a.example"}],
            "own_numbers": [{"external": "044890", "digits": 4}],   # 044-890-2001 reaches 2001
        })
        directory = write_yaml(self.b.root / "directory.yaml", {"people": [
            {"address": "bob@b.example", "name": "Bob Baker", "extension": "2001"},
            {"address": "carol@b.example", "name": "Carol Chen", "extension": "2003"},
        ]})
        return replace(self._config(self.b, dests, directory, relay),
                       security=replace(self.make_config().security, trusted_networks=()))

    def _config(self, office: Office, destinations: Path, directory: Path | None, relay: dict) -> Config:
        base = self.make_config()
        config = replace(base, domains=(office.domain,), data_dir=office.root / "var",
                         mailbox_root=office.root / "mailbox", destinations=destinations,
                         smtp=replace(base.smtp, listen=HostPort("127.0.0.1", office.port)),
                         relay=replace(base.relay, **{"retry_interval": 0.05, "max_retry_interval": 0.2, **relay}))
        return replace(config, directory=directory) if directory else config

    @contextlib.asynccontextmanager
    async def run(self, config: Config) -> AsyncIterator[Gateway]:
        async with running_gateway(config, self.sink) as gw:
            yield gw


@pytest.fixture
def federation(tmp_path: Path, make_config: Callable[..., Config], sink: Sink) -> Federation:
    return Federation(tmp_path, make_config, sink, Office("a.example", tmp_path / "a", free_port()),
                      Office("b.example", tmp_path / "b", free_port()))


@contextlib.asynccontextmanager
async def both(federation: Federation, a_options: dict | None = None,
               **b_options: object) -> AsyncIterator[tuple[Gateway, Gateway]]:
    async with federation.run(federation.config_b(**b_options)) as b, \
            federation.run(federation.config_a(**(a_options or {}))) as a:
        yield a, b


@pytest.fixture(scope="module")
def a_dkim_key() -> tuple[bytes, str]:
    """Gateway a's DKIM key pair: the private key PEM and the public key as a DNS p= value."""
    return dkim_key_pair()


async def wait_message(store: Store, predicate: Callable[[MessageRow], bool], *, state: str | None = "done",
                       timeout: float = 10.0) -> MessageRow:
    """Await the first stored message that ``predicate`` picks (in ``state``), without polling."""
    changed = asyncio.Event()

    def listener(*_: str) -> None:
        changed.set()

    store.stage_listeners.append(listener)
    try:
        async with asyncio.timeout(timeout):
            while True:
                changed.clear()
                found = [m for m in await store.list_messages(500)
                         if predicate(m) and (state is None or m.state == state)]
                if found:
                    return found[0]
                await changed.wait()
    finally:
        store.stage_listeners.remove(listener)


async def bounce_status(a: Gateway, queue_id: str) -> str:
    """Await the bounce of relayed mail ``queue_id`` in Alice's Maildir; its RFC 3463 status."""
    await wait_stage(a.store, queue_id, "mail-failed")
    await wait_stage(a.store, queue_id, "notified")
    [dsn] = [m for m in maildir_messages(a, "alice@a.example") if m.get_content_type() == "multipart/report"]
    return dsn.get_payload()[1].get_payload()[1]["Status"]


def mail_for(gateway: Gateway, address: str, header: str, value: str) -> list[email.message.EmailMessage]:
    return [m for m in maildir_messages(gateway, address) if m[header] == value]


# --- a user at a asks for a person at b -------------------------------------------------------------

async def test_request_for_a_person_at_the_other_office_is_relayed_executed_there_and_answered(
        federation: Federation) -> None:
    async with both(federation) as (a, b):
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "bob@b.example", "action: connect\n"))
        assert reply.code == 250, reply
        await wait_stage(a.store, reply.queue_id, "relayed")

        executed = await wait_message(b.store, lambda m: m.rcpt_to == "bob@b.example" and m.kind == "request")
        assert executed.outcome == "answered"
        # Gateway b called Alice back on her external number (a's 2000 as seen from outside), then Bob.
        assert [(c.from_number, c.to_number, c.outcome) for c in placed_calls(b)] == [("0355552000", "2001", "answered")]
        assert placed_calls(a) == []

        await wait_stage(b.store, executed.id, "notified")
        result = await wait_message(a.store, lambda m: m.rcpt_to == "alice@a.example" and m.kind == "mail")
        mails = mail_for(a, "alice@a.example", "X-CTI-Request", executed.id)
        assert len(mails) == 1 and mails[0]["X-CTI-Outcome"] == "answered", result

        # The relayed copy is the mail as sent, below one Received line of each hop's making.
        original = request_mail("alice@a.example", "bob@b.example", "action: connect\n")
        relayed = await b.store.raw_message(executed)
        assert relayed.startswith(b"Received: from ")
        assert relayed.count(b"\nReceived: ") + relayed.startswith(b"Received: ") == 1
        assert b"X-Mailgw-Caller-Number: 0355552000\r\n" in relayed
        assert relayed.endswith(original.get_content().encode().replace(b"\n", b"\r\n"))


async def test_request_naming_only_a_number_of_the_other_office_goes_to_its_gateway(federation: Federation) -> None:
    async with both(federation) as (a, b):
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "cti@a.example", "to: 044-890-2001\n"))
        assert reply.code == 250, reply
        await wait_stage(a.store, reply.queue_id, "relayed")
        assert [r.rcpt_to for r in await a.store.outbox_for(reply.queue_id)] == ["cti@b.example"]
        assert await a.store.get_message(reply.queue_id) is None  # not a's to run

        executed = await wait_message(b.store, lambda m: m.rcpt_to == "cti@b.example")
        # External 044-890-2001 became b's extension 2001 (FIG. 18); the caller's 2000 became 0355552000.
        assert executed.request["to_number"] == "2001" and executed.request["network"] == "extension"
        assert [(c.from_number, c.to_number) for c in placed_calls(b)] == [("0355552000", "2001")]
        await wait_message(a.store, lambda m: m.rcpt_to == "alice@a.example")
        assert len(mail_for(a, "alice@a.example", "X-CTI-Request", executed.id)) == 1


async def test_binary_parts_arrive_byte_for_byte(federation: Federation) -> None:
    message = request_mail("alice@a.example", "bob@b.example", "hello Bob, see the attachment\n")
    payload = bytes(range(256)) * 64
    message.add_attachment(payload, maintype="application", subtype="octet-stream", filename="blob.bin")
    raw = message.as_bytes(policy=email.policy.SMTP)
    async with both(federation) as (a, b):
        reply = await submit(a.smtp_port, raw, mail_from="alice@a.example", rcpt_to=["bob@b.example"])
        assert reply.code == 250, reply
        stored = await wait_message(b.store, lambda m: m.rcpt_to == "bob@b.example")
        relayed = await b.store.raw_message(stored)
        assert relayed.endswith(raw)
        got = email.message_from_bytes(relayed, policy=email.policy.default)
        assert [p.get_content() for p in got.iter_attachments()] == [payload]


# --- the queue: peer down, peer up, peer down for too long -----------------------------------------

async def test_peer_down_queues_then_delivers_once_when_it_comes_up(federation: Federation) -> None:
    async with federation.run(federation.config_a()) as a:
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "bob@b.example", "action: connect\n"))
        assert reply.code == 250, reply
        await wait_stage(a.store, reply.queue_id, "mail-deferred", count=2)
        [row] = await a.store.outbox_for(reply.queue_id)
        assert row.state == "queued" and row.attempts >= 2 and row.last_error

        async with federation.run(federation.config_b()) as b:
            await wait_stage(a.store, reply.queue_id, "relayed")
            executed = await wait_message(b.store, lambda m: m.rcpt_to == "bob@b.example")
            assert executed.outcome == "answered"
            await wait_message(a.store, lambda m: m.rcpt_to == "alice@a.example")
            assert len(mail_for(a, "alice@a.example", "X-CTI-Request", executed.id)) == 1
            assert [m.rcpt_to for m in await b.store.list_messages()].count("bob@b.example") == 1
        [row] = await a.store.outbox_for(reply.queue_id)
        assert row.state == "sent"


async def test_peer_down_past_the_monitor_time_bounces_a_delivery_status_notification(
        federation: Federation) -> None:
    async with federation.run(federation.config_a()) as a:
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "cti@a.example",
                                                       "to: 044-890-2001\nmonitor: 1s\n"))
        assert reply.code == 250, reply
        await wait_stage(a.store, reply.queue_id, "mail-failed")
        await wait_stage(a.store, reply.queue_id, "notified")  # the bounce, into Alice's Maildir
        relayed, bounce = await a.store.outbox_for(reply.queue_id)
        assert (relayed.state, relayed.rcpt_to) == ("failed", "cti@b.example")
        assert (bounce.state, bounce.rcpt_to, bounce.mail_from) == ("sent", "alice@a.example", "")  # never bounced
        [dsn] = [m for m in maildir_messages(a, "alice@a.example") if m.get_content_type() == "multipart/report"]
        assert dsn.get_param("report-type") == "delivery-status"
        status = dsn.get_payload()[1].get_payload()
        assert status[1]["Final-Recipient"] == "rfc822; cti@b.example"
        assert status[1]["Action"] == "failed" and status[1]["Status"] == "4.4.7"
        assert "Subject: call please" in dsn.get_payload()[2].as_string()  # the original's headers
        assert "could not be delivered" in dsn.get_payload()[0].get_content()


async def test_peer_refusal_bounces_with_its_code(federation: Federation) -> None:
    """b refuses the request (no such person at b): a tells the sender with b's 5.1.1."""
    async with both(federation) as (a, b):
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "nobody@b.example", "to: 2001\n"))
        assert reply.code == 250, reply
        assert await bounce_status(a, reply.queue_id) == "5.1.1"


# --- refusals ---------------------------------------------------------------------------------------

async def test_unknown_domain_is_refused_at_rcpt(federation: Federation) -> None:
    async with federation.run(federation.config_a()) as a:
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "someone@c.example", "to: 2001\n"))
        assert (reply.stage, reply.code) == ("RCPT", 550) and reply.text.startswith("5.7.1"), reply


async def test_open_relay_probe_is_refused(federation: Federation) -> None:
    """b trusts no network: an unauthenticated client may not relay through it, not even to a peer."""
    async with federation.run(federation.config_b()) as b:
        for rcpt in ("alice@a.example", "victim@elsewhere.example"):
            reply = await submit(b.smtp_port, request_mail("spammer@evil.example", rcpt, "buy now\n"))
            assert (reply.stage, reply.code) == ("RCPT", 550) and reply.text.startswith("5.7.1"), reply
        assert await b.store.outbox_queue() == []


async def test_too_many_hops_is_a_loop(federation: Federation) -> None:
    raw = b"".join(f"Received: from hop{i}.example by hop{i + 1}.example; Thu, 3 Dec 2026 09:00:00 +0000\r\n"
                   .encode() for i in range(6)) + request_mail("alice@a.example", "bob@b.example", "to: 2001\n") \
        .as_bytes(policy=email.policy.SMTP)
    async with federation.run(federation.config_a(max_hops=5)) as a:
        reply = await submit(a.smtp_port, raw, mail_from="alice@a.example", rcpt_to=["bob@b.example"])
        assert (reply.stage, reply.code) == ("DATA", 554) and reply.text.startswith("5.4.6"), reply


async def test_requests_from_the_peer_domain_need_the_authenticated_peer(federation: Federation) -> None:
    """Straight to b, not through a: b refuses to act on a request claiming to be from a.example."""
    async with federation.run(federation.config_b()) as b:
        reply = await submit(b.smtp_port, request_mail("alice@a.example", "cti@b.example",
                                                       "to: 2001\nfrom: 0355552000\n"))
        assert (reply.code, reply.text[:5]) == (550, "5.7.1"), reply
        assert "accepted only from its gateway" in reply.text
        assert placed_calls(b) == []


async def test_peer_with_wrong_credentials_is_not_trusted(federation: Federation) -> None:
    """b expects another password from a: a's relay is refused at AUTH and the sender is told."""
    async with both(federation, accept_password="not-what-a-uses") as (a, b):
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "cti@a.example",
                                                       "to: 044-890-2001\nmonitor: 1s\n"))
        assert reply.code == 250, reply
        await wait_stage(a.store, reply.queue_id, "mail-failed")
        [row] = await a.store.outbox_for(reply.queue_id)
        assert "535" in (row.last_error or ""), row.last_error
        assert placed_calls(b) == [] and await b.store.list_messages() == []


async def test_client_may_not_set_the_caller_number_header(federation: Federation) -> None:
    async with federation.run(federation.config_a()) as a:
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "bob@b.example", "to: 2001\n",
                                                       headers={"X-Mailgw-Caller-Number": "0990123456"}))
        assert (reply.code, reply.text[:5]) == (550, "5.7.1"), reply


# --- mailgw queue -----------------------------------------------------------------------------------

async def test_queue_command_lists_retries_and_drops_relayed_mail(federation: Federation, capsys) -> None:
    from mailgw.cli import main

    async def cli(*args: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, ["queue", *args, "--data", str(a.config.data_dir)])
        return code, capsys.readouterr().out

    async with federation.run(federation.config_a(retry_interval=30, max_retry_interval=60)) as a:
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "bob@b.example", "action: connect\n"))
        assert reply.code == 250, reply
        await wait_stage(a.store, reply.queue_id, "mail-deferred")

        code, out = await cli("--json")
        [entry] = json.loads(out)
        assert code == 0 and (entry["id"], entry["to"], entry["relay_to"], entry["attempts"]) == \
            (reply.queue_id, "bob@b.example", "b.example", 1)
        assert entry["last_error"] and entry["deadline"]

        code, out = await cli("retry", reply.queue_id)  # due now, not in 30 s: the gateway tries at once
        assert code == 0, out
        await wait_stage(a.store, reply.queue_id, "mail-deferred", count=2)

        code, out = await cli("drop", reply.queue_id)
        assert code == 0, out
        [row] = await a.store.outbox_for(reply.queue_id)
        assert row.state == "dropped"
        assert (await cli())[1].strip() == "the outbound queue is empty"
        assert (await cli("retry", reply.queue_id))[0] == 1


async def test_relay_queue_survives_a_restart_of_the_sending_gateway(federation: Federation) -> None:
    async with federation.run(federation.config_a()) as a:
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "bob@b.example", "action: connect\n"))
        assert reply.code == 250, reply
        await wait_stage(a.store, reply.queue_id, "mail-deferred")
    async with federation.run(federation.config_b()) as b, federation.run(federation.config_a()) as a:
        await wait_stage(a.store, reply.queue_id, "relayed")
        executed = await wait_message(b.store, lambda m: m.rcpt_to == "bob@b.example")
        assert executed.outcome == "answered"
        assert [m.rcpt_to for m in await b.store.list_messages()].count("bob@b.example") == 1


# --- DKIM as the peer's proof -----------------------------------------------------------------------

async def relay_a_request_and_run_it(a: Gateway, b: Gateway) -> bytes:
    """Alice at a asks for Bob at b: the request runs at b with the caller number a vouched for;
    the mail as b stored it."""
    reply = await submit(a.smtp_port, request_mail("alice@a.example", "bob@b.example", "action: connect\n"))
    assert reply.code == 250, reply
    executed = await wait_message(b.store, lambda m: m.rcpt_to == "bob@b.example")
    assert executed.outcome == "answered"
    assert [(c.from_number, c.to_number) for c in placed_calls(b)] == [("0355552000", "2001")]
    return await b.store.raw_message(executed)


async def test_peer_proven_by_dkim_alone(federation: Federation, a_dkim_key: tuple[bytes, str]) -> None:
    """b checks a's DKIM signature instead of a login: a signs what it relays, and connects without AUTH."""
    private, public = a_dkim_key
    async with both(federation, {"sign": private, "login": False}, accept_login=False, accept_dkim=public) as (a, b):
        relayed = await relay_a_request_and_run_it(a, b)  # the caller header is under a's signature: believed
        assert b"\r\nDKIM-Signature: " in relayed and b"d=a.example" in relayed

        # Straight to b without a's signature (b trusts no network): refused, nothing rings.
        forged = await submit(b.smtp_port, request_mail("alice@a.example", "cti@b.example",
                                                        "to: 2003\nfrom: 0355552000\n"))
        assert (forged.code, forged.text.split()[0]) == (550, "5.7.20") and "DKIM" in forged.text, forged
        assert len(placed_calls(b)) == 1


@pytest.mark.parametrize(("signs", "logs_in", "status"), [(False, True, "5.7.20"), (True, False, "5.7.1")],
                         ids=["logged-in-unsigned", "signed-not-logged-in"])
async def test_peer_needing_both_proofs_refuses_a_relay_with_one(federation: Federation, a_dkim_key: tuple[bytes, str],
                                                                signs: bool, logs_in: bool, status: str) -> None:
    """b wants AUTH and DKIM (require: all, the default); a brings one: b refuses, RFC 7372's 5.7.20
    for the missing signature, 5.7.1 for the missing login, and Alice gets that code in the bounce."""
    private, public = a_dkim_key
    async with both(federation, {"sign": private if signs else None, "login": logs_in}, accept_dkim=public) as (a, b):
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "bob@b.example", "action: connect\n"))
        assert reply.code == 250, reply
        assert await bounce_status(a, reply.queue_id) == status
        assert placed_calls(b) == [] and await b.store.list_messages() == []


@pytest.mark.parametrize("signs", [False, True], ids=["auth-only", "dkim-only"])
async def test_peer_needing_any_proof_is_trusted_with_one_of_them(federation: Federation, a_dkim_key: tuple[bytes, str],
                                                                 signs: bool) -> None:
    """b lists a's login and a's DKIM key with require: any; a proves itself one way only (logs in,
    or signs), and the request runs at b."""
    private, public = a_dkim_key
    async with both(federation, {"sign": private if signs else None, "login": not signs}, accept_dkim=public,
                    require="any") as (a, b):
        relayed = await relay_a_request_and_run_it(a, b)
        assert (b"\r\nDKIM-Signature: " in relayed) is signs


async def test_peer_needing_any_proof_refuses_a_request_with_neither(federation: Federation,
                                                                    a_dkim_key: tuple[bytes, str]) -> None:
    """require: any; straight to b, neither logged in as a's gateway nor signed by a: refused, naming both."""
    _, public = a_dkim_key
    async with federation.run(federation.config_b(accept_dkim=public, require="any")) as b:
        forged = await submit(b.smtp_port, request_mail("alice@a.example", "cti@b.example",
                                                        "to: 2001\nfrom: 0355552000\n"))
        assert (forged.code, forged.text.split()[0]) == (550, "5.7.1"), forged
        assert "logged in" in forged.text and " or with a valid DKIM signature by a.example" in forged.text
        assert placed_calls(b) == [] and await b.store.list_messages() == []


# --- DNS MX (relay.mx) ------------------------------------------------------------------------------

class _Dns(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server on loopback: MX of c.example is localhost; nx.example does not exist."""

    def connection_made(self, transport) -> None:  # noqa: ANN001
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # noqa: ANN001
        import dns.message
        import dns.rcode
        import dns.rrset

        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        name = query.question[0].name.to_text()
        if name == "c.example.":
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "MX", "10 localhost."))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(response.to_wire(), addr)


@contextlib.asynccontextmanager
async def mx_gateway(federation: Federation) -> AsyncIterator[Gateway]:
    """Gateway a with relay.mx on, asking the loopback DNS above; MX hosts are reached on the sink's port."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Dns, local_addr=("127.0.0.1", 0))
    dns_port = transport.get_extra_info("sockname")[1]
    config = federation.config_a(mx=True, dns=(HostPort("127.0.0.1", dns_port),), mx_port=federation.sink.port)
    gateway = Gateway(config)  # no smarthost: it would win over the MX
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()
        transport.close()


async def test_mail_for_another_domain_goes_to_its_mx(federation: Federation) -> None:
    async with mx_gateway(federation) as a:
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "carol@c.example", "hello Carol\n"))
        assert reply.code == 250, reply
        mail_from, rcpts, message = await federation.sink.next()
        assert (mail_from, rcpts) == ("alice@a.example", ["carol@c.example"])
        assert message["Received"].startswith("from ") and "by a.example (mailgw)" in message["Received"]
        await wait_stage(a.store, reply.queue_id, "relayed")


async def test_mail_for_a_domain_that_does_not_exist_bounces_at_once(federation: Federation) -> None:
    async with mx_gateway(federation) as a:
        reply = await submit(a.smtp_port, request_mail("alice@a.example", "who@nx.example", "hello\n"))
        assert reply.code == 250, reply
        assert await bounce_status(a, reply.queue_id) == "5.1.2"
        [row, _] = await a.store.outbox_for(reply.queue_id)
        assert row.attempts == 1 and "does not exist in DNS" in (row.last_error or "")
