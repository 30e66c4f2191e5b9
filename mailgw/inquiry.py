"""Inquiry mails: a scenario's ``confirm: {via: mail}`` step asks the recipient by mail, and their
reply (OK or NG) decides whether the scenario goes on (seed 004, FIG. 42/43: "ask the recipient
before executing the exchange information").

The inquiry comes from the gateway with ``Reply-To: mailgw+confirm.<token>@<domain>``: a one-off
address whose 128-bit random token names the one waiting step, so a reply needs no subject
parsing and cannot be guessed. At DATA, ingress reads the first word of the reply (``OK``, ``はい``,
``NG``, ``いいえ``, ...; quoted lines skipped): anything else is refused with a 550 that says what to
write, so the person learns at once. The dispatcher then records the answer, but only when it comes
from the address that was asked (``judge_answer``); anyone else's reply is kept and ignored.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from dataclasses import dataclass
from email.message import Message

from .directory import normalise_address
from .mdn import receipt_address, token_of
from .replies import body_text, is_automatic, confirm_answer
from .status import Refused

TAG = "confirm"


def answer_address(gateway_address: str, token: str) -> str:
    """Where replies to one inquiry go: ``mailgw+confirm.<token>@a.example``."""
    return receipt_address(gateway_address, token, TAG)


def answer_token(address: str, gateway_address: str) -> str | None:
    return token_of(address, gateway_address, TAG)


@dataclass(frozen=True)
class Answer:
    answer: str  # "yes" or "no"
    sender: str  # the reply's From (else envelope sender), normalised


def parse_answer(raw: bytes, mail_from: str) -> Answer | None:
    """The answer a reply to an inquiry gives; None for automatic mail (out-of-office, bounces),
    which is kept but answers nothing; ``Refused`` when a person wrote something else."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    if is_automatic(message, mail_from):
        return None
    answer = confirm_answer(body_text(message))
    if answer is None:
        # SMTP replies are ASCII: the Japanese words (はい / いいえ) are in the inquiry mail itself.
        raise Refused(550, "5.6.0", "reply not understood: write OK at the top of your reply to go ahead, "
                                    "or NG to decline")
    return Answer(answer, _sender(message, mail_from))


def judge_answer(message: Message, mail_from: str, asked: str | None) -> tuple[Answer | None, str]:
    """(the answer to obey or None, a sentence for the log and the stage table)."""
    if is_automatic(message, mail_from):
        return None, "automatic mail, not an answer"
    answer = confirm_answer(body_text(message))
    if answer is None:
        return None, "not an answer (neither OK nor NG)"
    sender = _sender(message, mail_from)
    if asked is None:
        return None, f"answer {answer} from {sender} to an inquiry that is not waiting"
    if sender != asked:
        return None, f"answer from {sender} ignored: the inquiry was sent to {asked}"
    return Answer(answer, sender), f"answer {answer} from {sender}"


def _sender(message: Message, mail_from: str) -> str:
    _, address = email.utils.parseaddr(str(message.get("From") or ""))
    return normalise_address(address) or normalise_address(mail_from) or mail_from.lower()
