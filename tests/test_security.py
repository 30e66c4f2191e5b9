"""Only authorised senders cause calls, only to numbers and at rates the policy allows; every
refusal names its rule and lands in the audit log. Real SMTP (with STARTTLS and AUTH) throughout."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from pathlib import Path
from typing import Callable

import aiosmtplib
import pytest
import yaml

from mailgw.auth import hash_secret, verify_secret
from mailgw.config import Config, DkimKey, GroupPolicy
from mailgw.gateway import Gateway
from mailgw.resources import shipped

from .conftest import dkim_key_pair, maildir_messages, placed_calls, request_mail, submit, wait_stage

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def secret() -> str:
    return hash_secret(PASSWORD)  # scrypt is slow on purpose: hash once for the module


@pytest.fixture
def directory_with_secret(tmp_path: Path, secret: str) -> Path:
    data = yaml.safe_load(shipped("config", "directory.yaml").read_text())
    for person in data["people"]:
        if person["address"] == "alice@a.example":
            person["secret"] = secret
            person["groups"] = ["sales"]
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


async def started(config: Config) -> Gateway:
    gw = Gateway(config)
    await gw.start()
    return gw


def untrusted(make_config: Callable[..., Config], **overrides) -> Config:
    config = make_config(**overrides)
    return replace(config, security=replace(config.security, trusted_networks=()))


async def authenticated_submit(port: int, message, login: str, password: str):
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False)
    await client.connect()
    try:
        await client.ehlo()
        await client.starttls(validate_certs=False)
        await client.ehlo()
        await client.login(login, password)
        await client.mail(message["From"])
        await client.rcpt(message["To"])
        try:
            reply = await client.data(message.as_bytes(policy=email.policy.SMTP))
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return reply.code, reply.message
    finally:
        client.close()


def test_secrets_are_hashed_and_checked() -> None:
    stored = hash_secret("s3cret")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_secret("s3cret", stored) and not verify_secret("S3cret", stored)
    assert not verify_secret("s3cret", "scrypt$garbage")


async def test_unauthenticated_outsider_cannot_place_a_call_via_the_service_mailbox(make_config) -> None:
    gw = await started(untrusted(make_config))
    try:
        reply = await submit(gw.smtp_port, request_mail("alice@a.example", "cti@a.example", "to: 2001\n"))
        assert (reply.code, reply.stage) == (550, "DATA")
        assert reply.text.startswith("5.7.1 authentication required to place calls")
        assert placed_calls(gw) == [] and await gw.store.list_messages() == []
        [entry] = await gw.store.audit_entries()
        assert entry["peer"] == "127.0.0.1" and entry["sender"] == "alice@a.example"
        assert "authentication required" in entry["rule"]
    finally:
        await gw.stop()


async def test_unauthenticated_outsider_may_mail_a_person_but_no_call_happens(make_config) -> None:
    gw = await started(untrusted(make_config))
    try:
        reply = await submit(gw.smtp_port, request_mail("mallory@evil.example", "bob@a.example",
                                                        "to: 2001\nfrom: 03-1234-5678\n", subject="hi"))
        assert reply.code == 250
        await wait_stage(gw.store, reply.queue_id, "delivered")
        assert [m["Subject"] for m in maildir_messages(gw, "bob@a.example")] == ["hi"]
        assert placed_calls(gw) == []
        [entry] = await gw.store.audit_entries()
        assert "delivered to the mailbox only" in entry["rule"]
    finally:
        await gw.stop()


async def test_auth_is_offered_only_after_starttls(make_config, directory_with_secret: Path) -> None:
    gw = await started(untrusted(make_config, directory=directory_with_secret))
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, timeout=10, start_tls=False)
        await client.connect()
        try:
            await client.ehlo()
            assert client.supports_extension("starttls") and not client.supports_extension("auth")
            with pytest.raises(aiosmtplib.SMTPException):
                await client.login("alice@a.example", PASSWORD)  # would send the password in clear
            await client.starttls(validate_certs=False)
            await client.ehlo()
            assert {"plain", "login"} <= set(client.server_auth_methods)
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await client.login("alice@a.example", "wrong password")
            assert failed.value.code == 535
        finally:
            client.close()
    finally:
        await gw.stop()


async def test_authenticated_sender_places_the_call(make_config, directory_with_secret: Path) -> None:
    gw = await started(untrusted(make_config, directory=directory_with_secret))
    try:
        code, text = await authenticated_submit(
            gw.smtp_port, request_mail("alice@a.example", "bob@a.example", "action: connect\n"),
            "alice@a.example", PASSWORD)
        assert code == 250, text
        await wait_stage(gw.store, text.rsplit(" ", 1)[1], "outcome")
        assert [(c.from_number, c.to_number, c.outcome) for c in placed_calls(gw)] == [("2000", "2001", "answered")]
    finally:
        await gw.stop()


async def test_authenticated_sender_cannot_send_as_someone_else(make_config, directory_with_secret: Path) -> None:
    gw = await started(untrusted(make_config, directory=directory_with_secret))
    try:
        code, text = await authenticated_submit(
            gw.smtp_port, request_mail("bob@a.example", "cti@a.example", "to: 2003\n"), "alice@a.example", PASSWORD)
        assert code == 550 and text == "5.7.1 authenticated as alice@a.example but the mail is from bob@a.example"
        assert placed_calls(gw) == []
    finally:
        await gw.stop()


async def test_group_policy_narrows_numbers_and_actions(make_config, directory_with_secret: Path) -> None:
    config = make_config(directory=directory_with_secret)
    sales = GroupPolicy(allow=("XXXX",), actions=("connect",))
    gw = await started(replace(config, policy=replace(config.policy, groups=(("sales", sales),))))
    try:
        reply = await submit(gw.smtp_port, request_mail("alice@a.example", "cti@a.example", "to: 03-1234-5678\n"))
        assert reply.code == 550
        assert reply.text == ("5.7.1 field 'to': number 0312345678 is not allowed by policy "
                              "(it matches no allow pattern) [policy.groups.sales]")
        reply = await submit(gw.smtp_port, request_mail("carol@a.example", "cti@a.example", "to: 03-1234-5678\n"))
        assert reply.code == 250  # Carol is in no group: the office policy applies
    finally:
        await gw.stop()


async def test_one_number_cannot_be_rung_again_within_a_minute(make_config) -> None:
    config = make_config()
    defaults = Config().policy
    gw = await started(replace(config, policy=replace(config.policy, per_number_per_minute=defaults.per_number_per_minute,
                                                      per_number_per_hour=defaults.per_number_per_hour)))
    try:
        first = await submit(gw.smtp_port, request_mail("alice@a.example", "cti@a.example", "to: 03-1234-5678\n"))
        second = await submit(gw.smtp_port, request_mail("bob@a.example", "cti@a.example", "to: 03-1234-5678\n"))
        assert first.code == 250 and second.code == 550
        assert second.text == ("5.7.1 rate limit: 0312345678 was already called in the last minute "
                               "(policy.per_number_per_minute = 1)")
        dry = await submit(gw.smtp_port, request_mail("bob@a.example", "cti@a.example",
                                                      "to: 03-1234-5678\ndry-run: yes\n"))
        assert dry.code == 250  # a dry run rings nobody
        assert len((await gw.store.audit_entries())) == 1
    finally:
        await gw.stop()


@pytest.fixture(scope="module")
def peer_key() -> tuple[bytes, str]:
    """A DKIM key pair for b.example: the private key PEM and the public key as a DNS p= value."""
    return dkim_key_pair()


def dkim_config(make_config, public_key: str) -> Config:
    config = untrusted(make_config)
    peer = DkimKey("b.example", "mail", public_key)
    return replace(config, security=replace(config.security, dkim=(peer,)))


def signed(message, private: bytes) -> bytes:
    import dkim

    raw = message.as_bytes(policy=email.policy.SMTP)
    return dkim.sign(raw, b"mail", b"b.example", private, include_headers=[b"from", b"to", b"subject"]) + raw


async def test_dkim_signed_mail_from_a_listed_peer_domain_may_place_a_call(make_config, peer_key) -> None:
    private, public = peer_key
    gw = await started(dkim_config(make_config, public))
    try:
        mail = request_mail("partner@b.example", "cti@a.example", "to: 2001\nfrom: 03-1234-5678\n")
        reply = await submit(gw.smtp_port, signed(mail, private), mail_from="partner@b.example",
                             rcpt_to=["cti@a.example"])
        assert reply.code == 250, reply
        await wait_stage(gw.store, reply.queue_id, "outcome")
        assert [(c.from_number, c.to_number) for c in placed_calls(gw)] == [("0312345678", "2001")]
    finally:
        await gw.stop()


@pytest.mark.parametrize("forgery", ["unsigned", "tampered", "other key"])
async def test_forged_mail_from_a_listed_peer_domain_is_refused(make_config, peer_key, forgery: str) -> None:
    private, public = peer_key
    config = dkim_config(make_config, public)
    # Forged mail is refused even from a trusted network: the domain's signature is what counts.
    gw = await started(replace(config, security=replace(config.security, trusted_networks=("127.0.0.0/8",))))
    try:
        mail = request_mail("partner@b.example", "cti@a.example", "to: 2001\nfrom: 03-1234-5678\n")
        raw = mail.as_bytes(policy=email.policy.SMTP)
        if forgery == "tampered":
            raw = signed(mail, private).replace(b"to: 2001", b"to: 2002")
        elif forgery == "other key":
            raw = signed(mail, _other_private_key())
        reply = await submit(gw.smtp_port, raw, mail_from="partner@b.example", rcpt_to=["cti@a.example"])
        assert (reply.code, reply.text) == (550, "5.7.1 mail from b.example must carry a valid DKIM signature by "
                                                 "b.example (security.dkim)")
        assert placed_calls(gw) == [] and await gw.store.list_messages() == []
        [entry] = await gw.store.audit_entries()
        assert "DKIM" in entry["rule"]
    finally:
        await gw.stop()


def _other_private_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
