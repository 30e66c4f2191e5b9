"""The ``mailgw`` command.

    mailgw serve    [--config FILE] [--data DIR]     run the gateway (embedded defaults without --config)
    mailgw send     --call 2001 [...]                compose and submit a request mail
    mailgw inbox    ADDRESS [--read N]               list / read a person's mailbox (reading marks it Seen)
    mailgw requests [--config FILE] [--data DIR]     recent requests and how they ended
    mailgw scenario check FILE...                    check scenario files (file:line:column: problem)
    mailgw customers import FILE / absence set USER / calls   missed-call mail (docs/absence.md)
"""

from __future__ import annotations

import argparse
import email.policy
import getpass
import asyncio
import logging
import mimetypes
import os
import signal
import smtplib
import sys
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime
from pathlib import Path

from . import mailbox
from .config import ConfigError, load_config, readable_secrets_warning
from .directory import DirectoryError
from .absence_cli import register as register_absence
from .campon_cli import register as register_campons
from .pbx.phone_cli import register as register_phone
from .queue_cli import register as register_queue
from .scenario_cli import register as register_scenario

EX_TEMPFAIL = 75
EX_UNAVAILABLE = 69
EX_CONFIG = 78


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, DirectoryError) as exc:
        print(f"mailgw: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mailgw inbox ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgw", description="E-mail-centric CTI gateway.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    _config_options(serve)
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(run=_serve)

    send = sub.add_parser("send", help="compose and submit a request mail")
    send.add_argument("--to", help="mail recipient (default: cti@<domain of --sender>)")
    send.add_argument("--call", metavar="NUMBER", help="the number to call (field 'to')")
    send.add_argument("--from-number", metavar="NUMBER", help="your phone, called first (default: yours in the directory)")
    send.add_argument("--action", default="connect", choices=["connect", "camp-on", "cancel", "monitor"])
    send.add_argument("--monitor", metavar="DURATION", help="how long the gateway may keep trying, e.g. 10m")
    send.add_argument("--trigger", choices=["on-receipt", "on-read"])
    send.add_argument("--scenario", metavar="NAME|FILE", help="a stored scenario's name, or a YAML file sent inline")
    send.add_argument("--attach", metavar="FILE", action="append", default=[], help="attach a file (repeatable)")
    send.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[], help="any other field (repeatable)")
    send.add_argument("--dry-run", action="store_true", help="ask what would happen; nothing is dialled")
    send.add_argument("--sender", default="alice@a.example", help="your mail address (default: the demo user alice@a.example)")
    send.add_argument("--subject", default="Call request")
    send.add_argument("--text", default="", help="free text after the command block")
    send.add_argument("--server", default="127.0.0.1:2525", metavar="HOST:PORT")
    send.set_defaults(run=_send)

    inbox = sub.add_parser("inbox", help="list or read a person's mailbox")
    inbox.add_argument("address")
    inbox.add_argument("--read", type=int, metavar="N", help="show message N and mark it read")
    _config_options(inbox)
    inbox.set_defaults(run=_inbox)

    passwd = sub.add_parser("passwd", help="hash a password for a person's 'secret' in directory.yaml")
    passwd.add_argument("--stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(run=_passwd)

    requests = sub.add_parser("requests", help="recent requests and their outcome")
    requests.add_argument("--limit", type=int, default=20)
    _config_options(requests)
    requests.set_defaults(run=_requests)
    register_campons(sub)
    register_phone(sub)
    register_scenario(sub)
    register_queue(sub)
    register_absence(sub)
    return parser


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="gateway.yaml (default: embedded defaults)")
    parser.add_argument("--data", type=Path, help="data directory (default: $MAILGW_HOME or ./var)")


# --- serve --------------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP command at INFO
    config = load_config(args.config, data_dir=args.data)
    for path in (args.config, config.directory):  # the directory may hold IMAP passwords
        if path is not None and (warning := readable_secrets_warning(path)):
            logging.getLogger("mailgw").warning(warning)
    from .gateway import serve  # the gateway pulls in the whole stack; other commands stay light

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        logging.getLogger("mailgw").error("cannot start: %s", exc)
        return EX_UNAVAILABLE
    return 0


# --- send ---------------------------------------------------------------------------------------

def build_request_mail(args: argparse.Namespace) -> EmailMessage:
    """The request mail ``mailgw send`` submits: a plain-text command block, as a phone would write it."""
    fields: list[tuple[str, str]] = []
    for name, value in (("action", args.action), ("to", args.call), ("from", args.from_number),
                        ("monitor", args.monitor), ("trigger", args.trigger)):
        if value:
            fields.append((name, value))
    if args.dry_run:
        fields.append(("dry-run", "yes"))
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"mailgw send: --set needs FIELD=VALUE, got {item!r}")
        fields.append((name.strip(), value.strip()))

    message = EmailMessage()
    message["From"] = args.sender
    message["To"] = args.to or f"cti@{args.sender.rpartition('@')[2]}"
    message["Subject"] = args.subject
    message["Date"] = format_datetime(datetime.now().astimezone())
    message["Message-ID"] = make_msgid()
    scenario_file = Path(args.scenario) if args.scenario and Path(args.scenario).is_file() else None
    if args.scenario and scenario_file is None:
        fields.append(("scenario", args.scenario))
    block = "\n".join(f"{name}: {value}" for name, value in fields)
    message.set_content(block + ("\n\n" + args.text if args.text else "") + "\n")
    if scenario_file is not None:
        text = scenario_file.read_text(encoding="utf-8")
        inline = "scenario:\n" + "".join(f"  {line}\n" for line in text.splitlines())
        message.add_attachment(inline.encode("utf-8"), maintype="application", subtype="x-cti+yaml",
                               filename=scenario_file.name)
    for name in args.attach:
        path = Path(name)
        ctype, _ = mimetypes.guess_type(path.name)
        maintype, _, subtype = (ctype or "application/octet-stream").partition("/")
        message.add_attachment(path.read_bytes(), maintype=maintype, subtype=subtype, filename=path.name)
    return message


def _send(args: argparse.Namespace) -> int:
    message = build_request_mail(args)
    host, _, port = args.server.rpartition(":")
    try:
        with smtplib.SMTP(host or "127.0.0.1", int(port), timeout=30) as smtp:
            code, reply = smtp.ehlo()
            code, reply = smtp.mail(args.sender)
            if code != 250:
                return _refused(code, reply)
            code, reply = smtp.rcpt(str(message["To"].addresses[0].addr_spec))
            if code not in (250, 251):
                return _refused(code, reply)
            code, reply = smtp.data(message.as_bytes(policy=email.policy.SMTP))
            if code != 250:
                return _refused(code, reply)
    except smtplib.SMTPResponseException as exc:  # DATA refused
        return _refused(exc.smtp_code, exc.smtp_error)
    except (OSError, smtplib.SMTPException) as exc:
        print(f"mailgw send: cannot reach the gateway at {args.server}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    print(f"accepted: {code} {reply.decode('utf-8', 'replace')}")
    return 0


def _refused(code: int, reply: bytes | str) -> int:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    print(f"refused: {code} {text}", file=sys.stderr)
    return EX_TEMPFAIL if 400 <= code < 500 else 1


# --- passwd -------------------------------------------------------------------------------------

def _passwd(args: argparse.Namespace) -> int:
    from .auth import hash_secret

    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("mailgw passwd: the two passwords differ", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("mailgw passwd: use at least 8 characters", file=sys.stderr)
        return 1
    print(hash_secret(password))
    return 0


# --- inbox --------------------------------------------------------------------------------------

def _inbox(args: argparse.Namespace) -> int:
    config = load_config(args.config, data_dir=args.data)
    mails = mailbox.list_mail(config.mailbox_root, args.address.lower())
    if args.read is None:
        if not mails:
            print(f"no mail for {args.address} in {config.mailbox_root}")
        for index, mail in enumerate(mails, start=1):
            m = mail.message()
            print(f"{index:3}  {' ' if mail.seen else 'N'}  {m.get('Date', '')[:31]:31}  "
                  f"{str(m.get('From', ''))[:28]:28}  {m.get('Subject', '')}")
        return 0
    if not 1 <= args.read <= len(mails):
        print(f"mailgw inbox: no message {args.read} (there are {len(mails)})", file=sys.stderr)
        return 1
    mail = mailbox.mark_seen(mails[args.read - 1])
    m = mail.message()
    for name in ("From", "To", "Reply-To", "Date", "Subject", "X-CTI-On-Read", "X-CTI-Request", "X-CTI-Outcome", "X-CTI-Status"):
        if m.get(name):
            print(f"{name}: {m[name]}")
    body = m.get_body(preferencelist=("plain",))
    print()
    print(body.get_content() if body is not None else "(no text part)")
    return 0


# --- requests -----------------------------------------------------------------------------------

def _requests(args: argparse.Namespace) -> int:
    from .store import Store

    config = load_config(args.config, data_dir=args.data)

    async def run() -> list:
        store = Store(config.data_dir / "mailgw.sqlite3")
        await store.open()
        try:
            return await store.list_messages(args.limit)
        finally:
            await store.close()

    for row in asyncio.run(run()):
        print(f"{row.id:24} {row.received_at.astimezone():%Y-%m-%d %H:%M:%S}  {row.kind:7} {row.state:9} "
              f"{(row.outcome or '-'):14} {row.sender or row.mail_from}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
