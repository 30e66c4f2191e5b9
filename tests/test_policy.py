"""policy: number patterns, allow/deny, the per-sender rate limit."""

import pytest

from mailgw.config import PolicyConfig
from mailgw.policy import PatternError, check_number, check_rate, compile_pattern, matches
from mailgw.status import Refused

DEFAULT = PolicyConfig()


@pytest.mark.parametrize("pattern, number, expected", [
    ("2001", "2001", True),
    ("2001", "20011", False),        # the whole number must match
    ("2XXX", "2999", True),
    ("2xxx", "2000", True),
    ("2XXX", "3000", False),
    ("2XXX", "200", False),
    ("NXX", "200", True),
    ("NXX", "100", False),
    ("NXX", "010", False),
    ("ZX", "10", True),
    ("ZX", "01", False),
    ("[125]X", "15", True),
    ("[125]X", "35", False),
    ("0[1-9]*", "0312345678", True),
    ("0[1-9]*", "0", False),
    ("0[1-9]*", "03", True),         # * is zero or more
    ("0[1-9]*", "0012345", False),
    ("0[1-35-9]X", "047", False),
    ("0[1-35-9]X", "037", True),
    ("0.", "0", False),              # . is one or more
    ("0.", "01", True),
    ("0990*", "0990", True),
    ("0990*", "0990123456", True),
    ("+*", "+16502530000", True),
    ("+*", "16502530000", False),
    ("+1NXX*", "+12025550100", True),
])
def test_pattern_syntax(pattern, number, expected):
    assert matches(number, pattern) is expected


@pytest.mark.parametrize("pattern, message", [
    ("2*1", "pattern '2*1': '*' may only come last"),
    ("2.1", "pattern '2.1': '.' may only come last"),
    ("2[1-", "pattern '2[1-': '[' without ']'"),
    ("[a-z]", "pattern '[a-z]': [a-z] is not a class of digits like [1-9] or [125]"),
    ("[]", "pattern '[]': [] is not a class of digits like [1-9] or [125]"),
    ("[9-1]", "pattern '[9-1]': range 9-1 is backwards"),
    ("2Y", "pattern '2Y': 'Y' is not pattern syntax"),
    ("2 0", "pattern '2 0': ' ' is not pattern syntax"),
    (".*", "pattern '.*': '.' may only come last"),
    ("", "an empty pattern matches nothing"),
])
def test_bad_patterns(pattern, message):
    with pytest.raises(PatternError) as caught:
        compile_pattern(pattern)
    assert str(caught.value) == message


def test_patterns_are_compiled_once():
    assert compile_pattern("2XXX") is compile_pattern("2XXX")


@pytest.mark.parametrize("number", ["2001", "20", "20001", "0312345678", "09012345678"])
def test_default_policy_allows_extensions_and_national_numbers(number):
    check_number(number, DEFAULT, field="to")


@pytest.mark.parametrize("number, pattern", [
    ("0990123456", "0990*"),
    ("0012345678", "00*"),
    ("01016502530000", "010*"),
    ("0570012345", "0570*"),
    ("+16502530000", "+*"),
])
def test_default_policy_denies_toll_fraud_favourites(number, pattern):
    with pytest.raises(Refused) as caught:
        check_number(number, DEFAULT, field="to")
    assert str(caught.value) == f"550 5.7.1 field 'to': number {number} is not allowed by policy (deny '{pattern}')"


def test_deny_wins_over_allow():
    policy = PolicyConfig(allow=("0*",), deny=("0990*",))
    check_number("0312345678", policy, field="from")
    with pytest.raises(Refused) as caught:
        check_number("0990123456", policy, field="from")
    assert str(caught.value) == \
        "550 5.7.1 field 'from': number 0990123456 is not allowed by policy (deny '0990*')"


def test_a_number_matching_no_allow_pattern_is_refused():
    with pytest.raises(Refused) as caught:
        check_number("123456", DEFAULT, field="from")
    assert str(caught.value) == \
        "550 5.7.1 field 'from': number 123456 is not allowed by policy (it matches no allow pattern)"


def test_an_empty_allow_list_allows_nothing():
    with pytest.raises(Refused):
        check_number("2001", PolicyConfig(allow=(), deny=()), field="to")


def test_a_broken_pattern_fails_closed_and_temporarily():
    with pytest.raises(Refused) as caught:
        check_number("2001", PolicyConfig(allow=("2XXX",), deny=("2*1",)), field="to")
    assert caught.value.reply.code == 451
    assert str(caught.value) == \
        "451 4.3.5 the dialling policy is misconfigured (pattern '2*1': '*' may only come last)"


def test_rate_limit():
    policy = PolicyConfig(per_sender_per_hour=3)
    for earlier in range(3):
        check_rate(earlier, policy, sender="alice@a.example")
    with pytest.raises(Refused) as caught:
        check_rate(3, policy, sender="alice@a.example")
    assert str(caught.value) == "550 5.7.1 rate limit: at most 3 requests per hour from alice@a.example"


def test_rate_limit_without_a_sender_and_zero_means_none():
    with pytest.raises(Refused) as caught:
        check_rate(0, PolicyConfig(per_sender_per_hour=0))
    assert str(caught.value) == "550 5.7.1 rate limit: at most 0 requests per hour"
