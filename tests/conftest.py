"""Shared fixtures: a gateway on ephemeral ports with fast simulated phones, a real SMTP sink, and
helpers that talk real SMTP and await the gateway's recorded stages (no sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
from dataclasses import dataclass, replace
from email.message import EmailMessage
from pathlib import Path
from typing import AsyncIterator, Callable

import aiosmtplib
import pytest
import yaml
from aiosmtpd.smtp import SMTP
from hypothesis import settings

from mailgw.config import Config, HostPort, load_config
from mailgw.gateway import Gateway
from mailgw.mailbox import list_mail
from mailgw.pbx.simulator import AmiSimulator, CallRecord
from mailgw.store import Store

# `make test` (and so CI) replays the same generated examples every run, so a red build is
# reproducible; HYPOTHESIS_PROFILE=default tries new ones (and .hypothesis/ replays any that failed).
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TIME_SCALE = 0.02  # simulated phones act 50x faster: "answers after 2 s" takes 40 ms


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def make(**overrides: object) -> Config:
        base = load_config(None)
        config = replace(
            base,
            data_dir=tmp_path / "var",
            mailbox_root=tmp_path / "mailbox",
            smtp=replace(base.smtp, listen=HostPort("127.0.0.1", 0)),
            pbx=replace(base.pbx, ami=replace(base.pbx.ami, port=0),
                        # In the test's own loop: tests look at its phones and calls directly.
                        simulator=replace(base.pbx.simulator, time_scale=TIME_SCALE, process=False)),
            # Tests ring the same demo phones over and over; the per-number limits (1/min by
            # default) are tested on their own in test_security.py with the real defaults.
            policy=replace(base.policy, per_number_per_minute=1000, per_number_per_hour=1000),
        )
        return replace(config, **overrides)  # type: ignore[arg-type]
    return make


@dataclass
class Sink:
    """A real SMTP server that keeps what it receives, for mail leaving the gateway."""

    port: int
    received: asyncio.Queue[tuple[str, list[str], EmailMessage]]

    async def next(self, timeout: float = 10.0) -> tuple[str, list[str], EmailMessage]:
        return await asyncio.wait_for(self.received.get(), timeout)


class _SinkHandler:
    def __init__(self, queue: asyncio.Queue) -> None:
        self.queue = queue

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        await self.queue.put((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 2.0.0 sunk"


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(_SinkHandler(queue), loop=loop), "127.0.0.1", 0)
    yield Sink(server.sockets[0].getsockname()[1], queue)
    server.close()
    await server.wait_closed()


@contextlib.asynccontextmanager
async def running_gateway(config: Config, sink: Sink) -> AsyncIterator[Gateway]:
    """A started gateway whose mail for outside addresses goes to ``sink``."""
    config = replace(config, outbound=replace(config.outbound, smarthost=HostPort("127.0.0.1", sink.port)))
    gw = Gateway(config)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
async def gateway(make_config: Callable[..., Config], sink: Sink) -> AsyncIterator[Gateway]:
    async with running_gateway(make_config(), sink) as gw:
        yield gw


def directory_with_mailbox(tmp_path: Path, address: str, mailbox: dict[str, object]) -> Path:
    """The shipped directory with ``address``'s ``mailbox:`` entry set; private, as it may hold a password."""
    raw = yaml.safe_load(load_config(None).directory.read_text(encoding="utf-8"))
    for person in raw["people"]:
        if person["address"] == address:
            person["mailbox"] = mailbox
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class SmtpReply:
    code: int
    text: str
    stage: str  # the command that gave this reply: MAIL, RCPT or DATA

    @property
    def queue_id(self) -> str:
        assert self.code == 250 and "queued as " in self.text, self
        return self.text.rsplit("queued as ", 1)[1].strip()


async def submit(port: int, message: EmailMessage | bytes, *, mail_from: str | None = None,
                 rcpt_to: list[str] | None = None) -> SmtpReply:
    """Send one mail over real SMTP and return the reply that decided its fate."""
    raw = message if isinstance(message, bytes) else message.as_bytes(policy=email.policy.SMTP)
    if isinstance(message, EmailMessage):
        mail_from = mail_from or message["From"].addresses[0].addr_spec
        rcpt_to = rcpt_to or [a.addr_spec for a in message["To"].addresses]
    assert mail_from is not None and rcpt_to
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False)
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(mail_from)
        for rcpt in rcpt_to:
            try:
                await client.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                return SmtpReply(exc.code, exc.message, "RCPT")
        try:
            reply = await client.data(raw)
        except aiosmtplib.SMTPResponseException as exc:
            return SmtpReply(exc.code, exc.message, "DATA")
        return SmtpReply(reply.code, reply.message, "DATA")
    finally:
        client.close()


def request_mail(sender: str, recipient: str, body: str, *, subject: str = "call please",
                 headers: dict[str, str] | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Message-ID"] = email.utils.make_msgid(domain="test.example")
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(body)
    return message


async def wait_stage(store: Store, request_id: str, stage: str, timeout: float = 10.0, *, count: int = 1) -> str:
    """Await the moment the gateway durably records ``stage`` for ``request_id`` (the ``count``-th
    time); returns its detail. The store is the truth; its listener only says "look again"."""
    changed = asyncio.Event()

    def listener(rid: str, recorded: str, detail: str) -> None:
        if rid == request_id and recorded == stage:
            changed.set()

    store.stage_listeners.append(listener)  # before the first look, so nothing slips between
    try:
        async with asyncio.timeout(timeout):
            while True:
                changed.clear()
                found = [detail for _, recorded, detail in await store.stages(request_id) if recorded == stage]
                if len(found) >= count:
                    return found[count - 1]
                await changed.wait()
    finally:
        store.stage_listeners.remove(listener)


def maildir_messages(gateway: Gateway, address: str) -> list[EmailMessage]:
    return [m.message() for m in list_mail(gateway.config.mailbox_root, address)]


def sim_calls(simulator: AmiSimulator) -> list[CallRecord]:
    """The calls the simulator placed, as it recorded them (what the phones saw)."""
    return list(simulator.calls)


def placed_calls(gateway: Gateway) -> list[CallRecord]:
    assert gateway.simulator is not None
    return sim_calls(gateway.simulator)


def dkim_key_pair() -> tuple[bytes, str]:
    """A DKIM key pair: the RSA private key PEM and the public key as a DNS p= value."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(public).decode()


async def exited(pid: int, timeout: float = 10.0) -> None:
    """Wait for a process to end, ours or not (a pidfd turns readable when it does)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)
