"""Phone numbers: what a person writes in a mail, turned into a string the PBX may dial.

A number reaches the PBX inside an AMI dial string, so whatever a mail says is reduced to
``^\\+?[0-9]{1,20}$`` here or refused with ``ValueError`` — there is no third way. The rules:

* Full-width forms (``０３－１２３４－５６７８``, ``＋８１``) are folded by NFKC first, and the dashes
  Japanese keyboards produce (``ー``, ``−``, ``‐`` …) count as separators, like ``-``, ``.``,
  spaces and parentheses. Any other character (letters, ``&``, ``,``, ``|``, ``/``, ``;``, ``$``,
  ``{``, ``#``, ``*``, control characters) makes the text "not a phone number": vanity letters
  and DTMF symbols never reach a dial string.
* A number written **without** ``+`` is already written the way one dials it from here (an
  extension ``2001``, a national ``03-1234-5678``, an international ``010 1 650…``), so its dial
  string is simply its digits. Rewriting it could only change what the writer meant.
* A number written **with** ``+`` (E.164) is read by ``phonenumbers``: one of the own region's
  numbers becomes its national dialling form (``+81 3-1234-5678`` → ``0312345678`` for JP); a
  foreign one becomes the region's international dialling form (``+1 650-253-0000`` →
  ``01016502530000`` for JP). Only when the region has no single international prefix does the
  number stay E.164 (``+…``); policy patterns can match that ``+``.
* At most 20 digits, before and after formatting.

``classify`` names the network a number is on (see its docstring for the rule).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from enum import StrEnum

import phonenumbers
from phonenumbers import PhoneNumberType

from .config import NumberingConfig

MAX_DIGITS = 20

# The one shape that may leave this module; [0-9], never \d (which matches any Unicode digit).
DIAL_STRING = re.compile(r"\+?[0-9]{1,20}")

# Separators people put in numbers, after NFKC folding: space, -, ., ( ), and the dash look-alikes
# that Japanese input methods produce (NFKC keeps these as they are).
_SEPARATORS = " \t-.()\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u30fc"
_WRITTEN_NUMBER = re.compile(r"\+?[0-9" + re.escape(_SEPARATORS) + r"]*")

# Numbers that cost more than an ordinary call (phonenumbers' view of the national plan).
_TOLL_TYPES = {PhoneNumberType.PREMIUM_RATE, PhoneNumberType.SHARED_COST, PhoneNumberType.UAN}


class Network(StrEnum):
    EXTENSION = "extension"  # an internal extension of this PBX
    TOLL = "toll"            # international, premium-rate or shared-cost: costs extra
    PUBLIC = "public"        # any other number on the public network


def normalise_number(text: str, *, region: str) -> str:
    """The dial string for a number as a person wrote it, or ValueError with a short reason.

    ``region`` is a phonenumbers region code (``JP``): how ``+`` numbers are turned into the form
    dialled from here. The result always matches ``DIAL_STRING``.
    """
    # Only blanks are trimmed: a line break anywhere, even at the end, is refused.
    written = unicodedata.normalize("NFKC", text).strip(" \t")
    if not written:
        raise ValueError("an empty value is not a phone number")
    if not _WRITTEN_NUMBER.fullmatch(written):
        raise ValueError(f"{show(text)} is not a phone number")
    digits = re.sub(r"[^0-9]", "", written)
    if not digits:
        raise ValueError(f"{show(text)} is not a phone number")
    if len(digits) > MAX_DIGITS:
        raise ValueError(f"{show(text)} is not a phone number (more than {MAX_DIGITS} digits)")
    dial = _dial_form_of_e164(written, region, text) if written.startswith("+") else digits
    if not DIAL_STRING.fullmatch(dial):  # e.g. an international prefix pushed it past 20 digits
        raise ValueError(f"{show(text)} is not a phone number (more than {MAX_DIGITS} digits to dial)")
    return dial


def _dial_form_of_e164(written: str, region: str, original: str) -> str:
    try:
        number = phonenumbers.parse(written, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"{show(original)} is not a phone number ({_parse_problem(exc)})") from None
    if not phonenumbers.is_possible_number(number):
        raise ValueError(f"{show(original)} is not a phone number (wrong length for +{number.country_code})")
    if number.country_code == phonenumbers.country_code_for_region(region):
        formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    else:
        formatted = phonenumbers.format_out_of_country_calling_number(number, region)
    plus = "+" if formatted.lstrip().startswith("+") else ""
    return plus + re.sub(r"[^0-9]", "", formatted)


def _parse_problem(exc: phonenumbers.NumberParseException) -> str:
    if exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
        return "no such country code"
    return "cannot be read"


def classify(number: str, numbering: NumberingConfig) -> Network:
    """The network of a dial string (from ``normalise_number``).

    The rule: a number that fully matches ``numbering.extension_pattern`` is an extension.
    Otherwise it is ``toll`` when it costs extra — international (``+…``, or starting with the
    region's international dialling prefix such as ``010`` in Japan) or, according to
    phonenumbers, a premium-rate, shared-cost or universal-access number (``0990…``, ``0570…``
    in Japan) — and ``public`` for everything else. The network labels the call; it never
    loosens policy, which checks every number on its own.
    """
    return _network(number, numbering.extension_pattern, numbering.region)


@functools.lru_cache(maxsize=4096)
def parse_number(text: str, region: str) -> phonenumbers.PhoneNumber:
    """``phonenumbers.parse(text, region)``, remembered (callers must not change the result): a
    request's number is read when it is classified and again when its call is answered (the
    missed-call follow-up), and phonenumbers takes some 40 µs a time."""
    return phonenumbers.parse(text, region)


@functools.lru_cache(maxsize=4096)  # the same few numbers come again and again; phonenumbers is slow
def _network(number: str, extension_pattern: str, region: str) -> Network:
    if re.fullmatch(extension_pattern, number):
        return Network.EXTENSION
    if number.startswith("+") or _starts_with_international_prefix(number, region):
        return Network.TOLL
    try:
        parsed = parse_number(number, region)
    except phonenumbers.NumberParseException:
        return Network.PUBLIC
    if phonenumbers.number_type(parsed) in _TOLL_TYPES:
        return Network.TOLL
    return Network.PUBLIC


def _starts_with_international_prefix(number: str, region: str) -> bool:
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    prefix = metadata.international_prefix if metadata is not None else None
    return bool(prefix) and re.match(f"(?:{prefix})", number) is not None


def printable(text: str) -> str:
    """``text`` with its control characters (CR, LF, ...) written as escapes: safe in a reply line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def show(text: str, limit: int = 40) -> str:
    """A value from a mail, quoted for a reply or log line: shortened, control characters made visible."""
    cleaned = printable(text)
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1] + "…"
    return f"'{cleaned}'"
