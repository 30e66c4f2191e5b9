"""Scenarios, version 1: the YAML an admin stores (or a sender sends inline) that says which steps a
request runs — play a voice part, send a FAX part, connect, ask the recipient, wait, run branches
at once, send a note — read into plain dataclasses and checked, every problem with its line:column.

A scenario is untrusted input (a sender can send one), so reading it is strict:

* YAML is composed into nodes, never constructed: anchors, aliases and tags are refused (they are
  how "billion laughs" bombs and ``!!python/object`` tricks work), and so is every unknown key;
* limits (``ScenarioLimits``) bound its size, the number of steps, nesting, ``retry N``, every
  timeout and the worst-case total duration. The language has no jumps, includes or loops, so a
  scenario always ends;
* strings (``ask``, ``notify`` text) are jinja2 templates rendered in a ``SandboxedEnvironment``,
  and only ``{{ variable }}`` substitutions with a few filters are allowed (no statements, no
  attribute access, no calls);
* parts are referred to only by what the mail itself carries (``resolve_part``): a Content-ID, a
  file name (a name, never a path), a kind (``voice``/``fax``/``text``) or a 1-based index
  ("message 3"); there is no way to name a file on the gateway;
* every number a step would dial and every address it would mail is checked against the policy
  (``check_scenario``) before the request is accepted.

``parse_scenario`` does the structural reading (``ScenarioError`` lists the problems);
``check_scenario`` ties a parsed scenario to one request (its parts, its numbers, the policy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import yaml
from jinja2 import nodes as jinja_nodes
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pytimeparse2 import parse as parse_duration

from .config import Config
from .directory import normalise_address
from .numbering import normalise_number
from .policy import check_number
from .request import ExchangeRequest, Part, PartKind
from .status import Refused

# --- limits --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioLimits:
    max_bytes: int = 16 * 1024          # the YAML text
    max_steps: int = 50                 # every step counted, nested ones too
    max_depth: int = 4                  # parallel branches and `on:` branches inside each other
    max_branches: int = 4               # branches of one parallel step
    max_retries: int = 3                # on-failure: retry N
    max_text: int = 1000                # characters of an ask / notify text
    max_timeout: float = 24 * 3600.0    # one wait or confirm timeout
    max_total: float = 24 * 3600.0      # worst case of the whole scenario (see ``worst_case``)
    call_seconds: float = 300.0         # what one call step counts for in ``worst_case``


LIMITS = ScenarioLimits()
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


# --- the model -----------------------------------------------------------------------------------

class Via(StrEnum):
    MAIL = "mail"    # an inquiry mail; the recipient replies OK or NG
    PHONE = "phone"  # a call with the question; the recipient presses 1 (yes) or 2 (no)


class Afterwards(StrEnum):
    STOP = "stop"
    CONTINUE = "continue"


class Failure(StrEnum):
    STOP = "stop"
    CONTINUE = "continue"
    RETRY = "retry"


class Outcome(StrEnum):
    """What a call step can end with; ``on:`` branches are keyed by these."""

    BUSY = "busy"
    NO_ANSWER = "no-answer"
    ANSWERED = "answered"
    FAILED = "failed"


class RefKind(StrEnum):
    INDEX = "index"
    KIND = "kind"
    CONTENT_ID = "content-id"
    FILENAME = "filename"


@dataclass(frozen=True)
class Where:
    line: int    # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


@dataclass(frozen=True)
class PartRef:
    written: str
    kind: RefKind
    value: str | int


@dataclass(frozen=True)
class OnFailure:
    action: Failure = Failure.STOP
    retries: int = 0


@dataclass(frozen=True)
class Play:
    part: PartRef
    to: str | None = None  # default: the request's ``to``


@dataclass(frozen=True)
class Fax:
    part: PartRef
    to: str | None = None


@dataclass(frozen=True)
class Connect:
    to: str | None = None
    from_: str | None = None


@dataclass(frozen=True)
class Confirm:
    ask: str
    via: Via = Via.MAIL
    timeout: float = 600.0
    on_no: Afterwards = Afterwards.STOP
    on_timeout: Afterwards = Afterwards.STOP


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Parallel:
    branches: tuple[tuple[Step, ...], ...]


@dataclass(frozen=True)
class Notify:
    text: str
    to: str = "sender"  # "sender", "recipient" or a mail address in one of the local domains


Action = Union[Play, Fax, Connect, Confirm, Wait, Parallel, Notify]
CALL_STEPS = (Play, Fax, Connect)
STEP_NAMES: dict[str, type] = {"play": Play, "fax": Fax, "connect": Connect, "confirm": Confirm,
                                "wait": Wait, "parallel": Parallel, "notify": Notify}


@dataclass(frozen=True)
class Step:
    action: Action
    where: Where
    on_failure: OnFailure = OnFailure()
    on: tuple[tuple[Outcome, tuple[Step, ...]], ...] = ()  # branches by outcome

    @property
    def kind(self) -> str:
        return next(name for name, cls in STEP_NAMES.items() if isinstance(self.action, cls))

    def branch(self, outcome: Outcome) -> tuple[Step, ...] | None:
        return dict(self.on).get(outcome)


@dataclass(frozen=True)
class Scenario:
    name: str | None
    description: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Problem:
    where: Where | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def show(self, file: str) -> str:
        """``file:line:column: message``, the form editors and CI jump to (1:1 for the whole file)."""
        return f"{file}:{self.where or Where(1, 1)}: {self.message}"


class ScenarioError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


# --- templates -----------------------------------------------------------------------------------

TEMPLATE_VARIABLES = ("from", "to", "sender", "recipient", "subject", "request")
_FILTERS = {"upper", "lower", "title", "trim", "default", "truncate"}
_TEMPLATE_NODES = (jinja_nodes.Template, jinja_nodes.Output, jinja_nodes.TemplateData, jinja_nodes.Name,
                   jinja_nodes.Const, jinja_nodes.Filter)
_SANDBOX = SandboxedEnvironment(autoescape=False, keep_trailing_newline=False)


def template_problem(text: str) -> str | None:
    """Why ``text`` is not an allowed template (only ``{{ variable | filter }}``), or None."""
    try:
        tree = _SANDBOX.parse(text)
    except TemplateSyntaxError as exc:
        return f"template syntax error: {exc.message}"
    for node in tree.find_all(jinja_nodes.Node):
        if not isinstance(node, _TEMPLATE_NODES):
            return ("only {{ variable }} substitutions are allowed in scenario texts "
                    f"(found {type(node).__name__.lower()})")
        if isinstance(node, jinja_nodes.Name) and node.name not in TEMPLATE_VARIABLES:
            return f"unknown variable '{node.name}' (known: {', '.join(TEMPLATE_VARIABLES)})"
        if isinstance(node, jinja_nodes.Filter) and node.name not in _FILTERS:
            return f"filter '{node.name}' is not allowed (allowed: {', '.join(sorted(_FILTERS))})"
    return None


def render(text: str, request: ExchangeRequest, request_id: str, limits: ScenarioLimits = LIMITS,
           label: Callable[[str], str] | None = None) -> str:
    """A checked scenario text with the request's values filled in (sandboxed, length-capped);
    ``label`` shows a number the way mails do ("Alice Archer (2000)")."""
    def number(value: str | None) -> str:
        if request.confidential:
            return "(confidential)"
        return (label(value) if label is not None else value) if value else ""
    values = {"from": number(request.from_number), "to": number(request.to_number), "sender": request.sender,
              "recipient": request.recipient, "subject": request.subject, "request": request_id}
    return _SANDBOX.from_string(text).render(values)[:limits.max_text]


# --- reading -------------------------------------------------------------------------------------

def _where(node: yaml.Node) -> Where:
    return Where(node.start_mark.line + 1, node.start_mark.column + 1)


class _Reader:
    """Walks the composed YAML, collecting problems instead of stopping at the first."""

    def __init__(self, limits: ScenarioLimits) -> None:
        self.limits = limits
        self.problems: list[Problem] = []
        self.steps = 0

    def problem(self, node: yaml.Node | None, message: str) -> None:
        self.problems.append(Problem(_where(node) if node is not None else None, message))

    def scalar(self, node: yaml.Node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null" and not node.value:
            self.problem(node, f"{what} must be a single value")
            return None
        return node.value.strip()

    def text(self, node: yaml.Node, what: str) -> str | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        if len(value) > self.limits.max_text:
            self.problem(node, f"{what} is longer than {self.limits.max_text} characters")
            return None
        problem = template_problem(value)
        if problem is not None:
            self.problem(node, f"{what}: {problem}")
            return None
        return value

    def duration(self, node: yaml.Node, what: str) -> float | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        seconds = parse_duration(value) if not value.isdigit() else float(value)
        if seconds is None or seconds <= 0:
            self.problem(node, f"{what}: {value!r} is not a duration (write 30s, 10m, 1h30m)")
            return None
        if seconds > self.limits.max_timeout:
            self.problem(node, f"{what}: {value} is longer than the limit of {_hours(self.limits.max_timeout)}")
            return None
        return float(seconds)

    def choice(self, node: yaml.Node, what: str, enum: type[StrEnum]) -> Any:
        value = self.scalar(node, what)
        if value is None:
            return None
        try:
            return enum(value.lower())
        except ValueError:
            self.problem(node, f"{what}: {value!r} is not one of {' | '.join(e.value for e in enum)}")  # type: ignore[attr-defined]
            return None

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be a mapping (key: value)")
            return {}
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else ""
            if name not in allowed:
                self.problem(key, f"unknown key {name or '?'!r} in {what} (allowed: {', '.join(allowed)})")
            elif name in entries:
                self.problem(key, f"{name!r} given twice in {what}")
            else:
                entries[name] = (key, value)
        return entries

    # --- the document ---

    def document(self, root: yaml.Node) -> Scenario | None:
        entries = self.mapping(root, "a scenario", ("name", "description", "steps"))
        name = None
        if "name" in entries:
            name = self.scalar(entries["name"][1], "'name'")
            if name is not None and not NAME.fullmatch(name):
                self.problem(entries["name"][1], f"'name': {name!r} is not a scenario name (a-z, 0-9 and -, "
                                                 "at most 64 characters)")
        description = ""
        if "description" in entries:
            description = self.scalar(entries["description"][1], "'description'") or ""
        if "steps" not in entries:
            if isinstance(root, yaml.MappingNode):
                self.problem(root, "a scenario needs 'steps' (a list of steps)")
            return None
        steps = self.sequence(entries["steps"][1], "'steps'", depth=0)
        if not self.problems and not steps:
            self.problem(entries["steps"][1], "'steps' is empty")
        return Scenario(name, description, steps)

    def sequence(self, node: yaml.Node, what: str, depth: int) -> tuple[Step, ...]:
        if depth > self.limits.max_depth:
            self.problem(node, f"steps nested more than {self.limits.max_depth} levels deep")
            return ()
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, f"{what} must be a list of steps")
            return ()
        steps = []
        for item in node.value:
            self.steps += 1
            if self.steps == self.limits.max_steps + 1:
                self.problem(item, f"more than {self.limits.max_steps} steps")
            if self.steps > self.limits.max_steps:
                return tuple(steps)
            step = self.step(item, depth)
            if step is not None:
                steps.append(step)
        return tuple(steps)

    def step(self, node: yaml.Node, depth: int) -> Step | None:
        if isinstance(node, yaml.ScalarNode):  # `- connect`
            if node.value in ("connect",):
                return Step(Connect(), _where(node))
            if node.value in STEP_NAMES:
                self.problem(node, f"step '{node.value}' needs a value ({_HINTS[node.value]})")
            else:
                self.problem(node, f"unknown step {node.value!r} (steps: {', '.join(STEP_NAMES)})")
            return None
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "a step must be a step name or a mapping such as 'play: voice'")
            return None
        kinds = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value in STEP_NAMES]
        if len(kinds) != 1:
            keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
            unknown = [k for k in keys if k not in STEP_NAMES and k not in ("on-failure", "on")]
            if unknown:
                self.problem(node, f"unknown step {unknown[0]!r} (steps: {', '.join(STEP_NAMES)})")
            else:
                self.problem(node, "a step must have exactly one of: " + ", ".join(STEP_NAMES))
            return None
        key, value = kinds[0]
        entries = self.mapping(node, f"step '{key.value}'", (key.value, "on-failure", "on"))
        action = getattr(self, f"step_{key.value}")(value, depth)
        on_failure = self.on_failure(entries["on-failure"][1]) if "on-failure" in entries else OnFailure()
        branches: tuple[tuple[Outcome, tuple[Step, ...]], ...] = ()
        if "on" in entries:
            if not isinstance(action, (*CALL_STEPS, Confirm)):
                self.problem(entries["on"][0], f"'on' branches apply to call steps (play, fax, connect, confirm), "
                                               f"not to '{key.value}'")
            branches = self.branches(entries["on"][1], depth)
        if action is None:
            return None
        return Step(action, _where(node), on_failure, branches)

    def on_failure(self, node: yaml.Node) -> OnFailure:
        value = self.scalar(node, "'on-failure'")
        if value is None:
            return OnFailure()
        words = value.lower().split()
        if words in (["stop"], ["continue"]):
            return OnFailure(Failure(words[0]))
        if len(words) == 2 and words[0] == "retry" and words[1].isdigit():
            retries = int(words[1])
            if 1 <= retries <= self.limits.max_retries:
                return OnFailure(Failure.RETRY, retries)
            self.problem(node, f"'on-failure': retry {retries}: retry between 1 and {self.limits.max_retries} times")
            return OnFailure()
        self.problem(node, f"'on-failure': {value!r} is not one of stop | continue | retry N")
        return OnFailure()

    def branches(self, node: yaml.Node, depth: int) -> tuple[tuple[Outcome, tuple[Step, ...]], ...]:
        entries = self.mapping(node, "'on'", tuple(o.value for o in Outcome))
        return tuple((Outcome(name), self.sequence(value, f"'on: {name}'", depth + 1))
                     for name, (_, value) in entries.items())

    # --- one reader per step ---

    def part_step(self, node: yaml.Node, name: str) -> tuple[PartRef | None, str | None]:
        if isinstance(node, yaml.ScalarNode):
            return self.part_ref(node), None
        entries = self.mapping(node, f"'{name}'", ("part", "to"))
        if "part" not in entries:
            if isinstance(node, yaml.MappingNode):
                self.problem(node, f"'{name}' needs 'part' (which part of the mail)")
            return None, None
        to = self.scalar(entries["to"][1], f"'{name}: to'") if "to" in entries else None
        return self.part_ref(entries["part"][1]), to

    def part_ref(self, node: yaml.Node) -> PartRef | None:
        value = self.scalar(node, "a part")
        if value is None:
            return None
        ref = part_reference(value)
        if ref is None:
            self.problem(node, f"{value!r} is not a part reference (voice, fax, text, a number such as "
                               "'message 3', 'cid:...' or a file name)")
        return ref

    def step_play(self, node: yaml.Node, depth: int) -> Play | None:
        part, to = self.part_step(node, "play")
        return Play(part, to) if part is not None else None

    def step_fax(self, node: yaml.Node, depth: int) -> Fax | None:
        part, to = self.part_step(node, "fax")
        return Fax(part, to) if part is not None else None

    def step_connect(self, node: yaml.Node, depth: int) -> Connect | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return Connect()
        entries = self.mapping(node, "'connect'", ("to", "from"))
        to = self.scalar(entries["to"][1], "'connect: to'") if "to" in entries else None
        from_ = self.scalar(entries["from"][1], "'connect: from'") if "from" in entries else None
        return Connect(to, from_)

    def step_confirm(self, node: yaml.Node, depth: int) -> Confirm | None:
        entries = self.mapping(node, "'confirm'", ("ask", "via", "timeout", "on-no", "on-timeout"))
        if "ask" not in entries:
            if isinstance(node, yaml.MappingNode):
                self.problem(node, "'confirm' needs 'ask' (the question for the recipient)")
            return None
        ask = self.text(entries["ask"][1], "'confirm: ask'")
        via = self.choice(entries["via"][1], "'confirm: via'", Via) if "via" in entries else Via.MAIL
        timeout = self.duration(entries["timeout"][1], "'confirm: timeout'") if "timeout" in entries else 600.0
        on_no = (self.choice(entries["on-no"][1], "'confirm: on-no'", Afterwards) if "on-no" in entries
                 else Afterwards.STOP)
        on_timeout = (self.choice(entries["on-timeout"][1], "'confirm: on-timeout'", Afterwards)
                      if "on-timeout" in entries else Afterwards.STOP)
        if None in (ask, via, timeout, on_no, on_timeout):
            return None
        return Confirm(ask, via, timeout, on_no, on_timeout)  # type: ignore[arg-type]

    def step_wait(self, node: yaml.Node, depth: int) -> Wait | None:
        seconds = self.duration(node, "'wait'")
        return Wait(seconds) if seconds is not None else None

    def step_parallel(self, node: yaml.Node, depth: int) -> Parallel | None:
        if not isinstance(node, yaml.SequenceNode) or len(node.value) < 2:
            self.problem(node, "'parallel' must be a list of at least two branches (each a step or a list of steps)")
            return None
        if len(node.value) > self.limits.max_branches:
            self.problem(node, f"'parallel' has more than {self.limits.max_branches} branches")
            return None
        branches = []
        for branch in node.value:
            if isinstance(branch, yaml.SequenceNode):
                branches.append(self.sequence(branch, "a branch", depth + 1))
            else:
                wrapped = yaml.SequenceNode("tag:yaml.org,2002:seq", [branch], branch.start_mark, branch.end_mark)
                branches.append(self.sequence(wrapped, "a branch", depth + 1))
        return Parallel(tuple(branches))

    def step_notify(self, node: yaml.Node, depth: int) -> Notify | None:
        if isinstance(node, yaml.ScalarNode):
            text = self.text(node, "'notify'")
            return Notify(text) if text is not None else None
        entries = self.mapping(node, "'notify'", ("to", "text"))
        if "text" not in entries:
            if isinstance(node, yaml.MappingNode):
                self.problem(node, "'notify' needs 'text'")
            return None
        text = self.text(entries["text"][1], "'notify: text'")
        to = "sender"
        if "to" in entries:
            written = self.scalar(entries["to"][1], "'notify: to'")
            if written is not None and written not in ("sender", "recipient"):
                address = normalise_address(written)
                if address is None:
                    self.problem(entries["to"][1], f"'notify: to': {written!r} is not sender, recipient or "
                                                   "a mail address")
                written = address
            to = written or to
        return Notify(text, to) if text is not None else None


_HINTS = {"play": "e.g. 'play: voice'", "fax": "e.g. 'fax: message 3'", "confirm": "e.g. 'confirm: {ask: ...}'",
          "wait": "e.g. 'wait: 30s'", "parallel": "a list of branches", "notify": "e.g. 'notify: Done.'"}


def part_reference(text: str) -> PartRef | None:
    """How a step names a part: ``3``, ``message 3``, ``voice``/``fax``/``text``, ``cid:x`` / ``<x>``, a name."""
    written = text.strip()
    lowered = written.lower()
    index = re.fullmatch(r"(?:(?:message|part|#)\s*)?([0-9]{1,3})", lowered)
    if index:
        return PartRef(written, RefKind.INDEX, int(index.group(1)))
    if lowered in (PartKind.VOICE, PartKind.FAX, PartKind.TEXT):
        return PartRef(written, RefKind.KIND, lowered)
    if lowered.startswith("cid:") and len(written) > 4:
        return PartRef(written, RefKind.CONTENT_ID, written[4:].strip())
    if written.startswith("<") and written.endswith(">") and len(written) > 2:
        return PartRef(written, RefKind.CONTENT_ID, written[1:-1].strip())
    if written and not re.search(r"[/\\\x00-\x1f]", written) and written not in (".", ".."):
        return PartRef(written, RefKind.FILENAME, written)
    return None


def parse_scenario(text: str, limits: ScenarioLimits = LIMITS) -> Scenario:
    """The scenario a YAML text describes, or ``ScenarioError`` listing every problem with line:column."""
    if len(text.encode("utf-8")) > limits.max_bytes:
        raise ScenarioError([Problem(None, f"the scenario is larger than {limits.max_bytes // 1024} KiB")])
    try:
        for token in yaml.scan(text):
            if isinstance(token, (yaml.AnchorToken, yaml.AliasToken, yaml.TagToken)):
                what = "tags" if isinstance(token, yaml.TagToken) else "anchors and aliases"
                raise ScenarioError([Problem(Where(token.start_mark.line + 1, token.start_mark.column + 1),
                                             f"{what} are not allowed in a scenario")])
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = Where(mark.line + 1, mark.column + 1) if mark is not None else None
        raise ScenarioError([Problem(where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}")]) from None
    except RecursionError:
        raise ScenarioError([Problem(None, "the scenario is nested too deeply")]) from None
    if root is None:
        raise ScenarioError([Problem(None, "the scenario is empty")])
    reader = _Reader(limits)
    scenario = reader.document(root)
    if scenario is not None and not reader.problems:
        total = worst_case(scenario.steps, limits)
        if total > limits.max_total:
            reader.problem(root, f"the scenario could take {_hours(total)} (waits, timeouts and retries added up); "
                                 f"the limit is {_hours(limits.max_total)}")
    if reader.problems or scenario is None:
        raise ScenarioError(reader.problems)
    return scenario


def load_file(path: Path, limits: ScenarioLimits = LIMITS) -> Scenario:
    """A stored scenario: ``scenarios/NAME.yaml``; its ``name``, when given, must be the file's."""
    return stored_scenario(Path(path).read_text(encoding="utf-8"), Path(path), limits)


def stored_scenario(text: str, path: Path, limits: ScenarioLimits = LIMITS) -> Scenario:
    """``text`` read from the stored scenario file ``path`` (named after the file)."""
    scenario = parse_scenario(text, limits)
    stem = path.stem
    if scenario.name is None:
        return replace(scenario, name=stem)
    if scenario.name != stem:
        raise ScenarioError([Problem(None, f"'name' is {scenario.name!r} but the file is {path.name}: "
                                           f"senders use the file name, so they must agree")])
    return scenario


def worst_case(steps: tuple[Step, ...], limits: ScenarioLimits = LIMITS) -> float:
    """The longest a sequence of steps can take: waits and timeouts, each call step as
    ``call_seconds``, parallel branches as their longest, ``on:`` branches as their longest,
    ``retry N`` as N + 1 tries."""
    total = 0.0
    for step in steps:
        action = step.action
        if isinstance(action, Wait):
            own = action.seconds
        elif isinstance(action, Confirm):
            own = action.timeout + (limits.call_seconds if action.via == Via.PHONE else 0.0)
        elif isinstance(action, Parallel):
            own = max(worst_case(branch, limits) for branch in action.branches)
        elif isinstance(action, Notify):
            own = 0.0
        else:
            own = limits.call_seconds
        own *= step.on_failure.retries + 1
        own += max((worst_case(branch, limits) for _, branch in step.on), default=0.0)
        total += own
    return total


def walk(steps: tuple[Step, ...]) -> Iterator[Step]:
    """Every step, nested ones included, in document order."""
    for step in steps:
        yield step
        if isinstance(step.action, Parallel):
            for branch in step.action.branches:
                yield from walk(branch)
        for _, branch in step.on:
            yield from walk(branch)


def describe_steps(steps: tuple[Step, ...], request: ExchangeRequest, label: Callable[[str], str] = str,
                   prefix: str = "") -> list[str]:
    """What the steps would do for ``request``, one line each (a dry run's plan)."""
    def who(number: str | None) -> str:
        return label(number) if number else "-"
    to = who(request.to_number)
    lines = []
    for number, step in enumerate(steps, start=1):
        action = step.action
        if isinstance(action, Play):
            what = f"play {action.part.written} to {who(action.to) if action.to else to}"
        elif isinstance(action, Fax):
            what = f"fax {action.part.written} to {who(action.to) if action.to else to + ' (their fax machine)'}"
        elif isinstance(action, Connect):
            what = f"connect {who(action.from_ or request.from_number)} and {who(action.to) if action.to else to}"
        elif isinstance(action, Confirm):
            what = (f"ask {to} by {action.via} and wait up to {_hours(action.timeout)}; "
                    f"on no: {action.on_no}, on no answer: {action.on_timeout}")
        elif isinstance(action, Wait):
            what = f"wait {_hours(action.seconds)}"
        elif isinstance(action, Parallel):
            what = "at the same time: " + " | ".join("; ".join(describe_steps(branch, request, label))
                                                     for branch in action.branches)
        else:
            assert isinstance(action, Notify)
            what = f"mail a note to {action.to}"
        if step.on_failure.action != Failure.STOP:
            what += f" (on failure: {step.on_failure.action}{f' {step.on_failure.retries}' if step.on_failure.retries else ''})"
        lines.append(f"{prefix}{number}. {what}")
        for outcome, branch in step.on:
            lines.append(f"{prefix}{number}. if {outcome}:")
            lines += ["   " + line for line in describe_steps(branch, request, label, f"{prefix}{number}.")]
    return lines


# --- one scenario for one request ----------------------------------------------------------------

def resolve_part(ref: PartRef, parts: tuple[Part, ...]) -> Part | str:
    """The part of the request's own mail that ``ref`` names, or why there is none."""
    if ref.kind == RefKind.INDEX:
        found = [p for p in parts if p.index == ref.value]
        return found[0] if found else f"there is no part {ref.value} (the mail has {len(parts)} parts)"
    if ref.kind == RefKind.KIND:
        found = [p for p in parts if p.kind == ref.value]
        if len(found) > 1:
            return (f"the mail has {len(found)} {ref.value} parts ({', '.join(str(p.index) for p in found)}): "
                    f"name one, e.g. 'message {found[0].index}'")
        return found[0] if found else f"the mail has no {ref.value} part"
    if ref.kind == RefKind.CONTENT_ID:
        found = [p for p in parts if p.content_id == ref.value]
        return found[0] if found else f"no part has Content-ID <{ref.value}>"
    found = [p for p in parts if p.filename == ref.value]
    if len(found) > 1:
        return f"{len(found)} parts are named {ref.value!r}: refer to one by number"
    return found[0] if found else f"no part is named {ref.value!r}"


_NEEDED_KIND = {Play: PartKind.VOICE, Fax: PartKind.FAX}


def check_scenario(scenario: Scenario, request: ExchangeRequest, config: Config) -> list[Problem]:
    """What keeps ``scenario`` from running for ``request``: parts it names that the mail lacks (or
    of the wrong kind), numbers the policy forbids, addresses outside the local domains."""
    problems: list[Problem] = []
    for step in walk(scenario.steps):
        action = step.action
        if isinstance(action, (Play, Fax)):
            found = resolve_part(action.part, request.parts)
            needed = _NEEDED_KIND[type(action)]
            if isinstance(found, str):
                problems.append(Problem(step.where, f"{step.kind} {action.part.written!r}: {found}"))
            elif found.kind != needed:
                problems.append(Problem(step.where, f"{step.kind} {action.part.written!r}: part {found.index} is "
                                                    f"{found.content_type}, not a {needed} part"))
    problems += policy_problems(scenario, config)
    if request.to_number is None and any(isinstance(s.action, (Play, Fax, Connect, Confirm))
                                         for s in walk(scenario.steps)):
        problems.append(Problem(None, "the scenario calls the destination but the request has no 'to'"))
    return problems


def policy_problems(scenario: Scenario, config: Config) -> list[Problem]:
    """Numbers the scenario names itself that the policy forbids; notify addresses outside the
    local domains (a scenario must not make the gateway an open relay)."""
    problems: list[Problem] = []
    for step in walk(scenario.steps):
        problems += number_problems(step, config)
        action = step.action
        if isinstance(action, Notify) and action.to not in ("sender", "recipient"):
            if action.to.rpartition("@")[2] not in config.domains:
                problems.append(Problem(step.where, f"notify: {action.to} is not in a local domain "
                                                    f"({', '.join(config.domains)}); a scenario may not mail "
                                                    "other domains"))
    return problems


def number_problems(step: Step, config: Config) -> list[Problem]:
    """The numbers one step names itself (``to:``, ``from:``), normalised and checked against policy."""
    action = step.action
    written = []
    if isinstance(action, (Play, Fax)) and action.to:
        written.append(("to", action.to))
    if isinstance(action, Connect):
        written += [(name, value) for name, value in (("to", action.to), ("from", action.from_)) if value]
    problems = []
    for name, value in written:
        try:
            check_number(normalise_number(value, region=config.numbering.region), config.policy,
                         field=f"{step.kind}: {name}")
        except ValueError as exc:
            problems.append(Problem(step.where, f"{step.kind}: {name}: {exc}"))
        except Refused as refusal:
            problems.append(Problem(step.where, refusal.reply.text))
    return problems


def refusal(problems: list[Problem], where: str) -> Refused:
    """The DATA refusal naming the first problems of a scenario (``where`` says which scenario).
    An SMTP reply line is at most 512 octets (RFC 5321 4.5.3.1.5): the text is kept well inside."""
    shown = "; ".join(str(p) for p in problems[:2]) + (f" (and {len(problems) - 2} more)" if len(problems) > 2 else "")
    text = f"field 'scenario': {where}: {shown}"
    if len(text) > 440:
        text = text[:437] + "..."
    status = "5.7.1" if any("not allowed by policy" in p.message or "local domain" in p.message
                            for p in problems) else "5.6.0"
    return Refused(550, status, text)


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
