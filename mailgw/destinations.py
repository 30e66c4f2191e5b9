"""The destination DB and the CTI database: which peer gateway serves which domain and number.

``config/destinations.yaml`` (config key ``destinations:``) describes the offices this gateway
federates with (seed 004, embodiments 2 and 3):

* ``destinations``: peer domain → where its gateway listens, how to reach it (TLS, AUTH
  credentials) and how that peer proves itself when it relays to us (``accept``);
* ``numbers`` (FIG. 20, the CTIDB): number patterns → the domain whose gateway serves them, so a
  request naming only ``to: 044-890-1234`` goes to the right office;
* ``own_numbers`` (FIG. 8/18, internal/external conversion): this office's external number ranges
  and the extensions they reach;
* per peer, ``accept``: the SMTP AUTH login (and its ``mailgw passwd`` hash) the peer's gateway
  must use when it relays to us, and/or the DKIM key its relayed mail must be signed with.
  Requests from a peer domain with ``accept`` are executed only when proven: with every proof
  configured (``require: all``, the default), or with one of them (``require: any``);
* ``sign``: this gateway's own DKIM key, to sign what it relays.

Loading gives frozen dataclasses; the decisions over them are plain functions here and in
``routing.py``. Unknown keys are errors, like in gateway.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from .config import ConfigError, DkimKey, HostPort, PolicyConfig, _hostport, _no_unknown
from .numbering import Network
from .policy import PatternError, check_number, compile_pattern, matches
from .request import ExchangeRequest
from .yamlfile import read_yaml


class TlsMode(StrEnum):
    NONE = "none"          # plain SMTP (only for a peer on a trusted link)
    STARTTLS = "starttls"  # plain connect, then STARTTLS (the default; required for AUTH)
    TLS = "tls"            # implicit TLS from the first byte (port 465 style)
    MAY = "may"            # STARTTLS when offered, certificate not checked (MX delivery, like Postfix's "may")


class Proof(StrEnum):
    """A way a peer gateway proves that a relayed request really comes from it."""

    LOGIN = "login"  # it logged in with SMTP AUTH (after STARTTLS) as the peer
    DKIM = "dkim"    # the mail carries a valid DKIM signature by the peer's domain


class Require(StrEnum):
    ALL = "all"  # every proof configured (the default: a leaked password or a replayed signed mail is not enough)
    ANY = "any"  # one of them is enough (e.g. while a peer moves from AUTH to DKIM)


@dataclass(frozen=True)
class PeerAcceptance:
    """How a peer gateway proves itself when it relays to us."""

    login: str | None = None                   # SMTP AUTH user name the peer logs in with ...
    secret: str | None = field(default=None, repr=False)  # ... and its scrypt hash (mailgw passwd)
    dkim: DkimKey | None = None                # and/or: its mail is DKIM-signed by its domain with this key
    require: Require = Require.ALL             # with both configured: both, or either

    @property
    def proofs(self) -> tuple[Proof, ...]:
        """The proofs configured for this peer (none: requests from its domain are not trusted as relayed)."""
        return tuple(p for p, configured in ((Proof.LOGIN, self.login), (Proof.DKIM, self.dkim)) if configured)


@dataclass(frozen=True)
class Signing:
    """This gateway DKIM-signs the mail it relays (``sign:``), so peers can check it came from us."""

    domain: str
    selector: str
    private_key: bytes = field(repr=False)  # PEM


@dataclass(frozen=True)
class Destination:
    domain: str
    host: HostPort
    tls: TlsMode = TlsMode.STARTTLS
    ca_file: Path | None = None        # trust this certificate / CA for the peer (self-signed peers)
    server_name: str | None = None     # the name its certificate must carry (default: the domain)
    login: str | None = None           # our AUTH credentials at the peer
    password: str | None = field(default=None, repr=False)
    service_mailbox: str = "cti"       # the peer's service mailbox, for requests routed by number
    accept: PeerAcceptance = PeerAcceptance()


@dataclass(frozen=True)
class NumberRoute:
    pattern: str   # a policy.py number pattern, e.g. 044890XXXX
    domain: str


@dataclass(frozen=True)
class OwnRange:
    """External numbers ``external`` + N digits reach extension ``extension`` + the same digits."""

    external: str   # prefix as dialled from outside, e.g. 044890
    extension: str  # prefix of the extension, often ""
    digits: int     # how many trailing digits the two share


@dataclass(frozen=True)
class Destinations:
    peers: tuple[Destination, ...] = ()
    numbers: tuple[NumberRoute, ...] = ()
    own_numbers: tuple[OwnRange, ...] = ()
    sign: Signing | None = None

    def peer(self, domain: str) -> Destination | None:
        return next((p for p in self.peers if p.domain == domain.lower()), None)

    def peer_by_login(self, login: str) -> Destination | None:
        return next((p for p in self.peers if p.accept.login and p.accept.login == login), None)


# --- decisions -------------------------------------------------------------------------------------

def domain_for_number(number: str, db: Destinations) -> str | None:
    """The peer domain whose gateway serves ``number`` (CTIDB, first match), or None."""
    return next((r.domain for r in db.numbers if matches(number, r.pattern)), None)


def to_extension(number: str, ranges: tuple[OwnRange, ...]) -> str | None:
    """This office's extension for one of its external numbers (FIG. 18), or None."""
    for r in ranges:
        tail = number[len(r.external):]
        if number.startswith(r.external) and len(tail) == r.digits and tail.isdigit():
            return r.extension + tail
    return None


def localise(request: ExchangeRequest, ranges: tuple[OwnRange, ...], policy: PolicyConfig) -> ExchangeRequest:
    """A request for one of this office's external numbers calls the extension instead (FIG. 18:
    another office dials 044-890-2001, our PBX rings 2001). The extension must pass the policy too."""
    extension = to_extension(request.to_number, ranges) if request.to_number else None
    if extension is None:
        return request
    check_number(extension, policy, field="to")
    return replace(request, to_number=extension, network=Network.EXTENSION)


def to_external(extension: str, ranges: tuple[OwnRange, ...]) -> str | None:
    """The external number of one of this office's extensions (what another office dials), or None."""
    for r in ranges:
        tail = extension[len(r.extension):]
        if extension.startswith(r.extension) and len(tail) == r.digits and tail.isdigit():
            return r.external + tail
    return None


def unmet_proofs(accept: PeerAcceptance, proven: frozenset[Proof]) -> tuple[Proof, ...]:
    """What is missing before a relayed request from the peer may run: nothing, or the proofs to
    name in the refusal (under ``require: any``, all of them: one would have done)."""
    configured = accept.proofs
    if accept.require is Require.ANY:
        return () if not configured or proven & set(configured) else configured
    return tuple(p for p in configured if p not in proven)


# --- loading ---------------------------------------------------------------------------------------

def load_destinations(path: Path | None) -> Destinations:
    if path is None:
        return Destinations()
    raw = read_yaml(path, ConfigError) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    _no_unknown(raw, {"destinations", "numbers", "own_numbers", "sign"}, "")
    base = Path(path).resolve().parent
    peers = raw.get("destinations") or {}
    if not isinstance(peers, dict):
        raise ConfigError("destinations: must be a mapping of domain to peer gateway")
    return Destinations(
        peers=tuple(_peer(str(domain).lower(), entry or {}, base) for domain, entry in peers.items()),
        numbers=tuple(_number_route(i, e) for i, e in enumerate(_list(raw, "numbers"), start=1)),
        own_numbers=tuple(_own_range(i, e) for i, e in enumerate(_list(raw, "own_numbers"), start=1)),
        sign=_signing(raw["sign"], base) if raw.get("sign") is not None else None,
    )


def _signing(raw: Any, base: Path) -> Signing:
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) and raw[k] for k in ("domain", "selector", "key")):
        raise ConfigError("sign: needs domain, selector and key (a PEM file with the RSA private key)")
    _no_unknown(raw, {"domain", "selector", "key"}, "sign.")
    try:
        pem = (base / raw["key"]).read_bytes()
    except OSError as exc:
        raise ConfigError(f"sign.key: cannot read {raw['key']}: {exc.strerror}") from None
    return Signing(raw["domain"].lower(), raw["selector"], pem)


def _list(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be a list")
    return value


def _peer(domain: str, entry: Any, base: Path) -> Destination:
    where = f"destinations.{domain}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a mapping")
    _no_unknown(entry, {"host", "tls", "ca", "server_name", "login", "password", "password_env", "service",
                        "accept"}, f"{where}.")
    host = _hostport(entry.get("host"), None, f"{where}.host")
    if host is None:
        raise ConfigError(f"{where}.host: required (host:port of the peer gateway)")
    try:
        tls = TlsMode(entry.get("tls", "starttls"))
    except ValueError:
        raise ConfigError(f"{where}.tls: must be none, starttls or tls") from None
    if tls is TlsMode.MAY:
        raise ConfigError(f"{where}.tls: must be none, starttls or tls (a peer's certificate is always checked)")
    password = os.environ.get(entry["password_env"]) if entry.get("password_env") else entry.get("password")
    if entry.get("login") and tls is TlsMode.NONE:
        raise ConfigError(f"{where}: AUTH credentials need tls: starttls or tls (no password in clear)")
    ca = entry.get("ca")
    return Destination(
        domain=domain, host=host, tls=tls,
        ca_file=(base / ca) if ca else None,
        server_name=entry.get("server_name"),
        login=entry.get("login"), password=password,
        service_mailbox=str(entry.get("service", "cti")),
        accept=_acceptance(entry.get("accept") or {}, domain, where),
    )


def _acceptance(raw: Any, domain: str, where: str) -> PeerAcceptance:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.accept: must be a mapping")
    _no_unknown(raw, {"login", "secret", "dkim", "require"}, f"{where}.accept.")
    if bool(raw.get("login")) != bool(raw.get("secret")):
        raise ConfigError(f"{where}.accept: login and secret go together (secret from `mailgw passwd`)")
    dkim = raw.get("dkim")
    key = None
    if dkim is not None:
        if not isinstance(dkim, dict) or not dkim.get("selector") or not dkim.get("public_key"):
            raise ConfigError(f"{where}.accept.dkim: needs selector and public_key (the p= of its DKIM record)")
        _no_unknown(dkim, {"selector", "public_key"}, f"{where}.accept.dkim.")
        key = DkimKey(domain, str(dkim["selector"]), "".join(str(dkim["public_key"]).split()))
    try:
        require = Require(raw.get("require", "all"))
    except ValueError:
        raise ConfigError(f"{where}.accept.require: must be all (every proof configured) or any (one of them), "
                          f"not {raw['require']!r}") from None
    if "require" in raw and not (raw.get("login") or key):
        raise ConfigError(f"{where}.accept.require: there is nothing to require: configure login/secret and/or dkim")
    return PeerAcceptance(login=raw.get("login"), secret=raw.get("secret"), dkim=key, require=require)


def _number_route(index: int, entry: Any) -> NumberRoute:
    where = f"numbers[{index}]"
    if not isinstance(entry, dict) or not entry.get("pattern") or not entry.get("domain"):
        raise ConfigError(f"{where}: needs pattern and domain")
    _no_unknown(entry, {"pattern", "domain"}, f"{where}.")
    try:
        compile_pattern(str(entry["pattern"]))
    except PatternError as exc:
        raise ConfigError(f"{where}.pattern: {exc}") from None
    return NumberRoute(str(entry["pattern"]), str(entry["domain"]).lower())


def _own_range(index: int, entry: Any) -> OwnRange:
    where = f"own_numbers[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a mapping")
    _no_unknown(entry, {"external", "extension", "digits"}, f"{where}.")
    external, extension, digits = str(entry.get("external", "")), str(entry.get("extension", "")), entry.get("digits")
    if not external.isdigit() or (extension and not extension.isdigit()) or not isinstance(digits, int) or digits < 1:
        raise ConfigError(f"{where}: needs external (digits), digits (a whole number) and optionally extension")
    return OwnRange(external, extension, digits)
