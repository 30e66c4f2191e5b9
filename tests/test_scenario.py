"""The scenario language: reading, limits, part references, policy, sandboxed texts, the shipped
examples and ``mailgw scenario check``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import yaml

from mailgw.cli import main
from mailgw.config import load_config
from mailgw.request import Action, CamponMode, ExchangeRequest, Part, PartKind, Priority, Trigger
from mailgw.scenario import (Confirm, Connect, Failure, Fax, Notify, Outcome, Parallel, Play, RefKind,
                             ScenarioError, ScenarioLimits, Via, Wait, check_scenario, load_file, parse_scenario,
                             refusal, render, resolve_part, worst_case)

SCENARIOS = Path(__file__).parent.parent / "scenarios"
EXAMPLES = sorted(SCENARIOS.glob("*.yaml"))
CONFIG = load_config(None)


def problems(text: str, limits: ScenarioLimits = ScenarioLimits()) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, limits)
    return [str(p) for p in caught.value.problems]


def a_request(parts: tuple[Part, ...] = (), **overrides: object) -> ExchangeRequest:
    request = ExchangeRequest(
        action=Action.CONNECT, to_number="2001", from_number="2000", network=None, trigger=Trigger.ON_RECEIPT,
        notify=True, monitor=600.0, monitor_capped=False, retry=False, mode=CamponMode.RETRY, at=None,
        priority=Priority.NORMAL, confidential=False, scenario_name=None, scenario_inline=None, request_ref=None,
        dry_run=False, sender="alice@a.example", language="en", recipient="bob@a.example", subject="memo",
        message_id="<m@a.example>", parts=parts)
    return replace(request, **overrides)  # type: ignore[arg-type]


PARTS = (
    Part(1, "text/plain", None, None, 20, PartKind.TEXT),
    Part(2, "audio/wav", "memo.wav", "memo@a.example", 800, PartKind.VOICE),
    Part(3, "application/pdf", "order.pdf", None, 900, PartKind.FAX),
)


# --- reading ---------------------------------------------------------------------------------------

def test_every_step_kind_is_read_into_the_model() -> None:
    scenario = parse_scenario("""\
name: all-steps
steps:
  - play: message 2
    on-failure: retry 2
    on:
      busy:
        - notify: "{{ to }} was busy"
  - fax: {part: order.pdf, to: "2003"}
  - confirm: {ask: "Connect {{ from }}?", via: phone, timeout: 5m, on-no: continue}
  - parallel:
      - play: cid:memo@a.example
      - [wait: 30s, fax: fax]
  - notify: {to: carol@a.example, text: done}
  - connect
""")
    play, fax, confirm, parallel, notify, connect = scenario.steps
    assert play.action.part.kind == RefKind.INDEX and play.action.part.value == 2
    assert (play.on_failure.action, play.on_failure.retries) == (Failure.RETRY, 2)
    assert isinstance(play.branch(Outcome.BUSY)[0].action, Notify)
    assert fax.action == Fax(fax.action.part, to="2003") and fax.action.part.kind == RefKind.FILENAME
    assert confirm.action == Confirm("Connect {{ from }}?", Via.PHONE, 300.0, on_no="continue")
    assert isinstance(parallel.action, Parallel) and len(parallel.action.branches) == 2
    assert isinstance(parallel.action.branches[1][0].action, Wait)
    assert notify.action == Notify("done", "carol@a.example")
    assert connect.action == Connect() and (connect.where.line, connect.where.column) == (14, 5)


@pytest.mark.parametrize(("text", "expected"), [
    ("steps:\n  - dial: 2001\n", "2:5: unknown step 'dial'"),
    ("steps:\n  - goto: 1\n", "2:5: unknown step 'goto'"),
    ("steps:\n  - play\n", "2:5: step 'play' needs a value"),
    ("steps:\n  - wait: soon\n", "2:11: 'wait': 'soon' is not a duration"),
    ("steps:\n  - wait: 2d\n", "2:11: 'wait': 2d is longer than the limit of 24 h"),
    ("steps:\n  - play: voice\n    on-failure: retry 9\n", "3:17: 'on-failure': retry 9: retry between 1 and 3"),
    ("steps:\n  - play: voice\n    on-failure: maybe\n", "3:17: 'on-failure': 'maybe' is not one of stop"),
    ("steps:\n  - play: voice\n    on: {rings: [connect]}\n", "3:10: unknown key 'rings' in 'on'"),
    ("steps:\n  - wait: 1s\n    on: {busy: [connect]}\n", "3:5: 'on' branches apply to call steps"),
    ("steps:\n  - confirm: {via: mail}\n", "2:14: 'confirm' needs 'ask'"),
    ("steps:\n  - confirm: {ask: hi, via: pigeon}\n", "2:29: 'confirm: via': 'pigeon' is not one of mail | phone"),
    ("steps:\n  - parallel: [connect]\n", "2:15: 'parallel' must be a list of at least two branches"),
    ("steps:\n  - play: ../../etc/passwd\n", "2:11: '../../etc/passwd' is not a part reference"),
    ("steps:\n  - notify: {to: 'not an address', text: hi}\n", "2:18: 'notify: to': 'not an address' is not"),
    ("steps: []\n", "1:8: 'steps' is empty"),
    ("name: x\n", "1:1: a scenario needs 'steps'"),
    ("name: Bad_Name\nsteps: [connect]\n", "1:7: 'name': 'Bad_Name' is not a scenario name"),
    ("steps: [connect]\nextra: 1\n", "2:1: unknown key 'extra' in a scenario"),
    ("steps:\n  - connect\n  - {play: voice, fax: fax}\n", "3:5: a step must have exactly one of"),
], ids=lambda v: v if len(v) < 30 else None)
def test_problems_name_the_line_and_column(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_not_just_the_first() -> None:
    found = problems("steps:\n  - wait: soon\n  - dial: 1\n  - play: voice\n    on-failure: retry 7\n")
    assert [p.split(":")[0] for p in found] == ["2", "3", "5"]


@pytest.mark.parametrize(("text", "expected"), [
    ("steps: &a [connect]\nx: *a\n", "1:8: anchors and aliases are not allowed"),
    ("steps:\n  - !!python/object/apply:os.system [id]\n", "2:5: tags are not allowed"),
    ("steps:\n  - play: !include /etc/passwd\n", "2:11: tags are not allowed"),
    ("steps: [connect\n", "not valid YAML"),
    ("steps:\n  - notify: \"{% for x in range(9999999) %}x{% endfor %}\"\n",
     "2:13: 'notify': only {{ variable }} substitutions are allowed"),
    ("steps:\n  - notify: \"{{ ''.__class__.__mro__ }}\"\n", "2:13: 'notify': only {{ variable }} substitutions"),
    ("steps:\n  - notify: \"{{ config }}\"\n", "2:13: 'notify': unknown variable 'config'"),
    ("steps:\n  - notify: \"{{ to | attr('x') }}\"\n", "2:13: 'notify': filter 'attr' is not allowed"),
    ("steps:\n  - notify: \"{{ to \"\n", "2:13: 'notify': template syntax error"),
], ids=["alias-bomb", "python-tag", "include-tag", "broken-yaml", "template-loop", "template-escape",
        "template-variable", "template-filter", "template-syntax"])
def test_hostile_scenarios_are_refused(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), found


def test_limits_on_size_steps_depth_and_duration() -> None:
    assert problems("steps:\n" + "  - connect\n" * 51) == ["52:5: more than 50 steps"]
    assert problems("description: " + "x" * 17000 + "\nsteps: [connect]\n") == [
        "the scenario is larger than 16 KiB"]
    deep = "steps:\n  - play: voice\n    on:\n      busy:\n"
    indent = "        "
    for _ in range(5):
        deep += f"{indent}- play: voice\n{indent}  on:\n{indent}    busy:\n"
        indent += "      "
    deep += f"{indent}- connect\n"
    assert any("nested more than 4 levels deep" in p for p in problems(deep))
    long = "steps:\n" + "  - wait: 20h\n    on-failure: retry 3\n"
    assert any("the scenario could take 80 h" in p and "the limit is 24 h" in p for p in problems(long))
    assert any("more than 4 branches" in p for p in problems("steps:\n  - parallel: [connect, connect, connect, "
                                                               "connect, connect]\n"))


def test_worst_case_counts_waits_timeouts_retries_and_branches() -> None:
    scenario = parse_scenario("""\
steps:
  - wait: 1m
    on-failure: retry 2
  - parallel: [{wait: 10m}, {wait: 5m}]
  - confirm: {ask: 'ok?', timeout: 30m}
  - play: voice
    on: {busy: [{wait: 2m}], no-answer: [{wait: 1m}]}
""")
    assert worst_case(scenario.steps, ScenarioLimits(call_seconds=60)) == 3 * 60 + 600 + 1800 + 60 + 120


# --- one scenario for one request ----------------------------------------------------------------

@pytest.mark.parametrize(("written", "index"), [
    ("message 2", 2), ("3", 3), ("#3", 3), ("voice", 2), ("fax", 3), ("text", 1), ("cid:memo@a.example", 2),
    ("<memo@a.example>", 2), ("order.pdf", 3),
])
def test_part_references_resolve_against_the_mails_own_parts(written: str, index: int) -> None:
    scenario = parse_scenario(f"steps:\n  - notify: x\n  - play: '{written}'\n")
    found = resolve_part(scenario.steps[1].action.part, PARTS)
    assert not isinstance(found, str) and found.index == index


def test_scenario_checked_against_its_request() -> None:
    scenario = parse_scenario("steps:\n  - play: message 7\n  - play: fax\n  - fax: memo.wav\n  - play: cid:x\n"
                              "  - fax: nothing.pdf\n")
    found = [str(p) for p in check_scenario(scenario, a_request(PARTS), CONFIG)]
    assert found == [
        "2:5: play 'message 7': there is no part 7 (the mail has 3 parts)",
        "3:5: play 'fax': part 3 is application/pdf, not a voice part",
        "4:5: fax 'memo.wav': part 2 is audio/wav, not a fax part",
        "5:5: play 'cid:x': no part has Content-ID <x>",
        "6:5: fax 'nothing.pdf': no part is named 'nothing.pdf'",
    ]
    two_voices = PARTS + (Part(4, "audio/mpeg", "b.mp3", None, 9, PartKind.VOICE),)
    ambiguous = check_scenario(parse_scenario("steps: [{play: voice}]"), a_request(two_voices), CONFIG)
    assert [p.message for p in ambiguous] == ["play 'voice': the mail has 2 voice parts (2, 4): name one, "
                                              "e.g. 'message 2'"]
    fig42_mail = (PARTS[0], Part(2, "application/x-cti+yaml", None, None, 40, PartKind.OTHER),
                  Part(3, "audio/wav", "m3.wav", None, 800, PartKind.VOICE))
    assert check_scenario(load_file(SCENARIOS / "fig42.yaml"), a_request(fig42_mail), CONFIG) == []


def test_numbers_and_addresses_in_steps_are_checked_against_policy() -> None:
    scenario = parse_scenario("steps:\n  - connect: {to: '0990123456'}\n  - play: {part: voice, to: 2001&x}\n"
                              "  - notify: {to: mallory@evil.example, text: hi}\n")
    found = check_scenario(scenario, a_request(PARTS), CONFIG)
    assert [str(p) for p in found] == [
        "2:5: field 'connect: to': number 0990123456 is not allowed by policy (deny '0990*')",
        "3:5: play: to: '2001&x' is not a phone number",
        "4:5: notify: mallory@evil.example is not in a local domain (a.example); a scenario may not mail "
        "other domains",
    ]
    refused = refusal(found, "the inline scenario")
    assert (refused.reply.code, refused.reply.status) == (550, "5.7.1")
    assert refused.reply.text.startswith("field 'scenario': the inline scenario: 2:5: field 'connect: to'")


def test_texts_render_in_the_sandbox_with_the_requests_values() -> None:
    request = a_request(PARTS)
    assert render("Connect {{ from }} to {{ to | upper }} for {{ sender }} ({{ request }})?", request, "r1") == \
        "Connect 2000 to 2001 for alice@a.example (r1)?"
    assert render("{{ from }}", replace(request, confidential=True), "r1") == "(confidential)"
    assert len(render("{{ subject }}", replace(request, subject="x" * 5000), "r1")) == 1000


# --- shipped examples, the schema and the command ------------------------------------------------

def test_the_examples_are_the_ones_the_docs_promise() -> None:
    assert [p.stem for p in EXAMPLES] == ["fax-then-confirm", "fig42", "fig43", "voice-then-connect"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_is_valid(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# yaml-language-server: $schema=scenario.schema.json\n")
    scenario = load_file(path)
    assert scenario.name == path.stem and scenario.steps
    schema = json.loads((SCENARIOS / "scenario.schema.json").read_text())
    # BaseLoader reads every scalar as text, as YAML 1.2 editors do (YAML 1.1 would read `on:` as true).
    jsonschema.validate(yaml.load(text, Loader=yaml.BaseLoader), schema)
    assert main(["scenario", "check", str(path)]) == 0
    assert capsys.readouterr().out == ""


def test_fig43_plays_and_faxes_at_once_then_asks() -> None:
    parallel, confirm, connect = load_file(SCENARIOS / "fig43.yaml").steps
    play, fax = (branch[0].action for branch in parallel.action.branches)
    assert (play, fax) == (Play(play.part), Fax(fax.part)) and (play.part.value, fax.part.value) == (2, 3)
    assert isinstance(confirm.action, Confirm) and isinstance(connect.action, Connect)


def test_the_schema_refuses_what_the_reader_refuses() -> None:
    schema = json.loads((SCENARIOS / "scenario.schema.json").read_text())
    for bad in ({"steps": [{"dial": "1"}]}, {"steps": [{"play": "voice", "on-failure": "retry 9"}]}, {"name": "x"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_check_command_prints_file_line_column_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - wait: soon\n  - connect: {to: '0990123456'}\n", encoding="utf-8")
    named = tmp_path / "other.yaml"
    named.write_text("name: something-else\nsteps: [connect]\n", encoding="utf-8")
    assert main(["scenario", "check", str(SCENARIOS / "fig42.yaml"), str(bad), str(named),
                 str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}:2:11: 'wait': 'soon' is not a duration (write 30s, 10m, 1h30m)",
        f"{named}:1:1: 'name' is 'something-else' but the file is other.yaml: senders use the file name, "
        "so they must agree",
        f"{tmp_path / 'missing.yaml'}:1:1: cannot read: No such file or directory",
    ]
    bad.write_text("steps:\n  - connect: {to: '0990123456'}\n", encoding="utf-8")
    assert main(["scenario", "check", str(bad)]) == 1
    assert capsys.readouterr().out == (f"{bad}:2:5: field 'connect: to': number 0990123456 is not allowed by "
                                       "policy (deny '0990*')\n")
