"""Where a recipient's mail goes: a plain decision over the configuration and the directory.

At RCPT time the gateway must know whether it will take a recipient at all. Local people and the
service mailboxes are taken; an unknown local address is refused (550 5.1.1); a foreign domain is
refused (550 5.7.1) because mailgw is never an open relay. The gateway's own address (the From of
its result mails) is taken too: replies to its mail can cancel a camp-on (``replies.py``). Relaying to peer gateways through the
destination DB comes with the federation work and will add a RELAY route here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .config import Config
from .directory import Directory, normalise_address
from .inquiry import answer_token
from .mdn import token_of
from .status import Refused


class RouteKind(StrEnum):
    PERSON = "person"    # a person in the directory: requests call them; plain mail goes to their mailbox
    SERVICE = "service"  # a service mailbox (cti@...): requests name the number to call
    GATEWAY = "gateway"  # the gateway's own address (config.sender_address): replies to its mail


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    address: str  # normalised recipient address


def route_recipient(address: str, config: Config, directory: Directory) -> Route:
    """The route for one RCPT TO address, or Refused with the SMTP reply to give."""
    normalised = normalise_address(address)
    if normalised is None:
        raise Refused(501, "5.1.3", f"bad recipient address syntax: {address!r}")
    local, _, domain = normalised.rpartition("@")
    if not config.is_local_domain(domain):
        raise Refused(550, "5.7.1", f"relaying denied: {domain} is not a domain this gateway serves")
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
