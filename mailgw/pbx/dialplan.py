"""Dial plans for the built-in AMI simulator, as data.

A dial plan says what a channel does when it enters ``<exten>@<context>``, in the vocabulary of
Asterisk's ``extensions.conf``: a list of application steps (``Answer``, ``Wait(5)``,
``Dial(Local/2004@ami-test,30)``, ``Playback(hello-world)``...) and an optional hint. The
simulator always carries the *product* dial plan (``mailgw-dial`` / ``mailgw-connect``, built by
``product_dialplan``) and may load more from YAML files, e.g. ``pbx/dialplans/ami-test.yaml``,
which emulates the context the reference captures were recorded against.

File format::

    contexts:
      ami-test:
        "2000": [Answer, Wait(5), Hangup]                  # steps, in order (priority 1, 2, ...)
        "3000":
          hint: Custom:3000                                 # exten => 3000,hint,Custom:3000
          steps: [Set(DEVICE_STATE(Custom:3000)=INUSE), Answer, Wait(3), Hangup]
        "_X.": [Dial(Local/${EXTEN}@other,30)]             # Asterisk patterns: X Z N [..] . !

Applications the simulator understands (others run as a 2 s no-op): ``NoOp``, ``Answer``,
``Ringing``, ``Wait(s)``, ``Busy``, ``Congestion``, ``Hangup([cause])``, ``Playback(file)``,
``SendFAX(tiff)``, ``ReceiveFAX(tiff)``, ``ConfBridge(room)``, ``ChanSpy(channel,options)``,
``Set(DEVICE_STATE(Custom:x)=STATE)``, ``Dial(Local/<n>@<ctx>[,timeout])`` and
``Dial(PJSIP/<n>)`` (ring the simulated phone ``<n>`` of the phone book).
``${EXTEN}`` and channel variables (e.g. ``${MAILGW_RING_TIMEOUT}``) are substituted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_STEP = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*")
_VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


class DialPlanError(ValueError):
    """A dial plan that cannot be used; the message names the place."""


@dataclass(frozen=True)
class Step:
    """One dial-plan priority: an application and its raw argument string."""

    app: str
    data: str = ""

    @property
    def name(self) -> str:
        return self.app.lower()

    def args(self, variables: Mapping[str, str] | None = None) -> list[str]:
        """The comma-separated arguments, with ``${VAR}`` substituted."""
        text = substitute(self.data, variables or {})
        return [part.strip() for part in text.split(",")] if text else []

    def __str__(self) -> str:
        return f"{self.app}({self.data})" if self.data else self.app


@dataclass(frozen=True)
class Extension:
    steps: tuple[Step, ...] = ()
    hint: str | None = None


@dataclass
class DialPlan:
    """Contexts of extensions; exact extensions win over patterns, as in Asterisk."""

    contexts: dict[str, dict[str, Extension]] = field(default_factory=dict)

    def lookup(self, context: str, exten: str) -> Extension | None:
        extensions = self.contexts.get(context)
        if not extensions:
            return None
        found = extensions.get(exten)
        if found is not None and found.steps:
            return found
        for pattern, extension in extensions.items():
            if pattern.startswith("_") and extension.steps and pattern_matches(pattern, exten):
                return extension
        return None

    def hints(self) -> list[tuple[str, str, str]]:
        """(context, exten, device) for every hinted extension."""
        return [(context, exten, ext.hint) for context, extensions in self.contexts.items()
                for exten, ext in extensions.items() if ext.hint]

    def hint(self, context: str, exten: str) -> str | None:
        ext = self.contexts.get(context, {}).get(exten)
        return ext.hint if ext is not None else None

    def merge(self, other: DialPlan) -> DialPlan:
        for context, extensions in other.contexts.items():
            self.contexts.setdefault(context, {}).update(extensions)
        return self


def substitute(text: str, variables: Mapping[str, str]) -> str:
    return _VARIABLE.sub(lambda m: variables.get(m.group(1), ""), text)


def pattern_matches(pattern: str, exten: str) -> bool:
    """Asterisk extension patterns: ``_`` then X (0-9), Z (1-9), N (2-9), [chars], ``.`` (one or
    more of anything), ``!`` (zero or more), anything else literally."""
    return re.fullmatch(_pattern_regex(pattern[1:]), exten) is not None


def _pattern_regex(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c in "xX":
            out.append("[0-9]")
        elif c in "zZ":
            out.append("[1-9]")
        elif c in "nN":
            out.append("[2-9]")
        elif c == "[":
            end = body.index("]", i)
            out.append("[" + re.sub(r"([\\^\]])", r"\\\1", body[i + 1:end]) + "]")
            i = end
        elif c == ".":
            out.append(".+")
        elif c == "!":
            out.append(".*")
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


# --- loading ----------------------------------------------------------------------------------------


def parse_step(text: Any, where: str) -> Step:
    match = _STEP.fullmatch(str(text))
    if not match:
        raise DialPlanError(f"{where}: {text!r} is not an application step such as Wait(5)")
    return Step(match.group(1), (match.group(2) or "").strip())


def parse_dialplan(raw: Any, where: str = "dialplan") -> DialPlan:
    if not isinstance(raw, dict) or not isinstance(raw.get("contexts"), dict):
        raise DialPlanError(f"{where}: needs a 'contexts' mapping")
    plan = DialPlan()
    for context, extensions in raw["contexts"].items():
        if not isinstance(extensions, dict):
            raise DialPlanError(f"{where}.{context}: must map extensions to steps")
        parsed = plan.contexts.setdefault(str(context), {})
        for exten, entry in extensions.items():
            parsed[str(exten)] = _extension(entry, f"{where}.{context}.{exten}")
    return plan


def _extension(entry: Any, where: str) -> Extension:
    if isinstance(entry, list):
        entry = {"steps": entry}
    if not isinstance(entry, dict):
        raise DialPlanError(f"{where}: must be a list of steps or a mapping with steps/hint")
    unknown = set(entry) - {"steps", "hint"}
    if unknown:
        raise DialPlanError(f"{where}.{sorted(unknown)[0]}: unknown key (known: hint, steps)")
    steps = entry.get("steps") or []
    if not isinstance(steps, list):
        raise DialPlanError(f"{where}.steps: must be a list")
    hint = entry.get("hint")
    return Extension(tuple(parse_step(s, f"{where}[{i + 1}]") for i, s in enumerate(steps)),
                     None if hint is None else str(hint))


def load_dialplan(path: str | Path) -> DialPlan:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DialPlanError(f"{path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise DialPlanError(f"{path}: not valid YAML: {exc}") from exc
    return parse_dialplan(raw, str(path))


def product_dialplan(dial_context: str, connect_context: str, ring_timeout_variable: str) -> DialPlan:
    """The dial plan mailgw needs (``pbx/asterisk/extensions.conf`` implements the same)."""
    return parse_dialplan({"contexts": {
        dial_context: {"_[+0-9*#]!": ["Dial(PJSIP/${EXTEN})"]},
        connect_context: {"_[+0-9*#]!": [f"Dial(Local/${{EXTEN}}@{dial_context},${{{ring_timeout_variable}}})"]},
    }}, "product dial plan")


def load_dialplans(paths: Iterable[str | Path], base: DialPlan) -> DialPlan:
    for path in paths:
        base.merge(load_dialplan(path))
    return base
