"""Fuzz the request path's decisions with generated mail and report crashes (target: zero).

    .venv/bin/python tools/fuzz_requests.py                  # 100,000 mails, both cores
    .venv/bin/python tools/fuzz_requests.py --mails 5000 --seed 7

Each mail is a mutation of a seed (the hostile corpus in tests/hostile and valid requests in
several encodings): bytes flipped, inserted or cut, headers duplicated, charsets swapped, values
replaced by nasty strings. Each goes through ``parse_request`` and, when it parses, through
``authorise`` and the per-number decision, exactly as ingress calls them. Anything other than a
returned request, None, or a ``Refused`` with a 4xx/5xx code and a reason is a crash; crashing
inputs are written to ``--crashes`` (default ./fuzz-crashes) so they can be replayed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgw.auth import Sender, Trust  # noqa: E402
from mailgw.config import load_config  # noqa: E402
from mailgw.directory import load_directory  # noqa: E402
from mailgw.ingress import numbers_rung  # noqa: E402
from mailgw.policy import authorise, check_number_rate  # noqa: E402
from mailgw.request import parse_request  # noqa: E402
from mailgw.status import Refused  # noqa: E402

NASTY = [
    "2001", "03-1234-5678", "+81 3 1234 5678", "０３－１２３４－５６７８", "0990123456", "${EXTEN}", "2001&9999",
    "2001,30,tT", "Local/2000@default", "\x00", "\r\nAction: Originate", "{{ 7*7 }}", "{% for x in y %}",
    "9" * 40, "", " ", "yes", "no", "5m", "1h30m", "-5m", "99999999h", "2026-13-45T25:61", "camp-on", "monitor",
    "ａｌｉｃｅ@a.example", "bob@a.example", "=?utf-8?b?MjAwMQ==?=", "=?iso-2022-jp?b?GyRCJDMkcxsoQg==?=",
    "\udcff", "\u202e2001", "&#x32;001", "%32001", "'; DROP TABLE messages;--",
]
FIELDS = ["to", "from", "action", "monitor", "at", "trigger", "notify", "mode", "priority", "request",
          "scenario", "dry-run", "宛先", "動作", "X-CTI-To", "X-CTI-From", "form", "too"]
CHARSETS = ["utf-8", "iso-2022-jp", "shift_jis", "euc-jp", "us-ascii", "iso-8859-1", "x-unknown", "utf-7", ""]


def seeds() -> list[bytes]:
    found = [p.read_bytes() for p in sorted((ROOT / "tests" / "hostile").glob("*.eml"))]
    for charset, body in (("utf-8", "to: 2001\r\nmonitor: 10m\r\n"), ("iso-2022-jp", "宛先：2001\r\n"),
                          ("shift_jis", "宛先：０３－１２３４－５６７８\r\n動作：接続\r\n")):
        found.append(b"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
                     b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n\r\n" + body.encode("cp932" if charset == "shift_jis" else charset))
    found.append(b"From: alice@a.example\r\nTo: bob@a.example\r\nSubject: s\r\nX-CTI-Monitor: 5m\r\n\r\nhello\r\n")
    found.append(b"From: alice@a.example\r\nTo: cti@a.example\r\nSubject: y\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
                 b"--b\r\nContent-Type: application/x-cti+yaml\r\n\r\nto: \"2001\"\r\nscenario:\r\n  steps: [connect]\r\n"
                 b"--b--\r\n")
    return found


def mutate(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.2 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.35:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif choice < 0.45 and data:
            cut = rng.randrange(len(data))
            del data[cut:cut + rng.randint(1, 64)]
        elif choice < 0.65:
            line = f"{rng.choice(FIELDS)}{rng.choice([': ', '：', ':'])}{rng.choice(NASTY)}\r\n"
            pos = data.find(b"\r\n\r\n")
            pos = pos + 4 if pos >= 0 and rng.random() < 0.7 else rng.randrange(len(data) + 1)
            data[pos:pos] = line.encode("utf-8", "surrogateescape")
        elif choice < 0.8:
            header = f"{rng.choice(['X-CTI-To', 'X-CTI-Action', 'Content-Type', 'From', 'Auto-Submitted'])}: "
            header += rng.choice(NASTY + [f"text/plain; charset={rng.choice(CHARSETS)}", "multipart/mixed"])
            data[0:0] = (header + "\r\n").encode("utf-8", "surrogateescape")
        else:
            old = rng.choice([b"utf-8", b"iso-2022-jp", b"shift_jis", b"text/plain", b"multipart/mixed", b"2001"])
            data = bytearray(bytes(data).replace(old, rng.choice(CHARSETS).encode() or b"x", 1))
    return bytes(data)


def run_chunk(args: tuple[int, int, int, str]) -> tuple[Counter, list[tuple[bytes, str]]]:
    start, count, seed, crash_dir = args
    config = load_config(None)
    directory = load_directory(config.directory)
    base = seeds()
    rng = random.Random(seed * 1_000_003 + start)
    outcomes: Counter = Counter()
    crashes: list[tuple[bytes, str]] = []
    senders = [Sender(Trust.TRUSTED_NETWORK, "127.0.0.1"), Sender(Trust.NONE, "192.0.2.1"),
               Sender(Trust.AUTHENTICATED, "127.0.0.1", "alice@a.example")]
    for _ in range(count):
        raw = mutate(rng.choice(base), rng)
        rcpt = rng.choice(["cti@a.example", "bob@a.example", "yamada@a.example"])
        try:
            request = parse_request(raw, mail_from="alice@a.example", rcpt_to=rcpt, directory=directory,
                                    config=config)
            if request is None:
                outcomes["ordinary mail"] += 1
                continue
            authorise(request, rng.choice(senders), to_person=rcpt != "cti@a.example", groups=(),
                      policy=config.policy)
            for number in numbers_rung(request):
                check_number_rate(number, rng.randint(0, 1), rng.randint(0, 5), config.policy)
            outcomes["accepted"] += 1
        except Refused as refusal:
            reply = refusal.reply
            if reply.code < 400 or not reply.text.strip():
                crashes.append((raw, f"refusal without a proper code or reason: {reply}"))
            outcomes[f"{reply.code} {reply.status}"] += 1
        except Exception:
            crashes.append((raw, traceback.format_exc()))
            outcomes["CRASH"] += 1
    return outcomes, crashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mails", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    parser.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    args = parser.parse_args()

    chunk = 2000
    jobs = [(start, min(chunk, args.mails - start), args.seed, str(args.crashes))
            for start in range(0, args.mails, chunk)]
    began = time.perf_counter()
    totals: Counter = Counter()
    crashes: list[tuple[bytes, str]] = []
    with multiprocessing.Pool(args.workers) as pool:
        for outcomes, found in pool.imap_unordered(run_chunk, jobs):
            totals.update(outcomes)
            crashes.extend(found)
    elapsed = time.perf_counter() - began
    print(f"{args.mails} generated mails in {elapsed:.1f} s ({args.mails / elapsed:.0f}/s, {args.workers} workers, "
          f"seed {args.seed})")
    for outcome, count in totals.most_common():
        print(f"  {count:7}  {outcome}")
    print(f"crashes: {len(crashes)}")
    if crashes:
        args.crashes.mkdir(parents=True, exist_ok=True)
        for index, (raw, why) in enumerate(crashes[:100]):
            (args.crashes / f"crash-{index:03}.eml").write_bytes(raw)
            (args.crashes / f"crash-{index:03}.txt").write_text(why)
        print(f"first {min(100, len(crashes))} written to {args.crashes}/")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
