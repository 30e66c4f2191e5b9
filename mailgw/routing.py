"""Where a recipient's mail goes: a plain decision over the configuration and the directory.

At RCPT time the gateway must know whether it will take a recipient at all. Local people and the
service mailboxes are taken; an unknown local address is refused (550 5.1.1); a foreign domain is
refused (550 5.7.1) because mailgw is never an open relay. The gateway's own address (the From of
its result mails) is taken too: replies to its mail can cancel a camp-on (``replies.py``).

A domain in the destination DB (``destinations.py``) is relayed to its peer gateway; with
``relay.mx: true`` any other domain is relayed to its MX. Relaying is only for clients that may
relay (SMTP AUTH, trusted networks, authenticated peers): everyone else gets 550 5.7.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .config import Config, HostPort
from .destinations import Destination, Destinations, TlsMode
from .directory import Directory, normalise_address
from .inquiry import answer_token
from .mdn import token_of
from .status import Refused


class RouteKind(StrEnum):
    PERSON = "person"    # a person in the directory: requests call them; plain mail goes to their mailbox
    SERVICE = "service"  # a service mailbox (cti@...): requests name the number to call
    GATEWAY = "gateway"  # the gateway's own address (config.sender_address): replies to its mail
    RELAY = "relay"      # another office's domain: queued and relayed to its gateway (relay.py)


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    address: str  # normalised recipient address


def route_recipient(address: str, config: Config, directory: Directory,
                    destinations: Destinations = Destinations(), *, may_relay: bool = False) -> Route:
    """The route for one RCPT TO address, or Refused with the SMTP reply to give.

    ``may_relay``: the client may have mail relayed (authenticated, trusted network, or a peer)."""
    normalised = normalise_address(address)
    if normalised is None:
        raise Refused(501, "5.1.3", f"bad recipient address syntax: {address!r}")
    local, _, domain = normalised.rpartition("@")
    if not config.is_local_domain(domain):
        if relay_known(domain, destinations, mx=config.relay.mx) is None:
            raise Refused(550, "5.7.1", f"relaying denied: {domain} is not a domain this gateway serves "
                                        "or relays to")
        if not may_relay:
            raise Refused(550, "5.7.1", f"relaying denied: authenticate (SMTP AUTH after STARTTLS) to send "
                                        f"to {domain}")
        return Route(RouteKind.RELAY, normalised)
    if local in config.requests.service_mailboxes:
        return Route(RouteKind.SERVICE, normalised)
    if normalised == (normalise_address(config.sender_address) or config.sender_address.lower()):
        return Route(RouteKind.GATEWAY, normalised)  # replies: "cancel" (mailgw/replies.py)
    if token_of(normalised, config.sender_address) is not None:
        return Route(RouteKind.GATEWAY, normalised)  # a read receipt for an on-read request (mailgw/mdn.py)
    if answer_token(normalised, config.sender_address) is not None:
        return Route(RouteKind.GATEWAY, normalised)  # an answer to a scenario's inquiry (mailgw/inquiry.py)
    if directory.by_address(normalised) is not None:
        return Route(RouteKind.PERSON, normalised)
    raise Refused(550, "5.1.1", f"no such user here: {normalised}")


class RelayVia(StrEnum):
    DESTINATION_DB = "destination-db"
    MX = "mx"


def relay_known(domain: str, destinations: Destinations, *, mx: bool) -> RelayVia | None:
    """How mail for a foreign ``domain`` would be relayed, or None when it may not be."""
    if destinations.peer(domain) is not None:
        return RelayVia.DESTINATION_DB
    return RelayVia.MX if mx else None


def mx_destination(domain: str, answer: list[tuple[int, str]], port: int = 25) -> Destination | None:
    """The destination for ``domain`` from its MX records ((preference, exchange) pairs): the most
    preferred exchange, with opportunistic STARTTLS. RFC 5321 5.1: no MX means the domain itself
    (its A record); a single "." exchange (RFC 7505 null MX) means the domain takes no mail."""
    if not answer:
        return Destination(domain, HostPort(domain, port), TlsMode.MAY)
    preference, exchange = min(answer)
    exchange = exchange.rstrip(".")
    if not exchange:
        return None
    return Destination(domain, HostPort(exchange, port), TlsMode.MAY)


class NoSuchDomain(Exception):
    """DNS says the domain does not exist (NXDOMAIN): mail for it can never be delivered."""


async def resolve_mx(domain: str, nameservers: tuple[HostPort, ...] = ()) -> list[tuple[int, str]]:
    """The MX records of ``domain`` via dnspython ([] when it has none); NoSuchDomain for NXDOMAIN.
    Timeouts and server failures raise dnspython's own errors, which the outbox retries.
    ``nameservers``: ask these instead of the system's resolvers (relay.dns)."""
    import dns.asyncresolver
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = [n.host for n in nameservers]
        resolver.port = nameservers[0].port
    resolver.lifetime = 10
    try:
        answer = await resolver.resolve(domain, "MX")
    except dns.resolver.NoAnswer:
        return []
    except dns.resolver.NXDOMAIN:
        raise NoSuchDomain(domain) from None
    return [(int(r.preference), r.exchange.to_text()) for r in answer]
