"""The directory: the people the gateway knows, by mail address and by extension.

It turns a To address into the destination's extension and a From address into the sender's
number, and says which language a person reads. Loaded from ``config/directory.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from email_validator import EmailNotValidError, validate_email

from .imapbox import ImapAccount
from .yamlfile import read_yaml


class DirectoryError(Exception):
    """A directory file that cannot be used; the message names the entry."""


@dataclass(frozen=True)
class Person:
    address: str  # normalised: lower-case domain, as email-validator returns it
    name: str
    extension: str
    language: str = "en"
    groups: tuple[str, ...] = ()
    numbers: tuple[str, ...] = field(default=())  # other numbers that are this person (mobile, DID)
    secret: str | None = field(default=None, repr=False)  # SMTP AUTH password hash (mailgw passwd)
    imap: ImapAccount | None = None  # a remote IMAP mailbox; None: the embedded Maildir
    receipt_mailbox: str | None = None  # backend mdn: mail goes on to this address, a read receipt triggers
    fax: str | None = None  # the person's fax machine: where a scenario's `fax` step sends by default

    @property
    def local_part(self) -> str:
        return self.address.rpartition("@")[0]


@dataclass(frozen=True)
class Directory:
    people: tuple[Person, ...] = ()
    representative: str | None = None  # where mail for "nobody in particular" goes

    def by_address(self, address: str) -> Person | None:
        wanted = normalise_address(address)
        if wanted is None:
            return None
        for person in self.people:
            if person.address == wanted:
                return person
        return None

    def by_extension(self, extension: str) -> Person | None:
        for person in self.people:
            if person.extension == extension or extension in person.numbers:
                return person
        return None


@lru_cache(maxsize=4096)  # email-validator costs ~0.1 ms a call, and a mail asks 5-10 times
def normalise_address(address: str) -> str | None:
    """The comparable form of a mail address (local part kept, domain lower-cased), or None."""
    try:
        checked = validate_email(address.strip(), check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return None
    local, _, domain = checked.normalized.rpartition("@")
    return f"{local.lower()}@{domain.lower()}"


def load_directory(path: Path) -> Directory:
    raw = read_yaml(path, DirectoryError) or {}
    if not isinstance(raw, dict):
        raise DirectoryError(f"{path}: the top level must be a mapping with 'people'")
    people = []
    seen_addresses: set[str] = set()
    seen_extensions: set[str] = set()
    for index, entry in enumerate(raw.get("people") or [], start=1):
        person = _person(entry, f"{path}: people[{index}]")
        if person.address in seen_addresses:
            raise DirectoryError(f"{path}: people[{index}]: address {person.address} is listed twice")
        if person.extension in seen_extensions:
            raise DirectoryError(f"{path}: people[{index}]: extension {person.extension} is listed twice")
        seen_addresses.add(person.address)
        seen_extensions.add(person.extension)
        people.append(person)
    representative = raw.get("representative")
    if representative is not None:
        representative = normalise_address(str(representative))
        if representative is None:
            raise DirectoryError(f"{path}: representative: not a mail address")
    return Directory(tuple(people), representative)


def _person(entry: object, where: str) -> Person:
    if not isinstance(entry, dict):
        raise DirectoryError(f"{where}: must be a mapping")
    unknown = set(entry) - {"address", "name", "extension", "language", "groups", "numbers", "secret", "mailbox",
                                 "fax"}
    if unknown:
        raise DirectoryError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    address = normalise_address(str(entry.get("address", "")))
    if address is None:
        raise DirectoryError(f"{where}: address {entry.get('address')!r} is not a mail address")
    extension = str(entry.get("extension", ""))
    if not extension.isdigit():
        raise DirectoryError(f"{where}: extension {extension!r} must be digits")
    return Person(
        address=address,
        name=str(entry.get("name") or address),
        extension=extension,
        language=str(entry.get("language") or "en"),
        groups=tuple(str(g) for g in entry.get("groups") or ()),
        numbers=tuple(str(n) for n in entry.get("numbers") or ()),
        secret=_secret(entry.get("secret"), where),
        imap=_mailbox(entry.get("mailbox"), where),
        receipt_mailbox=_receipt_mailbox(entry.get("mailbox"), where),
        fax=_fax(entry.get("fax"), where),
    )


def _fax(value: object, where: str) -> str | None:
    if value is None:
        return None
    number = str(value)
    if not number.isdigit():
        raise DirectoryError(f"{where}: fax {number!r} must be digits (an extension or a number)")
    return number


_IMAP_KEYS = {"backend", "host", "port", "tls", "username", "password", "folder"}


def _mailbox(value: object, where: str) -> ImapAccount | None:
    """``mailbox: {backend: maildir}`` (the default) or ``{backend: imap, host, port, ...}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DirectoryError(f"{where}: mailbox must be a mapping such as {{backend: imap, host: ...}}")
    backend = value.get("backend", "maildir")
    if backend == "mdn":
        return None
    if backend == "maildir":
        if set(value) - {"backend"}:
            raise DirectoryError(f"{where}: mailbox: backend maildir takes no other keys")
        return None
    if backend != "imap":
        raise DirectoryError(f"{where}: mailbox.backend must be maildir, imap or mdn, not {backend!r}")
    unknown = set(value) - _IMAP_KEYS
    if unknown:
        raise DirectoryError(f"{where}: mailbox: unknown key {sorted(unknown)[0]!r}")
    tls = value.get("tls", "none")
    if tls not in ("none", "tls"):
        raise DirectoryError(f"{where}: mailbox.tls must be none or tls (IMAPS; STARTTLS is not offered)")
    for key in ("host", "username", "password"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise DirectoryError(f"{where}: mailbox.{key} is required for backend imap")
    port = value.get("port", 993 if tls == "tls" else 143)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise DirectoryError(f"{where}: mailbox.port must be a port number")
    return ImapAccount(host=value["host"], port=port, username=value["username"], password=value["password"],
                       tls=tls == "tls", folder=str(value.get("folder", "INBOX")))


def _secret(value: object, where: str) -> str | None:
    # Only hashes belong in the directory: a plain password there would be read by everyone who
    # can read the file. ``mailgw passwd`` prints the hash to paste.
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("scrypt$"):
        raise DirectoryError(f"{where}: secret must be a hash made by 'mailgw passwd' (scrypt$...)")
    return value


def _receipt_mailbox(value: object, where: str) -> str | None:
    """``mailbox: {backend: mdn, address: bob@mail.example}``: the address the mail is sent on to."""
    if not isinstance(value, dict) or value.get("backend") != "mdn":
        return None
    if set(value) - {"backend", "address"}:
        raise DirectoryError(f"{where}: mailbox: backend mdn takes only 'address'")
    address = normalise_address(str(value.get("address", "")))
    if address is None:
        raise DirectoryError(f"{where}: mailbox.address must be the mail address to send the request on to")
    return address
