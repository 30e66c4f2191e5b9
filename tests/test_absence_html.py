"""The optional HTML alternative of the missed-call mail: multipart/alternative with the plain text
first, a tel: link, every variable escaped (sandboxed template), per person (absence.html)."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mailgw.config import Config

from .absence_helpers import CUSTOMERS_CSV, CallEnds, import_customers, missed_call, place_incoming
from .conftest import Sink, running_gateway
from .test_absence_e2e import absence_config, set_absent
from .test_absence_recording import voice_message

HOSTILE = CUSTOMERS_CSV.replace("XX Corp,Sales,Yamada Taro", 'XX <b>Corp</b> & Co,Sales,"Yamada <script>x</script>"')


async def test_html_alternative_follows_the_plain_text_and_a_mail_parser_sees_both(
        make_config: Callable[..., Config], sink: Sink, tmp_path: Path) -> None:
    audio = voice_message(tmp_path / "m.wav")
    config = absence_config(make_config, tmp_path, html=("tanaka@b.example",))
    async with running_gateway(config, sink) as gw:
        await import_customers(gw, tmp_path, HOSTILE)
        await set_absent(gw, "tanaka@b.example")
        ends = CallEnds(gw)
        call_id = await place_incoming(gw, "0312345678", "2000", answer="nobody", message=tmp_path / "m.wav")
        await ends.wait(call_id)
        _, rcpt_tos, received = await sink.next()
        parsed = email.message_from_bytes(received.as_bytes(), policy=email.policy.default)  # a mail program
        assert parsed.get_content_type() == "multipart/mixed"
        alternative, attachment = parsed.get_payload()
        assert alternative.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in alternative.get_payload()] == ["text/plain", "text/html"]
        assert attachment.get_content() == audio

        plain = parsed.get_body(("plain",)).get_content()
        html = parsed.get_body(("html",)).get_content()
        assert parsed.get_body(("html", "plain")).get_content_type() == "text/html"
        assert "tel:+81312345678" in plain and "<" not in plain.split("From:")[0]
        assert '<a href="tel:+81312345678">03-1234-5678</a>' in html
        assert "XX &lt;b&gt;Corp&lt;/b&gt; &amp; Co" in html and "<script>" not in html
        assert "Yamada &lt;script&gt;x&lt;/script&gt;" in html
        assert "voice message attached (voice-message-" in html


async def test_html_is_off_by_default_and_for_people_not_listed(make_config: Callable[..., Config], sink: Sink,
                                                                 tmp_path: Path) -> None:
    async with running_gateway(absence_config(make_config, tmp_path), sink) as gw:
        await missed_call(gw, tmp_path)
        _, _, message = await sink.next()
        assert message.get_content_type() == "text/plain"
    config = absence_config(make_config, tmp_path, html=("desk@b.example",))
    config = replace(config, data_dir=tmp_path / "again")  # a new store: the new simulator's call ids start over
    async with running_gateway(config, sink) as gw:
        await missed_call(gw, tmp_path)
        _, _, message = await sink.next()
        assert message.get_content_type() == "text/plain"


async def test_broken_html_template_sends_the_plain_text_alone(make_config: Callable[..., Config], sink: Sink,
                                                               tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    shipped = make_config().templates
    for path in shipped.iterdir():
        (templates / path.name).write_bytes(path.read_bytes())
    (templates / "absence.en.html").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")  # sandboxed
    config = absence_config(make_config, tmp_path, html=True)
    config = replace(config, templates=templates)
    async with running_gateway(config, sink) as gw:
        await missed_call(gw, tmp_path)
        _, _, message = await sink.next()
        assert message.get_content_type() == "text/plain"
        assert "tel:+81312345678" in message.get_content()
