"""Result mails: every outcome renders in both languages, and a broken template never loses one."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from email.mime.text import MIMEText
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.config import load_config
from mailgw.directory import load_directory
from mailgw.notify import OUTCOME_STATUS, REASONS, Notifier, Result, _local, ascii_text
from mailgw.request import parse_request

CONFIG = load_config(None)
DIRECTORY = load_directory(CONFIG.directory)
NOW = datetime(2026, 11, 23, 15, 4, tzinfo=UTC)


def request_from(sender: str):
    raw = f"From: {sender}\r\nTo: bob@a.example\r\nSubject: x\r\nMessage-ID: <m1@x>\r\n\r\naction: connect\r\n".encode()
    return parse_request(raw, mail_from=sender, rcpt_to="bob@a.example", directory=DIRECTORY, config=CONFIG)


def reparse(message) -> email.message.EmailMessage:
    return email.message_from_bytes(message.as_bytes(), policy=email.policy.default)


@pytest.mark.parametrize("sender", ["alice@a.example", "yamada@a.example"])
@pytest.mark.parametrize("outcome", sorted(OUTCOME_STATUS))
def test_every_outcome_renders_in_every_language(sender: str, outcome: str) -> None:
    failed = outcome not in ("answered", "dry-run")
    result = Result("r1", outcome, "detail sentence", NOW, answered_at=NOW if not failed else None,
                    dry_run_plan="1. ring", failed_party="to" if failed and outcome != "failed" else None,
                    failed_number="2001", cause=17, reason="expired" if outcome == "expired" else None)
    mail = reparse(Notifier(CONFIG, DIRECTORY).result_mail(request_from(sender), result))
    assert mail["X-CTI-Request"] == "r1" and mail["X-CTI-Outcome"] == outcome
    assert mail["X-CTI-Status"] == OUTCOME_STATUS[outcome]
    assert mail["In-Reply-To"] == "<m1@x>" and mail["Auto-Submitted"] == "auto-replied"
    assert "[r1]" in mail["Subject"] and "\n" not in mail["Subject"]
    assert "r1" in mail.get_content() and "{{" not in mail.get_content()


def test_system_failure_reasons_are_worded_in_japanese() -> None:
    for reason in REASONS:
        result = Result("r1", "expired" if reason == "expired" else "failed", "English detail", NOW, reason=reason)
        body = reparse(Notifier(CONFIG, DIRECTORY).result_mail(request_from("yamada@a.example"), result)).get_content()
        assert "English detail" not in body


def test_a_broken_template_falls_back_to_the_built_in_wording(tmp_path: Path, caplog) -> None:
    shutil.copytree(CONFIG.templates, tmp_path / "templates")
    (tmp_path / "templates" / "result.en.txt").write_text("Subject: {{ no_such_variable }}\n\nbody\n")
    notifier = Notifier(replace(CONFIG, templates=tmp_path / "templates"), DIRECTORY)
    mail = reparse(notifier.result_mail(request_from("alice@a.example"), Result("r1", "busy", "Bob was busy", NOW)))
    assert mail["Subject"] == "Request r1: busy"
    assert "Bob was busy" in mail.get_content()
    assert "template result.en.txt failed" in caplog.text


@pytest.mark.parametrize(("check_every", "edited"), [(0.0, True), (3600.0, False)])
def test_an_edited_template_takes_effect_once_its_check_is_due(tmp_path: Path, check_every: float, edited: bool) -> None:
    """Templates are looked at for edits at most once a ``check_every`` (1 s in service), not per mail."""
    shutil.copytree(CONFIG.templates, tmp_path / "templates")
    template = tmp_path / "templates" / "result.en.txt"
    notifier = Notifier(replace(CONFIG, templates=tmp_path / "templates"), DIRECTORY)
    notifier.env.loader.check_every = check_every
    result = Result("r1", "busy", "Bob was busy", NOW)
    assert reparse(notifier.result_mail(request_from("alice@a.example"), result))["Subject"] != "edited"
    template.write_text("Subject: edited\n\nnew body\n")
    stat = template.stat()
    os.utime(template, (stat.st_atime, stat.st_mtime + 10))  # a later mtime, whatever the clock's resolution
    subject = reparse(notifier.result_mail(request_from("alice@a.example"), result))["Subject"]
    assert (subject == "edited") is edited


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(list("aZ09 .:;=?-\t") + ["\n", "\r\n", "From ", ">From", "." * 3, "x" * 90]),
                max_size=60).map("".join))
def test_an_ascii_result_mail_body_is_the_part_the_email_package_makes(body: str) -> None:
    made, expected = ascii_text(body), MIMEText(body, "plain", "us-ascii")
    assert made.items() == expected.items()
    assert made.as_bytes() == expected.as_bytes() and made.as_string() == expected.as_string()


@pytest.mark.parametrize("moment", [NOW, datetime(2026, 3, 29, 1, 30, 59, 999999, tzinfo=UTC), datetime(2026, 7, 1, 12, 0)])
def test_times_in_mails_are_local_as_astimezone_gives_them(moment: datetime) -> None:
    assert _local(moment) == moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
