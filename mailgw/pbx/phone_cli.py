"""``mailgw phone``: drive the PBX by hand for demos (most commands are simulator-only).

    mailgw phone list                                   phones and their states (ExtensionStateList)
    mailgw phone 2000 busy|answer|no-answer|unreachable|dnd|congestion [--answer-after S] [--digit 1|none]
                                                        change a simulated phone (SimPhone); --digit is
                                                        the key it presses when a call asks it (Read())
    mailgw phone call --from 0312345678 --to 2000 [--answered-by 2001 | --nobody-answers] [--withheld]
                      [--leaves-message FILE]           an incoming call from outside (SimIncoming); with
                                                        --leaves-message the caller records FILE (audio)
                                                        as a voice message when nobody answers
    mailgw phone dial 2000 0312345678 [--nobody-answers] [--talk-time S]
                                                        phone 2000 calls outside (SimOutgoing), e.g. the
                                                        person calling a customer back
    mailgw phone forward 2000 0312345678                call forward in AstDB CF/2000 (DBPut)
    mailgw phone unforward 2000                         remove it (DBDel)
    mailgw phone calls                                  the simulator's call log (SimCalls)

``list``, ``forward`` and ``unforward`` use plain Asterisk actions and also work against a real
Asterisk; the others exist only in the built-in simulator. ``--ami HOST:PORT``, ``--username``,
``--secret`` default to ``pbx.ami`` of the configuration (``--config FILE`` or the embedded one).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from .ami import Message
from .driver import AmiClient
from .port import PbxError

BEHAVIOURS = ["answer", "busy", "dnd", "no-answer", "unreachable", "congestion"]
EX_UNAVAILABLE = 69
CONNECT_TIMEOUT = 5.0


def register(subparsers: Any) -> None:
    phone = subparsers.add_parser("phone", help="drive the PBX by hand (demo; mostly simulator-only)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    phone.add_argument("--config", help="gateway.yaml (default: the embedded configuration)")
    phone.add_argument("--ami", metavar="HOST:PORT", help="AMI address (default: pbx.ami of the configuration)")
    phone.add_argument("--username", help="AMI user (default: from the configuration)")
    phone.add_argument("--secret", help="AMI secret (default: from the configuration)")
    phone.add_argument("words", nargs="+", metavar="COMMAND",
                       help="list | calls | <ext> <behaviour> | call | dial <ext> <number> | forward <ext> <number>"
                            " | unforward <ext>")
    phone.add_argument("--answer-after", type=float, metavar="S")
    phone.add_argument("--talk-time", type=float, metavar="S")
    phone.add_argument("--digit", metavar="KEY", help="the DTMF key the phone presses when asked (none: no key)")
    phone.add_argument("--from", dest="from_number", metavar="NUMBER")
    phone.add_argument("--to", metavar="EXT[&EXT...]")
    who = phone.add_mutually_exclusive_group()
    who.add_argument("--answered-by", metavar="EXT")
    who.add_argument("--nobody-answers", action="store_true")
    phone.add_argument("--withheld", action="store_true", help="the caller withholds the number")
    phone.add_argument("--ring-time", type=float, metavar="S")
    phone.add_argument("--leaves-message", metavar="FILE", help="audio the caller records when nobody answers")
    phone.set_defaults(run=run)


def build_action(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """The AMI action for the command line, or ValueError with a usage message."""
    words = args.words
    if words == ["list"]:
        return "ExtensionStateList", {}
    if words == ["calls"]:
        return "SimCalls", {}
    if words[0] == "call" and len(words) == 1:
        if not args.to:
            raise ValueError("phone call needs --to EXT")
        fields = {"To": args.to, "CallerID": "withheld" if args.withheld else (args.from_number or "")}
        if args.answered_by:
            fields["Answer"] = args.answered_by
        elif args.nobody_answers:
            fields["Answer"] = "nobody"
        if args.ring_time is not None:
            fields["RingTime"] = f"{args.ring_time:g}"
        if args.talk_time is not None:
            fields["TalkTime"] = f"{args.talk_time:g}"
        if args.leaves_message:
            fields["Message"] = str(Path(args.leaves_message).resolve())  # the simulator reads it
        return "SimIncoming", fields
    if words[0] == "dial" and len(words) == 3:
        fields = {"Phone": words[1], "To": words[2], "Answer": "nobody" if args.nobody_answers else "yes"}
        if args.ring_time is not None:
            fields["RingTime"] = f"{args.ring_time:g}"
        if args.talk_time is not None:
            fields["TalkTime"] = f"{args.talk_time:g}"
        return "SimOutgoing", fields
    if words[0] == "forward" and len(words) == 3:
        return "DBPut", {"Family": "CF", "Key": words[1], "Val": words[2]}
    if words[0] == "unforward" and len(words) == 2:
        return "DBDel", {"Family": "CF", "Key": words[1]}
    if len(words) == 2 and words[1] in BEHAVIOURS:
        fields = {"Phone": words[0], "Behaviour": words[1]}
        if args.answer_after is not None:
            fields["AnswerAfter"] = f"{args.answer_after:g}"
        if args.talk_time is not None:
            fields["TalkTime"] = f"{args.talk_time:g}"
        if args.digit is not None:
            fields["Digit"] = args.digit
        return "SimPhone", fields
    raise ValueError(f"unknown phone command: {' '.join(words)} (see mailgw phone --help)")


def ami_settings(args: argparse.Namespace) -> tuple[str, int, str, str]:
    from mailgw.config import load_config

    ami = load_config(args.config).pbx.ami
    host, port = ami.host, ami.port
    if args.ami:
        host, _, port_text = args.ami.rpartition(":")
        port = int(port_text)
    return host, port, args.username or ami.username, args.secret or ami.secret


def run(args: argparse.Namespace) -> int:
    try:
        name, fields = build_action(args)
    except ValueError as exc:
        print(f"mailgw phone: {exc}", file=sys.stderr)
        return 2
    host, port, username, secret = ami_settings(args)
    try:
        reply, items = asyncio.run(_send(host, port, username, secret, name, fields))
    except PbxError as exc:
        print(f"mailgw phone: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    print(format_reply(name, reply, items))
    return 0 if reply.ok else 1


async def _send(host: str, port: int, username: str, secret: str, name: str,
                fields: dict[str, str]) -> tuple[Message, list[Message]]:
    client = AmiClient(host, port, username, secret, events=False, keepalive_interval=None)
    await client.start()
    try:
        await client.wait_connected(CONNECT_TIMEOUT)
        if name in ("ExtensionStateList", "SimCalls"):
            listed = await client.list_action(name, fields)
            return listed.response, listed.events
        return await client.action(name, fields), []
    finally:
        await client.close()


def format_reply(name: str, reply: Message, items: list[Message]) -> str:
    if not reply.ok:
        return f"error: {reply.get('Message') or reply.get('Response')}"
    if name == "ExtensionStateList":
        return "\n".join(f"{m.get('Exten'):>8}  {m.get('StatusText', ''):<14} {m.get('Hint', '')}"
                         f"  ({m.get('Context')})" for m in items) or "(no hinted extensions)"
    if name == "SimCalls":
        lines = []
        for m in items:
            who = m.get("AnsweredBy") or ""
            lines.append(f"{m.get('CallId')}  {m.get('Direction', 'outbound'):<8} {m.get('From')} -> "
                         f"{m.get('To') or m.get('Exten') or m.get('Application')}  {m.get('Outcome') or 'in progress'}"
                         + (f" (answered by {who})" if who else ""))
        return "\n".join(lines) or "(no calls)"
    shown = [f"{k}: {v}" for k, v in reply.items() if k not in ("Response", "ActionID")]
    return "ok" + ("\n" + "\n".join(shown) if shown else "")
