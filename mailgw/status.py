"""SMTP replies with RFC 3463 enhanced status codes, shared by every stage that can refuse."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: basic code, enhanced status code and a human-readable text."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        # aiosmtpd sends whatever string a hook returns, so this is the wire form.
        return f"{self.code} {self.status} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class Refused(Exception):
    """Raised by a decision function when a message or request must be refused."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(text)
        self.reply = Reply(code, status, text)

    def __str__(self) -> str:
        return str(self.reply)


def field_error(field: str, problem: str) -> Refused:
    """The refusal for a request field that cannot be understood (550 5.6.0)."""
    return Refused(550, "5.6.0", f"field '{field}': {problem}")
