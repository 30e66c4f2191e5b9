"""The mailgw command as a user runs it: real processes, real SMTP, exit codes scripts can use."""

from __future__ import annotations

import asyncio
import sys
from argparse import Namespace
from pathlib import Path

from mailgw.cli import build_request_mail
from mailgw.gateway import Gateway

from .conftest import placed_calls, wait_stage


async def mailgw(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailgw.cli", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_send_submits_a_request_that_places_the_call(gateway: Gateway) -> None:
    code, out, _ = await mailgw("send", "--sender", "alice@a.example", "--to", "bob@a.example",
                                "--server", f"127.0.0.1:{gateway.smtp_port}")
    assert code == 0, out
    assert out.startswith("accepted: 250 2.0.0 queued as ")
    request_id = out.rsplit(" ", 1)[1].strip()
    await wait_stage(gateway.store, request_id, "outcome")
    assert [(c.from_number, c.to_number, c.outcome) for c in placed_calls(gateway)] == [("2000", "2001", "answered")]


async def test_send_reports_a_refusal_and_exits_non_zero(gateway: Gateway) -> None:
    code, out, err = await mailgw("send", "--call", "0990123456", "--server", f"127.0.0.1:{gateway.smtp_port}")
    assert code == 1 and out == ""
    assert "refused: 550 5.7.1 field 'to': number 0990123456 is not allowed by policy" in err
    assert placed_calls(gateway) == []


async def test_send_says_when_the_gateway_cannot_be_reached() -> None:
    code, _, err = await mailgw("send", "--call", "2001", "--server", "127.0.0.1:1")
    assert code == 69 and "cannot reach the gateway at 127.0.0.1:1" in err


async def test_inbox_lists_and_reads_the_result_mail(gateway: Gateway) -> None:
    code, out, _ = await mailgw("send", "--call", "2001", "--dry-run", "--server", f"127.0.0.1:{gateway.smtp_port}")
    request_id = out.rsplit(" ", 1)[1].strip()
    await wait_stage(gateway.store, request_id, "notified")
    config = Path(gateway.config.data_dir) / "gw.yaml"
    config.write_text(f"mailbox: {{root: {gateway.config.mailbox_root}}}\n")
    code, out, _ = await mailgw("inbox", "alice@a.example", "--config", str(config))
    assert code == 0 and f"Dry run OK: Bob Baker [{request_id}]" in out and " N " in out
    code, out, _ = await mailgw("inbox", "alice@a.example", "--read", "1", "--config", str(config))
    assert code == 0 and "X-CTI-Outcome: dry-run" in out and "ring 2001" in out
    code, out, _ = await mailgw("inbox", "alice@a.example", "--config", str(config))
    assert " N " not in out  # reading marked it Seen


def test_request_mail_carries_fields_attachments_and_an_inline_scenario(tmp_path: Path) -> None:
    voice = tmp_path / "memo.wav"
    voice.write_bytes(b"RIFF....WAVEfmt ")
    scenario = tmp_path / "memo.yaml"
    scenario.write_text("steps:\n  - play: voice\n  - connect\n")
    args = Namespace(action="connect", call="2001", from_number="03-1234-5678", monitor="10m", trigger=None,
                     dry_run=True, set=["priority=express"], sender="alice@a.example", to=None, subject="s",
                     text="see you", scenario=str(scenario), attach=[str(voice)])
    message = build_request_mail(args)
    assert message["To"] == "cti@a.example"
    body = message.get_body(preferencelist=("plain",)).get_content()
    assert body.startswith("action: connect\nto: 2001\nfrom: 03-1234-5678\nmonitor: 10m\n"
                           "dry-run: yes\npriority: express\n\nsee you")
    parts = {p.get_content_type(): p for p in message.iter_attachments()}
    assert parts["audio/x-wav"].get_filename() == "memo.wav"
    assert parts["application/x-cti+yaml"].get_content().decode().startswith("scenario:\n  steps:\n    - play: voice")


async def test_passwd_prints_a_hash_the_gateway_accepts() -> None:
    from mailgw.auth import verify_secret

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mailgw.cli", "passwd", "--stdin",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(b"a long passphrase\n"), 30)
    assert proc.returncode == 0 and verify_secret("a long passphrase", out.decode().strip())


async def test_passwd_refuses_a_short_password() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mailgw.cli", "passwd", "--stdin",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b"short\n"), 30)
    assert proc.returncode == 1 and out == b"" and b"at least 8 characters" in err
