"""A real Dovecot for the tests: started on a free loopback port with a throw-away configuration,
serving Maildirs under one root, one IMAP login per directory person.

Dovecot never gives mail access to uid 0, so its mail processes run as ``nobody`` and the gateway
shares the Maildirs with that user's group (``mailbox.group``), exactly as an office would pair
the gateway with its Dovecot (docs/configuration.md, "Serving the Maildirs with Dovecot").
``make test`` installs Debian's ``dovecot-imapd``; in CI a missing Dovecot fails the tests instead
of skipping them.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from mailgw.config import load_config
from mailgw.directory import load_directory

MAIL_USER = "nobody"


@dataclass
class Dovecot:
    port: int
    mail_root: Path  # the Maildir root it serves: give it to the gateway as mailbox.root
    group: str       # the group to share the Maildirs with: the gateway's mailbox.group
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def password(self, address: str) -> str:
        return f"pw-{address.partition('@')[0]}"

    def start(self) -> None:
        self.process = subprocess.Popen([_dovecot_binary(), "-F", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _await_listening(self)

    def stop(self) -> None:
        """Stop the server (clients see their connections drop); ``start()`` brings it back."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None


def _dovecot_binary() -> str:
    found = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        message = "Dovecot is not installed (make test installs Debian's dovecot-imapd)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(base: Path, mail_root: Path, port: int) -> str:
    return f"""
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {base}/users
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
"""


def start_dovecot(extra_config: str = "") -> Dovecot:
    """A running Dovecot with a login for every person of the shipped directory."""
    user = pwd.getpwnam(MAIL_USER)
    # Not under pytest's tmp_path: that is mode 0700 for root, which Dovecot's user cannot pass,
    # and Dovecot's socket paths must stay short.
    base = Path(tempfile.mkdtemp(prefix="dovecot-"))
    mail_root = base / "mail"
    for folder in (mail_root, base / "run", base / "state"):
        folder.mkdir()
    os.chmod(base, 0o711)
    os.chown(mail_root, user.pw_uid, user.pw_gid)  # Dovecot makes the Maildirs of IMAP-only people
    os.chmod(mail_root, 0o770)
    dv = Dovecot(_free_port(), mail_root, grp.getgrgid(user.pw_gid).gr_name, base / "dovecot.conf",
                 base / "dovecot.log")
    people = load_directory(load_config(None).directory).people
    (base / "users").write_text("".join(
        f"{p.address}:{{PLAIN}}{dv.password(p.address)}:{user.pw_uid}:{user.pw_gid}::{mail_root / p.address}::\n"
        for p in people))
    dv.config.write_text(_config(base, mail_root, dv.port) + extra_config)
    dv.start()
    return dv


@contextlib.contextmanager
def running_dovecot(extra_config: str = "") -> Iterator[Dovecot]:
    _dovecot_binary()  # skip or fail before making anything
    dv = start_dovecot(extra_config)
    try:
        yield dv
    finally:
        dv.stop()
        shutil.rmtree(dv.config.parent, ignore_errors=True)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as dv:
        yield dv


def _await_listening(dv: Dovecot, timeout: float = 15.0) -> None:
    assert dv.process is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dv.process.poll() is not None:
            raise RuntimeError(f"Dovecot exited: {dv.process.stderr.read().decode(errors='replace')}"  # type: ignore[union-attr]
                               f"{dv.log.read_text() if dv.log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", dv.port), timeout=1) as conn:
                if conn.recv(100).startswith(b"* OK"):
                    return
        except OSError:
            time.sleep(0.05)  # a child process starting: nothing to await but the port itself
    raise RuntimeError(f"Dovecot did not listen on port {dv.port} within {timeout:.0f}s")
