"""numbering: what people write → a dial string, or ValueError; and which network a number is on."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.config import NumberingConfig
from mailgw.numbering import DIAL_STRING, Network, classify, normalise_number

JP = NumberingConfig(region="JP", extension_pattern=r"[0-9]{2,5}")


@pytest.mark.parametrize("written, dial", [
    ("2001", "2001"),                            # an extension stays
    ("03-1234-5678", "0312345678"),
    ("(03) 1234 5678", "0312345678"),
    ("03.1234.5678", "0312345678"),
    ("  0312345678 ", "0312345678"),
    ("+81 3-1234-5678", "0312345678"),           # own country: the national dialling form
    ("+81 (0)3-1234-5678", "0312345678"),
    ("+81 90-1234-5678", "09012345678"),
    ("０３－１２３４－５６７８", "0312345678"),   # full-width digits and hyphen (CP932)
    ("０３−１２３４−５６７８", "0312345678"),     # full-width digits, minus sign (ISO-2022-JP)
    ("０３ー１２３４ー５６７８", "0312345678"),   # the katakana long-vowel mark, typed as a dash
    ("（０３）１２３４　５６７８", "0312345678"), # full-width parentheses and space
    ("＋８１ ３ １２３４ ５６７８", "0312345678"),
    ("+1 650-253-0000", "01016502530000"),       # foreign: JP's international prefix 010
    ("+44 20 7946 0018", "0104420794600 18".replace(" ", "")),
    ("010 1 650 253 0000", "01016502530000"),    # already written as dialled from Japan
    ("1" * 20, "1" * 20),
])
def test_normalise_number_gives_the_dial_string(written, dial):
    assert normalise_number(written, region="JP") == dial


def test_foreign_numbers_use_the_regions_international_prefix():
    assert normalise_number("+1 650-253-0000", region="AU") == "001116502530000"
    assert normalise_number("+81 3-1234-5678", region="US") == "01181312345678"
    assert normalise_number("+1 650-253-0000", region="US") == "6502530000"


@pytest.mark.parametrize("written, message", [
    ("abc", "'abc' is not a phone number"),
    ("0312345678&", "'0312345678&' is not a phone number"),
    ("2001,2002", "'2001,2002' is not a phone number"),
    ("2001|2002", "'2001|2002' is not a phone number"),
    ("2001/2002", "'2001/2002' is not a phone number"),
    ("2001;2002", "'2001;2002' is not a phone number"),
    ("$2001", "'$2001' is not a phone number"),
    ("{2001}", "'{2001}' is not a phone number"),
    ("2001\n", "'2001\\n' is not a phone number"),
    ("20\n01", "'20\\n01' is not a phone number"),
    ("2001\x00", "'2001\\x00' is not a phone number"),
    ("*2001#", "'*2001#' is not a phone number"),
    ("1-800-FLOWERS", "'1-800-FLOWERS' is not a phone number"),
    ("٠٣١٢٣٤", "'٠٣١٢٣٤' is not a phone number"),  # Arabic-Indic digits are digits, but not ours
    ("20+01", "'20+01' is not a phone number"),
    ("", "an empty value is not a phone number"),
    ("   ", "an empty value is not a phone number"),
    ("--", "'--' is not a phone number"),
    ("1" * 21, "'111111111111111111111' is not a phone number (more than 20 digits)"),
    ("+999 1234", "'+999 1234' is not a phone number (no such country code)"),
    ("+81 312", "'+81 312' is not a phone number (wrong length for +81)"),
    ("+81 1", "'+81 1' is not a phone number (cannot be read)"),
    ("+", "'+' is not a phone number"),
])
def test_anything_else_is_not_a_phone_number(written, message):
    with pytest.raises(ValueError) as caught:
        normalise_number(written, region="JP")
    assert str(caught.value) == message


def test_a_long_value_is_shortened_in_the_message():
    with pytest.raises(ValueError) as caught:
        normalise_number("x" * 500, region="JP")
    assert str(caught.value) == f"'{'x' * 39}…' is not a phone number"


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_any_text_gives_a_dial_string_or_value_error(text):
    try:
        dial = normalise_number(text, region="JP")
    except ValueError as exc:
        assert str(exc)
    else:
        assert re.fullmatch(r"\+?[0-9]{1,20}", dial)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="+0123456789０１２３４５６７８９ -().－−ー（）＋", max_size=30),
       st.sampled_from(["JP", "US", "GB", "AU", "DE"]))
def test_number_like_text_gives_a_dial_string_or_value_error(text, region):
    try:
        dial = normalise_number(text, region=region)
    except ValueError as exc:
        assert str(exc)
    else:
        assert DIAL_STRING.fullmatch(dial)


@pytest.mark.parametrize("number, network", [
    ("2001", Network.EXTENSION),
    ("20", Network.EXTENSION),
    ("20001", Network.EXTENSION),
    ("0312345678", Network.PUBLIC),
    ("09012345678", Network.PUBLIC),
    ("0120123456", Network.PUBLIC),    # toll-free is not toll
    ("0990123456", Network.TOLL),      # premium rate
    ("0570012345", Network.TOLL),      # navi dial (UAN)
    ("01016502530000", Network.TOLL),  # international, through 010
    ("+16502530000", Network.TOLL),
    ("110", Network.EXTENSION),        # three digits match the extension pattern
])
def test_classify(number, network):
    assert classify(number, JP) == network


def test_classify_follows_the_configured_extension_pattern():
    four_digits = NumberingConfig(region="JP", extension_pattern=r"2[0-9]{3}")
    assert classify("2001", four_digits) == Network.EXTENSION
    assert classify("3001", four_digits) == Network.PUBLIC
    assert classify("20011", four_digits) == Network.PUBLIC  # the whole number must match
