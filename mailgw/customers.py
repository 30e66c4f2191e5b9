"""The customer database: who calls us, and who here is in charge of them (seed 002, FIG. 4).

Imported from CSV or YAML with ``mailgw customers import FILE``; each row (or YAML mapping) has

    name, department, contact, phone, fax, address, importance, owner, owner_address, language

``name`` and at least one of ``phone`` / ``fax`` are required; ``owner_address`` is the mail address
of our person in charge (missed calls from this customer go there). Several numbers may be given in
one cell, separated by ``;``. Numbers are normalised with ``phonenumbers`` to E.164 in the
configured region (``numbering.region``), so ``03-1234-5678``, ``0312345678``, ``+81312345678`` and
the number the PBX shows all match. A row that cannot be used is rejected with a reason naming its
line (CSV) or entry (YAML); the others are imported. An import replaces the whole database.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import phonenumbers
import yaml

from .directory import normalise_address
from .numbering import parse_number

FIELDS = ("name", "department", "contact", "phone", "fax", "address", "importance", "owner", "owner_address",
          "language")
LANGUAGES = ("en", "ja")


@dataclass(frozen=True)
class Customer:
    name: str
    department: str = ""
    contact: str = ""
    phone: str = ""
    fax: str = ""
    address: str = ""
    importance: str = ""
    owner: str = ""
    owner_address: str | None = None
    language: str | None = None
    numbers: tuple[str, ...] = field(default=())  # E.164 forms of phone and fax numbers

    def row(self) -> dict[str, Any]:
        """The mapping ``Store.replace_customers`` takes."""
        return {**{name: getattr(self, name) for name in FIELDS}, "numbers": self.numbers}


@dataclass(frozen=True)
class Rejected:
    where: str   # "line 4" (CSV, counting the header as line 1) or "entry 3" (YAML)
    reason: str


@dataclass(frozen=True)
class ImportResult:
    customers: tuple[Customer, ...]
    rejected: tuple[Rejected, ...]


@lru_cache(maxsize=4096)  # every answered call and every incoming one asks; phonenumbers is slow
def number_key(text: str | None, region: str, *, strict: bool = False) -> str | None:
    """The E.164 form of a phone number as a person or a PBX writes it, or None when it is none.

    Full-width digits are folded first (NFKC). A number without a country code is read in
    ``region``; a caller ID without the trunk prefix ``0`` (some carriers send ``312345678``) is not
    guessed at: it simply matches nothing. ``strict`` (imports) also wants the number to be valid
    in its country's numbering plan (phonenumbers' metadata), not only of a possible length.
    """
    if not text:
        return None
    folded = unicodedata.normalize("NFKC", text).strip()
    try:
        parsed = parse_number(folded, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(parsed) or (strict and not phonenumbers.is_valid_number(parsed)):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def display_number(key: str | None, region: str) -> str:
    """A number as people here write it (``03-1234-5678``); foreign ones internationally."""
    if not key:
        return ""
    try:
        parsed = phonenumbers.parse(key, region)
    except phonenumbers.NumberParseException:
        return key
    own = phonenumbers.region_code_for_number(parsed) == region
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL if own
                                      else phonenumbers.PhoneNumberFormat.INTERNATIONAL)


def parse_customers(entries: list[tuple[str, Any]], region: str) -> ImportResult:
    """Check each (where, mapping) entry; the usable customers and the rejected entries."""
    customers: list[Customer] = []
    rejected: list[Rejected] = []
    seen: dict[str, str] = {}  # number -> where it was first given
    for where, entry in entries:
        try:
            customer = _customer(entry, region)
        except ValueError as exc:
            rejected.append(Rejected(where, str(exc)))
            continue
        twice = [n for n in customer.numbers if n in seen]
        if twice:
            rejected.append(Rejected(where, f"number {twice[0]} is already the number of {seen[twice[0]]}"))
            continue
        for number in customer.numbers:
            seen[number] = f"{customer.name} ({where})"
        customers.append(customer)
    return ImportResult(tuple(customers), tuple(rejected))


def _customer(entry: Any, region: str) -> Customer:
    if isinstance(entry, str):  # read_entries already knows what is wrong with it
        raise ValueError(entry)
    if not isinstance(entry, dict):
        raise ValueError("not a mapping of fields")
    values = {str(k).strip().lower(): ("" if v is None else str(v).strip()) for k, v in entry.items() if k}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")
    if not values.get("name"):
        raise ValueError("name is missing")
    numbers: list[str] = []
    for column in ("phone", "fax"):
        for written in filter(None, (part.strip() for part in values.get(column, "").split(";"))):
            key = number_key(written, region, strict=True)
            if key is None:
                raise ValueError(f"{column} {written!r} is not a phone number")
            if key not in numbers:
                numbers.append(key)
    if not numbers:
        raise ValueError("phone or fax is needed to recognise the caller")
    owner_address = None
    if values.get("owner_address"):
        owner_address = normalise_address(values["owner_address"])
        if owner_address is None:
            raise ValueError(f"owner_address {values['owner_address']!r} is not a mail address")
    language = values.get("language") or None
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"language {language!r}: use one of {', '.join(LANGUAGES)}")
    text = {name: values.get(name, "") for name in FIELDS if name not in ("owner_address", "language")}
    return Customer(**text, owner_address=owner_address, language=language, numbers=tuple(numbers))


def read_entries(path: Path) -> list[tuple[str, Any]]:
    """(where, mapping) for each row of a CSV file or entry of a YAML file (by its suffix).

    CSV: UTF-8 (a byte-order mark is fine), a header row naming the fields. YAML: a list of
    mappings, or a mapping with ``customers:`` holding that list. ValueError when the file as a
    whole cannot be read.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if isinstance(data, dict) and "customers" in data:
            data = data["customers"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of customers (or 'customers:' holding one)")
        return [(f"entry {index}", entry) for index, entry in enumerate(data, start=1)]
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "name" not in [f.strip().lower() for f in reader.fieldnames if f]:
        raise ValueError(f"{path}: the first line must name the columns ({', '.join(FIELDS)})")
    entries: list[tuple[str, Any]] = []
    for row in reader:
        if None in row:  # more cells than columns
            entries.append((f"line {reader.line_num}", "more cells than the header has columns"))
            continue
        if not any((v or "").strip() for v in row.values()):
            continue  # blank line
        entries.append((f"line {reader.line_num}", row))
    return entries
