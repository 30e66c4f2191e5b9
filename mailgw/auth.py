"""Who is sending: SMTP AUTH against the directory, trusted networks, and the trust decision.

A request may cause a call only when the gateway knows who sent it:

* the client authenticated with SMTP AUTH (PLAIN or LOGIN, offered only after STARTTLS) as a
  person in the directory, and the mail's From is that person; or
* the client connects from a trusted network (``security.trusted_networks``, loopback by
  default), which vouches for its senders the way Postfix's ``mynetworks`` does.

Anyone else may still mail a person (the mail is delivered), but cannot cause a call.

Mail that claims a domain listed in ``security.dkim`` (a peer office, a partner) must carry a valid
DKIM signature by that domain, checked with the configured key; such a signature also authorises
the mail the way SMTP AUTH does. Forged mail from those domains is refused wherever it comes from.

A peer gateway (destinations.yaml, ``accept.login``/``accept.secret``) may log in too: its
session is then trusted as that peer, and the requests it relays are authorised as from their
original senders, provided they are of the peer's domain (``Trust.PEER``).

Passwords are never stored: the directory holds ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` made by
``mailgw passwd``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import dkim
from aiosmtpd.smtp import AuthResult, LoginPassword

from .config import DkimKey
from .directory import Directory, normalise_address

if TYPE_CHECKING:
    from .destinations import Destinations

log = logging.getLogger("mailgw.auth")

# scrypt cost: about 50 ms a check on one core, 16 MiB of memory (OWASP's minimum is N=2**17 for
# interactive logins; SMTP AUTH happens once a session, so this errs on the side of cost).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_secret(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_secret(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class Trust(StrEnum):
    AUTHENTICATED = "authenticated"      # SMTP AUTH as a person in the directory
    TRUSTED_NETWORK = "trusted-network"  # the client's address is in security.trusted_networks
    PEER = "peer"                        # SMTP AUTH as a peer gateway (destinations.yaml); login is its domain
    NONE = "none"


@dataclass(frozen=True)
class Sender:
    """What the gateway knows about the SMTP client of one message."""

    trust: Trust
    peer: str                    # client IP address, for the audit log
    login: str | None = None     # the authenticated address (AUTHENTICATED) or peer domain (PEER)


@dataclass(frozen=True)
class PeerLogin:
    """A session's auth_data when a peer gateway logged in."""

    domain: str


@lru_cache(maxsize=1024)  # asked at every RCPT and DATA; parsing the networks each time showed in profiles
def is_trusted_network(peer: str, networks: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


def session_sender(session: Any, networks: tuple[str, ...]) -> Sender:
    """The trust of an aiosmtpd session (its peer address and AUTH result)."""
    peer = str(session.peer[0]) if session.peer else ""
    if session.authenticated and isinstance(session.auth_data, str):
        return Sender(Trust.AUTHENTICATED, peer, session.auth_data)
    if session.authenticated and isinstance(session.auth_data, PeerLogin):
        return Sender(Trust.PEER, peer, session.auth_data.domain)
    if is_trusted_network(peer, networks):
        return Sender(Trust.TRUSTED_NETWORK, peer)
    return Sender(Trust.NONE, peer)


class DirectoryAuthenticator:
    """aiosmtpd authenticator: PLAIN/LOGIN credentials checked against the directory's hashes.

    On success the session's ``auth_data`` is the person's normalised address, which ingress then
    compares with the From of every request sent in that session.
    """

    def __init__(self, directory: Directory, destinations: Destinations | None = None) -> None:
        self.directory = directory
        self.destinations = destinations

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        person = self.directory.by_address(login)
        password = auth_data.password.decode("utf-8", "replace")
        peer = self.destinations.peer_by_login(login) if self.destinations is not None else None
        if person is None and peer is not None and verify_secret(password, peer.accept.secret or ""):
            log.info("AUTH %s as peer gateway %s from %s", mechanism, peer.domain,
                     session.peer[0] if session.peer else "?")
            return AuthResult(success=True, auth_data=PeerLogin(peer.domain))
        if person is None or person.secret is None or not verify_secret(password, person.secret):
            log.warning("AUTH %s failed for %r from %s", mechanism, login, session.peer[0] if session.peer else "?")
            return AuthResult(success=False, handled=False)
        log.info("AUTH %s as %s from %s", mechanism, person.address, session.peer[0] if session.peer else "?")
        return AuthResult(success=True, auth_data=person.address)


def same_person(login: str, address: str) -> bool:
    return normalise_address(login) == normalise_address(address)


def dkim_signer(raw: bytes, keys: tuple[DkimKey, ...]) -> str | None:
    """The configured domain whose valid DKIM signature ``raw`` carries (its first signature), or
    None. Keys come from the configuration instead of DNS."""
    records = {f"{k.selector}._domainkey.{k.domain}.".lower().encode(): f"v=DKIM1; k=rsa; p={k.public_key}".encode()
               for k in keys}

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.lower())

    verifier = dkim.DKIM(raw, minkey=1024)
    try:
        if verifier.verify(dnsfunc=lookup) and verifier.domain:
            return verifier.domain.decode("ascii", "replace").lower()
    except Exception:  # dkimpy raises on malformed or unknown-key signatures: not validly signed
        return None
    return None
