"""The AMI driver: an asyncio AMI client (``AmiClient``) and the PBX port over it (``AmiPbx``).

``AmiClient`` keeps one logged-in AMI session to an Asterisk (or the built-in simulator):

* **Correlation by ActionID, never by order.** Every action gets a unique ActionID; a response
  completes the waiter registered under that id. Responses and events interleave freely (an
  action's response may follow events of other calls), so nothing assumes FIFO.
* **List actions** (``EventList: start`` ... ``<Name>Complete``) are collected by ActionID too:
  ``list_action`` returns the response plus the item events.
* **Bounded waits.** Every action has a timeout; a missing answer raises ``PbxError``.
* **Events** are dispatched by name. Two ways to listen:
  ``add_listener(callback, *names)`` calls a plain function in the reader's loop iteration
  (lossless, must be quick and must not block; this is how ``AmiPbx`` tracks calls), and
  ``subscribe(*names, maxsize=...)`` returns an ``EventSubscription`` with a bounded queue that
  drops its *oldest* event when full (counted in ``dropped``, logged once per 1000 drops), so a
  slow consumer during an event flood costs bounded memory and never stalls the reader.
  No names = every event. Unknown events are simply not delivered to anyone who did not ask.
* **Event filter** (``filter_events``, on for ``AmiPbx``'s own client): the session asks the PBX
  for the listened-to events only (AMI ``Filter``, ``MatchCriteria: name(...)``), and widens the
  filter when a listener for a new name is added. Spell names as Asterisk does (``DialBegin``):
  the PBX compares them exactly. A PBX that refuses to filter is read unfiltered.
* **Reconnect.** When the connection drops (PBX restart, network), every action in flight fails
  at once with ``PbxError``; new actions fail fast with ``PbxUnavailable`` (nothing was sent, so
  retrying is safe) until the session is back. A background task
  reconnects with exponential backoff (with jitter) and logs in again by itself. A keep-alive
  Ping detects half-open connections.
* **Writes** are whole messages in a single ``transport.write`` on the one event-loop thread, so
  concurrent actions cannot interleave bytes; ``drain`` is only awaited (under a lock) when the
  transport's buffer is over its high-water mark.
* The secret is never logged, and ``Message.__repr__`` masks it.

``AmiPbx`` implements ``port.PbxPort``. A two-point connection is placed the way Asterisk
click-to-dial works (captures 02c/02d/02e): an async Originate of ``Local/<from>@<dial_context>``
into ``<connect_context>``/``<to>``, with ``ChannelId: <call_id>`` and
``OtherChannelId: <call_id>-2``, and ``Variable: MAILGW_RING_TIMEOUT=<s>`` for the second
party's Dial. The outcome is decided by ``decide`` (a pure function) from:

* the first party: ``OriginateResponse`` (Reason 4 answered, 5 busy, 3 no answer, 8 congestion,
  0/1 failed), refined by the Hangup cause of the ``;2`` leg (Uniqueid ``<call_id>-2``);
* the second party: the ``DialEnd`` whose ``Uniqueid`` is ``<call_id>`` (the first party's ``;1``
  runs Dial): ANSWER, BUSY, NOANSWER, CONGESTION, CHANUNAVAIL (unreachable), CANCEL (the first
  party hung up while the second rang: counted as the second party's no-answer), refined by the
  Hangup cause of the dialled ``;2`` channel (17 busy, 18/19 no answer, 20/27/38 unreachable,
  1/3/28 invalid number, 21 rejected, 34/42 congestion).

``connect`` returns as soon as both answered or one leg failed; the whole call is bounded by
``2 × ring_timeout + connect_margin`` (PbxError after that). If the AMI session drops while a
call is in progress, ``connect`` raises PbxError at once: the call may still be up on the PBX,
which ``find_call(call_id)`` (CoreShowChannels) can tell after the reconnect.

A question by phone (``ask``, for a scenario's ``confirm: {via: phone}``) is an async Originate of
``Local/<n>@<dial_context>`` with ``Application: Read`` and ``Data: MAILGW_ANSWER,<prompt>,1,,1,
<timeout>``: Asterisk's Read() plays the prompt, reads one key and sets the channel variable, then
``READSTATUS`` (OK / TIMEOUT / HANGUP); each set is a ``VarSet`` event of the ``;1`` channel
(Uniqueid ``<call_id>``), which is what ``ask`` waits for (no Getvar round trip: the channel hangs
up as soon as Read() returns). A failed ring is decided like the first party of a connect.

As a real PBX sends the hang-up cause just before or just after the result, a failure waits a
short grace (``cause_grace``) for it. Events may arrive in any order; the state machine does not
care. Many connects run concurrently on one session; events are routed to their call by
ActionID, Uniqueid and channel name through dictionaries (no scanning).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import random
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import ami
from .ami import Field, Message, Parser
from .media import tiff_pages, wav_seconds
from .port import AskResult, CallOutcome, ConnectResult, DeliveryResult, Party, PbxError, PbxUnavailable
from .port import LineCallback, LineState, line_state_of_device, line_state_of_status
from .port import IncomingCall, IncomingCallback
from .incoming import INCOMING_EVENTS, ended_unseen, track
from .outgoing import OUTGOING_EVENTS, AnsweredOutgoing, track as track_outgoing

if TYPE_CHECKING:
    from mailgw.config import PbxConfig

log = logging.getLogger(__name__)

_REAPER_SLACK = 0.01  # seconds a timeout may fire late, so one timer serves many actions
EventCallback = Callable[[Message], None]


class AmiLoginError(PbxError):
    """The PBX refused our credentials (a configuration problem, not a network one)."""


@dataclass(frozen=True)
class ListReply:
    """A list action's outcome: the response, the item events, and the ``...Complete`` event."""

    response: Message
    events: list[Message]
    complete: Message | None


class _Pending:
    __slots__ = ("future", "name", "timeout", "deadline", "response", "events")

    def __init__(self, future: asyncio.Future[ListReply], name: str, timeout: float, deadline: float) -> None:
        self.future = future
        self.name = name
        self.timeout = timeout
        self.deadline = deadline
        self.response: Message | None = None  # set once a list response said "EventList: start"
        self.events: list[Message] = []


class EventSubscription:
    """A bounded queue of events. When full, the oldest event is dropped (see ``dropped``)."""

    def __init__(self, client: AmiClient, names: tuple[str, ...], maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._client = client
        self._names = names
        self._queue: deque[Message] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self.dropped = 0
        self._remove = client.add_listener(self._put, *names)

    def _put(self, msg: Message) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("AMI event subscription %s is full (%d); dropped %d oldest event(s) so far",
                            self._names or "(all)", self._maxsize, self.dropped)
        self._queue.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> Message | None:
        return self._queue.popleft() if self._queue else None

    async def get(self, timeout: float | None = None) -> Message:
        """The next event; PbxError after ``timeout`` seconds without one."""
        while not self._queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise PbxError(f"no AMI event {self._names or ''} within {timeout:g} s") from None
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def wait_for(self, predicate: Callable[[Message], bool], timeout: float) -> Message:
        """The first event that satisfies ``predicate`` (others are consumed), bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.get(max(0.0, deadline - loop.time()))
            if predicate(msg):
                return msg

    def __len__(self) -> int:
        return len(self._queue)

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> Message:
        return await self.get()

    def close(self) -> None:
        self._remove()

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AmiClient:
    """One AMI session with automatic login and reconnect. See the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        auth: str = "plain",  # or "md5" (Challenge/Key; the secret never crosses the wire)
        events: bool = True,
        filter_events: bool = False,
        connect_timeout: float = 5.0,
        action_timeout: float = 10.0,
        keepalive_interval: float | None = 20.0,
        reconnect_min: float = 0.1,
        reconnect_max: float = 10.0,
    ) -> None:
        if auth not in ("plain", "md5"):
            raise ValueError("auth must be 'plain' or 'md5'")
        self.host = host
        self.port = port
        self.username = username
        self._secret = secret
        self.auth = auth
        self.events = events
        self.filter_events = filter_events
        self.connect_timeout = connect_timeout
        self.action_timeout = action_timeout
        self.keepalive_interval = keepalive_interval
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.banner: str | None = None
        self.sessions = 0  # successful logins so far (reconnects included)
        self._prefix = f"mgw-{secrets.token_hex(3)}-"
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._collecting = 0  # pendings in list mode; lets the hot path skip ActionID lookups
        self._listeners: dict[str | None, list[EventCallback]] = {}
        self._spelled: dict[str, str] = {}  # listened event name, lower case -> as Asterisk spells it
        self._filtered: set[str] | None = None  # names this session's PBX filters let through; None: all
        self._kept: set[str] = set()  # lower-case names kept in the filter without a listener
        self._writer: asyncio.StreamWriter | None = None
        self._drain_lock = asyncio.Lock()
        self._logged_in = asyncio.Event()
        self._lost: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._reaper: asyncio.TimerHandle | None = None
        self._first: asyncio.Future[None] | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"AmiClient({self.host}:{self.port}, user={self.username!r})"

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Start the session task. With ``wait``, return once logged in, or raise PbxError
        (AmiLoginError for refused credentials) and stop again."""
        if self._runner is not None:
            raise RuntimeError("AmiClient already started")
        self._closing = False
        self._first = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(), name=f"ami-{self.host}:{self.port}")
        if not wait:
            return
        try:
            async with asyncio.timeout(timeout if timeout is not None else self.connect_timeout * 2):
                await asyncio.shield(self._first)
        except TimeoutError:
            await self.close()
            raise PbxError(f"could not log in to AMI at {self.host}:{self.port} in time") from None
        except PbxError:
            await self.close()
            raise

    async def close(self) -> None:
        """Log off (briefly), stop reconnecting, fail whatever is still pending."""
        if self._closing and self._runner is None:
            return
        self._closing = True  # first, so the Goodbye and EOF do not look like a lost connection
        if self._logged_in.is_set():
            try:
                await self.action("Logoff", timeout=1.0)
            except PbxError:
                pass
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self._end_session(PbxError("AMI client closed"))
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None

    @property
    def started(self) -> bool:
        """The session task runs (connected or reconnecting)."""
        return self._runner is not None

    @property
    def connected(self) -> bool:
        """Logged in right now."""
        return self._logged_in.is_set()

    async def wait_connected(self, timeout: float) -> None:
        """Wait until logged in (after a start or a reconnect); PbxError after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._logged_in.wait()
        except TimeoutError:
            raise PbxError(f"not connected to AMI at {self.host}:{self.port} after {timeout:g} s") from None

    def session_lost(self) -> asyncio.Future[None]:
        """A future that completes when the current session ends. PbxError if there is none."""
        if self._lost is None or self._lost.done() or not self._logged_in.is_set():
            raise PbxUnavailable(f"not connected to AMI at {self.host}:{self.port}")
        return self._lost

    # --- actions ---------------------------------------------------------------------------------------

    def next_action_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    async def action(self, name: str, fields: Iterable[Field] | Mapping[str, str] = (), /, *,
                     timeout: float | None = None, **headers: object) -> Message:
        """Send an action and return its response (``Response: Error`` is returned, not raised).

        ``fields`` may repeat keys (``[("Variable", "A=1"), ("Variable", "B=2")]``); keyword
        headers follow them. An ``ActionID`` header is used as given, else one is generated.
        Raises PbxUnavailable when not logged in (nothing was sent), PbxError on timeout or
        when the connection drops before the response.
        """
        if not self._logged_in.is_set():
            raise PbxUnavailable(f"not connected to AMI at {self.host}:{self.port}")
        reply = await self._send_and_wait(name, fields, headers, timeout)
        return reply.response

    async def list_action(self, name: str, fields: Iterable[Field] | Mapping[str, str] = (), /, *,
                          timeout: float | None = None, **headers: object) -> ListReply:
        """A list action: the response plus every item event up to ``<Name>Complete``."""
        if not self._logged_in.is_set():
            raise PbxUnavailable(f"not connected to AMI at {self.host}:{self.port}")
        return await self._send_and_wait(name, fields, headers, timeout)

    async def _send_and_wait(self, name: str, fields: Iterable[Field] | Mapping[str, str],
                             headers: Mapping[str, object], timeout: float | None) -> ListReply:
        data, action_id, future, pending = self._register(name, fields, headers, timeout)
        try:
            await self._write(data)
            return await future
        finally:
            if self._pending.pop(action_id, None) is not None and pending.response is not None:
                self._collecting -= 1

    def _register(self, name: str, fields: Iterable[Field] | Mapping[str, str], headers: Mapping[str, object],
                  timeout: float | None) -> tuple[bytes, str, asyncio.Future[ListReply], _Pending]:
        """An action's bytes, with its ActionID registered for the response."""
        msg = ami.action(name, fields, **headers)
        pairs = msg._fields
        action_id = next((v for k, v in pairs if k.lower() == "actionid"), None)
        if action_id is None:
            action_id = f"{self._prefix}{next(self._ids)}"
            pairs.insert(1, ("ActionID", action_id))
        if action_id in self._pending:
            raise ValueError(f"ActionID {action_id!r} is already in use")
        data = msg.encode()  # ValueError on CR/LF injection, before anything is sent
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ListReply] = loop.create_future()
        if timeout is None:
            timeout = self.action_timeout
        deadline = loop.time() + timeout
        self._pending[action_id] = pending = _Pending(future, name, timeout, deadline)
        self._arm_reaper(loop, deadline)
        return data, action_id, future, pending

    # Timeouts: one timer for all pending actions (armed for the earliest deadline) instead of a
    # timer per action; with thousands of actions in flight that is most of the per-action cost.

    def _arm_reaper(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        reaper = self._reaper
        if reaper is not None and reaper.when() <= deadline + _REAPER_SLACK:
            return
        if reaper is not None:
            reaper.cancel()
        self._reaper = loop.call_at(deadline + _REAPER_SLACK, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = None
        for pending in list(self._pending.values()):
            if pending.future.done():
                continue
            if pending.deadline <= now:
                pending.future.set_exception(
                    PbxError(f"AMI {pending.name}: no response within {pending.timeout:g} s"))
            elif earliest is None or pending.deadline < earliest:
                earliest = pending.deadline
        if earliest is not None:
            self._arm_reaper(loop, earliest)

    async def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise PbxUnavailable(f"not connected to AMI at {self.host}:{self.port}")
        writer.write(data)
        transport = writer.transport
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            async with self._drain_lock:
                try:
                    await writer.drain()
                except ConnectionError as exc:
                    raise PbxError(f"AMI connection lost: {exc}") from exc

    # --- events ----------------------------------------------------------------------------------------

    def add_listener(self, callback: EventCallback, *names: str) -> Callable[[], None]:
        """Call ``callback(event)`` for each event named in ``names`` (any case; none = all).

        Runs inside the reader, so it must be quick and must not block. Returns a function that
        removes the listener.
        """
        keys: list[str | None] = [n.lower() for n in names] or [None]
        for key in keys:
            self._listeners.setdefault(key, []).append(callback)
        for name in names:
            self._spelled.setdefault(name.lower(), name)
        if self._filtered is not None:
            self._widen_filter(names)

        def remove() -> None:
            for key in keys:
                callbacks = self._listeners.get(key)
                if callbacks and callback in callbacks:
                    callbacks.remove(callback)
                    if not callbacks:
                        del self._listeners[key]

        return remove

    def want_events(self, *names: str) -> None:
        """Keep ``names`` in the PBX's event filter (``filter_events``) before anyone listens to
        them, so that a listener added later misses none of them."""
        for name in names:
            self._spelled.setdefault(name.lower(), name)
        self._kept.update(name.lower() for name in names)
        if self._filtered is not None:
            self._widen_filter(names)

    def subscribe(self, *names: str, maxsize: int = 1000) -> EventSubscription:
        """A bounded queue of the named events (none = all); drop-oldest when full."""
        return EventSubscription(self, names, maxsize)

    # --- the session -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.reconnect_min
        while not self._closing:
            logged_in = False
            try:
                logged_in = await self._session()
                error: PbxError = PbxError("AMI connection closed by the PBX")
            except asyncio.CancelledError:
                raise
            except AmiLoginError as exc:
                error = exc
                log.error("AMI login to %s:%s as %r refused", self.host, self.port, self.username)
            except PbxError as exc:
                error = exc
                log.warning("AMI session with %s:%s failed: %s", self.host, self.port, exc)
            except (OSError, EOFError) as exc:
                error = PbxError(f"AMI connection to {self.host}:{self.port} failed: {exc}")
                log.warning("%s", error)
            except Exception as exc:  # a bug must not end reconnecting for good
                error = PbxError(f"AMI session with {self.host}:{self.port} broke: {exc!r}")
                log.exception("AMI session with %s:%s broke", self.host, self.port)
            self._end_session(error)
            if self._first is not None and not self._first.done():
                self._first.set_exception(error)
                self._first.exception()  # retrieved here so an unawaited start() does not warn
            if logged_in:
                delay = self.reconnect_min
            if self._closing:
                break
            pause = delay * (0.5 + random.random() / 2)  # jitter: clients do not return in lockstep
            log.info("AMI: reconnecting to %s:%s in %.2f s", self.host, self.port, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, self.reconnect_max)

    async def _session(self) -> bool:
        """Connect, log in, then read until the connection ends. True if the login succeeded."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise PbxError(f"AMI connect to {self.host}:{self.port} timed out") from None
        self._writer = writer
        self._lost = asyncio.get_running_loop().create_future()
        parser = Parser(expect_banner=True)
        reading = asyncio.create_task(self._read(reader, parser))
        keepalive: asyncio.Task[None] | None = None
        try:
            login = asyncio.create_task(self._login())
            await asyncio.wait((login, reading), return_when=asyncio.FIRST_COMPLETED)
            if not login.done():  # the connection ended during the login
                login.cancel()
                await asyncio.gather(login, return_exceptions=True)
                raise PbxError("AMI connection closed during login")
            login.result()
            self.banner = parser.banner
            self.sessions += 1
            self._logged_in.set()
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
            log.info("AMI: logged in to %s:%s as %r (%s)", self.host, self.port, self.username,
                     parser.banner or "no banner")
            if self.keepalive_interval:
                keepalive = asyncio.create_task(self._keepalive(writer))
            await reading
            return True
        finally:
            for task in (reading, keepalive):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (reading, keepalive) if t is not None), return_exceptions=True)
            writer.close()

    async def _login(self) -> None:
        events = "on" if self.events else "off"
        if self.auth == "md5":
            challenge = await self._send_and_wait("Challenge", (), {"AuthType": "MD5"}, self.connect_timeout)
            token = challenge.response.get("Challenge")
            if not challenge.response.ok or not token:
                raise AmiLoginError(f"AMI Challenge refused: {challenge.response.message}")
            key = hashlib.md5((token + self._secret).encode()).hexdigest()
            headers = {"AuthType": "MD5", "Username": self.username, "Key": key, "Events": events}
        else:
            headers = {"Username": self.username, "Secret": self._secret, "Events": events}
        # Asterisk answers a wrong secret only after ~1 s, so allow for that on top of the timeout.
        reply = await self._send_and_wait("Login", (), headers, self.connect_timeout + 2.0)
        if not reply.response.ok:
            raise AmiLoginError(f"AMI login refused: {reply.response.message}")
        if self.filter_events and self.events:
            await self._install_filter()

    # --- event filter at the PBX ---------------------------------------------------------------------
    # A PBX sends every event of every call to every session: dozens per call, most of which no
    # listener reads (Newstate, DialState, Bridge*, ...). With ``filter_events`` the session asks
    # the PBX (AMI Filter action, Asterisk 22's MatchCriteria name()) for the events listened to
    # only, so neither side spends time on the rest. A listener for a new name widens the filter
    # at once, in a write that precedes any later action on this session: Asterisk runs a
    # session's actions in order, so the listener gets every such event that follows the
    # response to its caller's next action. Nobody listening to all events: no filter at all.

    def _listened(self) -> list[str] | None:
        """The names the listeners want, as spelled; None when one of them wants every event."""
        if None in self._listeners:
            return None
        return sorted(self._spelled[key] for key in {*self._listeners, *self._kept} if key is not None)

    async def _install_filter(self) -> None:
        names = self._listened()
        if names is None:
            return
        self._filtered = set(names)  # now: a listener added while these are on their way widens it
        replies = await asyncio.gather(*(self._send_and_wait("Filter", (), self._filter_headers(name),
                                                             self.connect_timeout) for name in names))
        refused = [r.response for r in replies if not r.response.ok]
        if len(refused) == len(replies):  # no filter in place (an AMI user without 'system' write)
            self._filtered = None
            self._filter_refused(refused[0])
        elif refused:  # part of a filter would hide events from a listener: start again without
            self._filter_refused(refused[0])
            raise PbxError("AMI event filter partly refused; reconnecting without one")

    @staticmethod
    def _filter_headers(name: str | None) -> dict[str, str]:
        if name is None:  # everything: a legacy regular expression that every event matches
            return {"Operation": "Add", "Filter": "."}
        return {"Operation": "Add", "MatchCriteria": f"name({name})"}

    def _filter_refused(self, reply: Message) -> None:
        """From now on no filter: the reader drops what nobody reads, at some cost."""
        self.filter_events = False
        log.warning("AMI: %s:%s refused the event filter (%s); reading all events instead (the AMI "
                    "user needs the 'system' write class for Filter)", self.host, self.port, reply.message)

    def _widen_filter(self, names: tuple[str, ...]) -> None:
        """Let the events of a new listener through, written now (see above)."""
        assert self._filtered is not None
        wanted: list[str | None] = [n for n in dict.fromkeys(self._spelled[n.lower()] for n in names)
                                    if n not in self._filtered] if names else [None]
        writer = self._writer
        if not wanted or writer is None or writer.is_closing():
            return
        for name in wanted:
            data, action_id, future, _ = self._register("Filter", (), self._filter_headers(name), self.connect_timeout)
            future.add_done_callback(functools.partial(self._filter_widened, action_id))
            writer.write(data)
        if None in wanted:
            self._filtered = None
        else:
            self._filtered.update(n for n in wanted if n is not None)

    def _filter_widened(self, action_id: str, future: asyncio.Future[ListReply]) -> None:
        self._pending.pop(action_id, None)
        if future.cancelled() or future.exception() is not None:
            return  # the session ended: the next one installs the whole filter
        if not future.result().response.ok:  # a listener would miss its events: start over unfiltered
            self._filter_refused(future.result().response)
            writer = self._writer
            if writer is not None:
                writer.close()

    async def _read(self, reader: asyncio.StreamReader, parser: Parser) -> None:
        dispatch, wanted = self._dispatch, self._wanted
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for msg in parser.feed(data, wanted):
                    dispatch(msg)
        except (ConnectionError, OSError) as exc:
            log.warning("AMI read from %s:%s failed: %s", self.host, self.port, exc)

    async def _keepalive(self, writer: asyncio.StreamWriter) -> None:
        assert self.keepalive_interval
        while True:
            await asyncio.sleep(self.keepalive_interval)
            try:
                await self._send_and_wait("Ping", (), {}, self.action_timeout)
            except PbxError:
                log.warning("AMI: %s:%s did not answer a keep-alive Ping; reconnecting", self.host, self.port)
                writer.close()
                return

    def _end_session(self, error: PbxError) -> None:
        """The connection is gone: fail every waiter now rather than let it time out."""
        self._logged_in.clear()
        self._filtered = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        lost, self._lost = self._lost, None
        if lost is not None and not lost.done():
            lost.set_result(None)
        pending, self._pending = self._pending, {}
        self._collecting = 0
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(error)
                item.future.exception()  # mark retrieved: the waiter may have timed out already

    # --- dispatch (hot path) -----------------------------------------------------------------------------

    def _wanted(self, event: str) -> bool:
        """Whether a listener reads this event (or every event); the rest is dropped unparsed.
        List-reply items carry an ActionID and are never dropped (``Parser.feed``)."""
        listeners = self._listeners
        return None in listeners or event.lower() in listeners

    def _dispatch(self, msg: Message) -> None:
        event = msg.event
        if event is None:
            self._on_response(msg)
            return
        if self._collecting:
            action_id = msg.get("ActionID")
            if action_id is not None:
                pending = self._pending.get(action_id)
                if pending is not None and pending.response is not None:
                    self._on_list_event(pending, event, msg)
                    return
        listeners = self._listeners
        callbacks = listeners.get(event.lower())
        if callbacks:
            self._call(callbacks, msg)
        callbacks = listeners.get(None)
        if callbacks:
            self._call(callbacks, msg)

    @staticmethod
    def _call(callbacks: list[EventCallback], msg: Message) -> None:
        for callback in tuple(callbacks):
            try:
                callback(msg)
            except Exception:  # one faulty listener must not break the session
                log.exception("AMI event listener %r failed on %s", callback, msg.event)

    def _on_response(self, msg: Message) -> None:
        action_id = msg.action_id
        pending = self._pending.get(action_id) if action_id is not None else None
        if pending is None or pending.future.done():
            log.debug("AMI response without a waiter (ActionID %r)", action_id)
            return
        if (msg.get("EventList") or "").lower() == "start":
            pending.response = msg
            self._collecting += 1
            return
        pending.future.set_result(ListReply(msg, [], None))

    def _on_list_event(self, pending: _Pending, event: str, msg: Message) -> None:
        if (msg.get("EventList") or "").lower() == "complete" or event.endswith("Complete"):
            if not pending.future.done():
                assert pending.response is not None
                pending.future.set_result(ListReply(pending.response, pending.events, msg))
        else:
            pending.events.append(msg)


# --- the PBX port ----------------------------------------------------------------------------------------

_NUMBER = re.compile(r"\+?[0-9]{1,20}")
_CALL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PROMPT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}")  # a sound name or path: no , | ( ) or spaces
ASK_VARIABLE = "MAILGW_ANSWER"
PROMPT_ALLOWANCE = 120.0  # seconds a prompt may play, in the bound of one ask

REASON_OUTCOME = {5: CallOutcome.BUSY, 3: CallOutcome.NO_ANSWER, 8: CallOutcome.CONGESTION}
DIAL_STATUS_OUTCOME = {
    "BUSY": CallOutcome.BUSY,
    "NOANSWER": CallOutcome.NO_ANSWER,
    "CANCEL": CallOutcome.NO_ANSWER,  # the first party gave up before the second answered
    "CONGESTION": CallOutcome.CONGESTION,
    "CHANUNAVAIL": CallOutcome.UNREACHABLE,
    "DONTCALL": CallOutcome.REJECTED,
    "TORTURE": CallOutcome.REJECTED,
}
CAUSE_OUTCOME = {
    17: CallOutcome.BUSY,
    18: CallOutcome.NO_ANSWER,
    19: CallOutcome.NO_ANSWER,
    20: CallOutcome.UNREACHABLE,
    27: CallOutcome.UNREACHABLE,
    38: CallOutcome.UNREACHABLE,
    1: CallOutcome.INVALID,
    3: CallOutcome.INVALID,
    28: CallOutcome.INVALID,
    21: CallOutcome.REJECTED,
    34: CallOutcome.CONGESTION,
    42: CallOutcome.CONGESTION,
}


def check_number(number: str) -> str:
    """Only ``+`` and digits may reach a dial string (defence against dial-string injection)."""
    if not isinstance(number, str) or not _NUMBER.fullmatch(number):
        raise ValueError(f"not a dialable number: {number!r}")
    return number


def check_call_id(call_id: str) -> str:
    if not isinstance(call_id, str) or not _CALL_ID.fullmatch(call_id):
        raise ValueError(f"call id must be 1-64 of [A-Za-z0-9._-]: {call_id!r}")
    return call_id


def refine(base: CallOutcome, cause: int | None) -> CallOutcome:
    """A Q.850 hang-up cause says more than Asterisk's summary, when it says anything."""
    return CAUSE_OUTCOME.get(cause, base) if cause else base


@dataclass
class ConnectState:
    """What has been seen of one two-point connection so far (filled by ``apply``)."""

    call_id: str
    started_at: datetime
    from_answered_at: datetime | None = None
    to_answered_at: datetime | None = None
    originate_ok: bool | None = None  # OriginateResponse Success / Failure
    originate_reason: int | None = None
    from_cause: int | None = None  # Hangup cause of the first party's ;2 leg, once it hung up
    from_gone: bool = False  # the first party's ;1 channel hung up
    to_channel: str | None = None  # the dialled ;1 channel of the second party
    to_dial_status: str | None = None
    to_cause: int | None = None  # Hangup cause of the second party's ;2 leg, once it hung up

    @property
    def to_twin(self) -> str | None:
        """The ``;2`` half of the second party's Local channel: its hang-up carries the cause."""
        if self.to_channel and self.to_channel.endswith(";1"):
            return self.to_channel[:-1] + "2"
        return None


def apply(state: ConnectState, msg: Message, now: datetime) -> None:
    """Update ``state`` with one event that was routed to this call."""
    event = msg.event
    call_id = state.call_id
    if event == "OriginateResponse":
        if (msg.get("Response") or "").lower() == "success":
            state.originate_ok = True
            state.from_answered_at = state.from_answered_at or now
        else:
            state.originate_ok = False
            reason = msg.get("Reason") or ""
            state.originate_reason = int(reason) if reason.isdigit() else 0
    elif event == "DialBegin":
        if msg.get("Uniqueid") == call_id:
            state.to_channel = msg.get("DestChannel")
    elif event == "DialEnd":
        status = (msg.get("DialStatus") or "").upper()
        if msg.get("Uniqueid") == call_id:  # our ;1 dialled the second party
            state.to_channel = state.to_channel or msg.get("DestChannel")
            state.to_dial_status = status
            if status == "ANSWER":
                state.to_answered_at = now
                state.from_answered_at = state.from_answered_at or now
        elif msg.get("DestUniqueid") == call_id and status == "ANSWER":
            state.from_answered_at = state.from_answered_at or now  # earliest sign of the answer
    elif event == "Hangup":
        cause_text = msg.get("Cause") or ""
        cause = int(cause_text) if cause_text.isdigit() else 0
        uniqueid = msg.get("Uniqueid")
        if uniqueid == f"{call_id}-2":
            state.from_cause = cause
        elif uniqueid == call_id:
            state.from_gone = True
        elif msg.get("Channel") == state.to_twin:
            state.to_cause = cause


def decide(state: ConnectState, *, grace_over: bool) -> tuple[CallOutcome, Party | None, int | None] | None:
    """The connection's outcome once it is known, else None (keep waiting).

    A failure is final only with the failed leg's hang-up cause, or once ``grace_over``.
    """
    if state.to_dial_status == "ANSWER":
        return CallOutcome.ANSWERED, None, None
    if state.originate_ok is False:
        if state.from_cause is None and not grace_over:
            return None
        base = REASON_OUTCOME.get(state.originate_reason or 0, CallOutcome.FAILED)
        return refine(base, state.from_cause), Party.FROM, state.from_cause or None
    if state.to_dial_status is not None:
        if state.to_cause is None and not grace_over:
            return None
        base = DIAL_STATUS_OUTCOME.get(state.to_dial_status, CallOutcome.FAILED)
        return refine(base, state.to_cause), Party.TO, state.to_cause or None
    if state.from_gone and state.originate_ok and state.to_channel is None:
        # The first party answered and hung up before the second was even dialled.
        return (CallOutcome.FAILED, Party.FROM, None) if grace_over else None
    return None


@dataclass
class DeliveryState:
    """What has been seen of one ``play`` / ``send_fax`` call so far (filled by ``apply_delivery``).

    The application runs on the originated ``;1`` (Uniqueid ``<call_id>``, capture 04); the
    ``;2`` (``<call_id>-2``) rings the phone, and its hang-up cause says why a call failed.
    """

    call_id: str
    started_at: datetime
    fax: bool = False
    answered_at: datetime | None = None
    originate_ok: bool | None = None
    originate_reason: int | None = None
    failed_cause: int | None = None  # Hangup cause of the ;2 leg
    end_cause: int | None = None  # Hangup cause of our ;1, once the application ended
    gone: bool = False
    pages: int | None = None  # SendFAX event: PagesTransferred
    to_twin = None  # no second party (what _route looks for)


def apply_delivery(state: DeliveryState, msg: Message, now: datetime) -> None:
    event = msg.event
    if event == "OriginateResponse":
        if (msg.get("Response") or "").lower() == "success":
            state.originate_ok = True
            state.answered_at = state.answered_at or now
        else:
            state.originate_ok = False
            reason = msg.get("Reason") or ""
            state.originate_reason = int(reason) if reason.isdigit() else 0
    elif event == "Hangup":
        cause_text = msg.get("Cause") or ""
        cause = int(cause_text) if cause_text.isdigit() else 0
        if msg.get("Uniqueid") == state.call_id:
            state.gone, state.end_cause = True, cause
        else:
            state.failed_cause = cause
    elif event == "SendFAX":
        pages = msg.get("PagesTransferred") or ""
        state.pages = int(pages) if pages.isdigit() else 0


def decide_delivery(state: DeliveryState, *, grace_over: bool) -> tuple[CallOutcome, Party | None, int | None] | None:
    """The delivery's outcome once known, else None. Same shape as ``decide`` (party is None)."""
    if state.originate_ok is False:
        if state.failed_cause is None and not grace_over:
            return None
        base = REASON_OUTCOME.get(state.originate_reason or 0, CallOutcome.FAILED)
        return refine(base, state.failed_cause), None, state.failed_cause or None
    if state.originate_ok and state.gone:
        if state.fax and not state.pages:
            if state.pages is None and not grace_over:
                return None  # the SendFAX event may still be on its way
            return CallOutcome.FAILED, None, state.end_cause or None  # answered, but no page went through
        return CallOutcome.ANSWERED, None, state.end_cause or None
    return None


_MEDIA_PATH = re.compile(r"/[A-Za-z0-9/._-]{1,400}")
FAX_SECONDS_PER_PAGE = 60.0  # a T.4 page at 9600 bit/s takes well under a minute
UNKNOWN_MEDIA_SECONDS = 600.0


def check_media_path(path: Path) -> str:
    """Only absolute paths of plain characters reach an application's Data (no ``,`` ``|`` ``..``)."""
    text = str(path)
    if not _MEDIA_PATH.fullmatch(text) or ".." in Path(text).parts:
        raise ValueError(f"media path must be absolute, of [A-Za-z0-9/._-]: {text!r}")
    return text


def check_prompt(prompt: str) -> str:
    """A prompt goes into Read()'s argument list: only a plain sound name or absolute path."""
    if not isinstance(prompt, str) or not _PROMPT.fullmatch(prompt.lstrip("/")) or ".." in prompt:
        raise ValueError(f"not a sound name or path the PBX can play: {prompt!r}")
    return prompt


@dataclass
class AskState:
    """What has been seen of one question by phone (filled by ``apply_ask``)."""

    call_id: str
    started_at: datetime
    answered_at: datetime | None = None
    originate_ok: bool | None = None
    originate_reason: int | None = None
    cause: int | None = None  # Hangup cause of the ;2 leg
    gone: bool = False  # the ;1 channel hung up
    digits: str | None = None  # the Read() variable's value
    read_status: str | None = None
    to_twin = None  # no second party (what _route looks for)


def apply_ask(state: AskState, msg: Message, now: datetime) -> None:
    event, uniqueid = msg.event, msg.get("Uniqueid")
    if event == "OriginateResponse":
        state.originate_ok = (msg.get("Response") or "").lower() == "success"
        if state.originate_ok:
            state.answered_at = state.answered_at or now
        else:
            reason = msg.get("Reason") or ""
            state.originate_reason = int(reason) if reason.isdigit() else 0
    elif event == "VarSet" and uniqueid == state.call_id:
        if msg.get("Variable") == ASK_VARIABLE:
            state.digits = msg.get("Value") or ""
        elif msg.get("Variable") == "READSTATUS":
            state.read_status = (msg.get("Value") or "").upper()
    elif event == "Hangup":
        cause_text = msg.get("Cause") or ""
        if uniqueid == f"{state.call_id}-2":
            state.cause = int(cause_text) if cause_text.isdigit() else 0
        elif uniqueid == state.call_id:
            state.gone = True


def decide_ask(state: AskState, *, grace_over: bool) -> tuple[CallOutcome, str | None, int | None] | None:
    """(outcome, key pressed or None, cause) once known, else None (keep waiting)."""
    if state.read_status is not None:
        key = (state.digits or "")[:1] or None
        return CallOutcome.ANSWERED, key if state.read_status == "OK" else None, None
    if state.originate_ok is False:
        if state.cause is None and not grace_over:
            return None
        base = REASON_OUTCOME.get(state.originate_reason or 0, CallOutcome.FAILED)
        return refine(base, state.cause), None, state.cause or None
    if state.originate_ok and state.gone:
        return CallOutcome.ANSWERED, None, None  # answered, hung up before Read() finished
    return None


class _Tracker:
    """Routes events into a call's state and wakes the waiting ``connect`` / ``play`` / ``send_fax``."""

    __slots__ = ("state", "_apply", "_waiter")

    def __init__(self, state: Any, apply_event: Callable[[Any, Message, datetime], None] = apply) -> None:
        self.state = state
        self._apply = apply_event
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, msg: Message) -> None:
        self._apply(self.state, msg, datetime.now(timezone.utc))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter


class AmiPbx:
    """``PbxPort`` over AMI; works against a real Asterisk 22 and the built-in simulator alike.

    ``AmiPbx(config.pbx)`` then ``await pbx.start()``. ``start`` waits briefly for the first
    login: refused credentials raise ``AmiLoginError``; an unreachable PBX is logged and retried
    in the background (``connect`` raises ``PbxError`` until it is back).
    """

    ROUTED_EVENTS = ("OriginateResponse", "DialBegin", "DialEnd", "Hangup", "SendFAX")
    # Every event a part of the gateway may listen to (calls, line watching, incoming and
    # outgoing calls, phone questions): in the PBX's filter from the login on, so a listener
    # added later has its events from the first one, not only after the PBX read a new filter.
    PRODUCT_EVENTS = (*ROUTED_EVENTS, "ExtensionStatus", "DeviceStateChange", "FullyBooted", "VarSet",
                      *INCOMING_EVENTS, *OUTGOING_EVENTS)

    def __init__(self, config: PbxConfig, *, cause_grace: float = 1.0, connect_margin: float = 10.0,
                 client: AmiClient | None = None) -> None:
        self.config = config
        self.cause_grace = cause_grace
        self.connect_margin = connect_margin
        self.client = client or AmiClient(config.ami.host, config.ami.port, config.ami.username,
                                          config.ami.secret, filter_events=True)
        self._slots = asyncio.Semaphore(max(1, config.max_concurrent_calls))
        self._by_action: dict[str, _Tracker] = {}
        self._by_uniqueid: dict[str, _Tracker] = {}
        self._by_channel: dict[str, _Tracker] = {}
        self._remove_listener: Callable[[], None] | None = None
        # Line (extension/device) state watching, for camp-on: one listener for every number.
        self._line_watchers: dict[str, list[LineCallback]] = {}
        self._line_last: dict[str, LineState] = {}
        self._resync_callbacks: list[Callable[[], None]] = []
        self._remove_line_listener: Callable[[], None] | None = None
        # Incoming calls from outside: trunk Uniqueid -> what is known so far, and who is told.
        self._incoming: dict[str, IncomingCall] = {}
        self._incoming_callbacks: list[IncomingCallback] = []
        self._remove_incoming_listener: Callable[[], None] | None = None

    async def start(self) -> None:
        if self._remove_listener is None:
            self._remove_listener = self.client.add_listener(self._route, *self.ROUTED_EVENTS)
            self.client.want_events(*self.PRODUCT_EVENTS)
        if self.client.started:  # a client handed in already running
            return
        try:
            await self.client.start(wait=True)
        except AmiLoginError:
            raise
        except PbxError as exc:
            log.warning("PBX not reachable yet (%s); will keep trying in the background", exc)
            await self.client.start(wait=False)

    async def stop(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._remove_line_listener is not None:
            self._remove_line_listener()
            self._remove_line_listener = None
        if self._remove_incoming_listener is not None:
            self._remove_incoming_listener()
            self._remove_incoming_listener = None
        await self.client.close()

    async def find_call(self, call_id: str) -> bool:
        check_call_id(call_id)
        reply = await self.client.list_action("CoreShowChannels")
        if not reply.response.ok:
            raise PbxError(f"CoreShowChannels refused: {reply.response.message}")
        return any(ev.get("Uniqueid") == call_id or ev.get("Linkedid") == call_id for ev in reply.events)

    async def connect(self, call_id: str, from_number: str, to_number: str, *,
                      ring_timeout: float, caller_id: str) -> ConnectResult:
        check_call_id(call_id)
        check_number(from_number)
        check_number(to_number)
        if not ring_timeout > 0:
            raise ValueError("ring_timeout must be positive")
        async with self._slots:
            return await self._connect(call_id, from_number, to_number, ring_timeout, caller_id)

    async def _connect(self, call_id: str, from_number: str, to_number: str, ring_timeout: float,
                       caller_id: str) -> ConnectResult:
        cfg = self.config
        tracker = _Tracker(ConnectState(call_id, datetime.now(timezone.utc)))
        outcome, party, cause = await self._originate(tracker, [
            ("Channel", f"Local/{from_number}@{cfg.dial_context}"),
            ("Context", cfg.connect_context),
            ("Exten", to_number),
            ("Priority", "1"),
            ("Timeout", str(int(ring_timeout * 1000))),
            ("CallerID", caller_id),
            ("Variable", f"MAILGW_RING_TIMEOUT={max(1, round(ring_timeout))}"),
        ], 2 * ring_timeout + self.connect_margin, decide)
        state = tracker.state
        result = ConnectResult(
            call_id=call_id, outcome=outcome, failed_party=party, cause=cause, started_at=state.started_at,
            from_answered_at=state.from_answered_at, to_answered_at=state.to_answered_at,
            ended_at=datetime.now(timezone.utc))
        # DEBUG: the driver cannot know a request is confidential; the dispatcher logs outcomes.
        log.debug("call %s: %s -> %s: %s%s", call_id, from_number, to_number, outcome.value,
                 f" ({party.value} party, cause {cause})" if party else "")
        return result

    async def ask(self, call_id: str, number: str, prompt: str, *, timeout: float, ring_timeout: float,
                  caller_id: str) -> AskResult:
        check_call_id(call_id)
        check_number(number)
        check_prompt(prompt)
        if not (timeout > 0 and ring_timeout > 0):
            raise ValueError("timeout and ring_timeout must be positive")
        async with self._slots:
            return await self._ask(call_id, number, prompt, timeout, ring_timeout, caller_id)

    async def _ask(self, call_id: str, number: str, prompt: str, timeout: float, ring_timeout: float,
                   caller_id: str) -> AskResult:
        tracker = _Tracker(AskState(call_id, datetime.now(timezone.utc)), apply_ask)

        def feed(msg: Message) -> None:
            if msg.get("Uniqueid") == call_id:
                tracker.feed(msg)

        # VarSet is not among the routed events (Asterisk sends a great many); questions are rare,
        # so each has its own listener, registered before the Originate goes out.
        remove = self.client.add_listener(feed, "VarSet")
        try:
            outcome, digit, cause = await self._originate(tracker, [
                ("Channel", f"Local/{number}@{self.config.dial_context}"),
                ("Application", "Read"),
                ("Data", f"{ASK_VARIABLE},{prompt},1,,1,{max(1, round(timeout))}"),
                ("Timeout", str(int(ring_timeout * 1000))),
                ("CallerID", caller_id),
            ], ring_timeout + timeout + PROMPT_ALLOWANCE + self.connect_margin, decide_ask)
        finally:
            remove()
        state = tracker.state
        log.debug("call %s: asked %s: %s, key %s", call_id, number, outcome.value, digit or "-")
        return AskResult(call_id=call_id, outcome=outcome, digit=digit, cause=cause, started_at=state.started_at,
                         answered_at=state.answered_at if outcome is CallOutcome.ANSWERED else None,
                         ended_at=datetime.now(timezone.utc))

    async def _originate(self, tracker: _Tracker, fields: list[Field], bound: float,
                         decide_by: Callable[..., Any]) -> tuple[CallOutcome, Any, int | None]:
        """One async Originate whose ``;1`` / ``;2`` get the Uniqueids ``<call_id>`` / ``<call_id>-2``,
        with its events routed to ``tracker`` until ``decide_by`` knows the outcome."""
        call_id = tracker.state.call_id
        if call_id in self._by_uniqueid:
            raise ValueError(f"call {call_id!r} is already in progress")
        action_id = self.client.next_action_id()
        lost = self.client.session_lost()
        # Registered before sending: the OriginateResponse may share a TCP read with the response.
        self._by_action[action_id] = tracker
        self._by_uniqueid[call_id] = self._by_uniqueid[f"{call_id}-2"] = tracker
        try:
            reply = await self.client.action("Originate", [
                ("ActionID", action_id), *fields, ("Async", "true"),
                ("ChannelId", call_id), ("OtherChannelId", f"{call_id}-2"),
            ])
            if not reply.ok:
                raise PbxError(f"Originate refused: {reply.message}")
            return await self._outcome(tracker, lost, bound, decide_by)
        finally:
            self._by_action.pop(action_id, None)
            for key in (call_id, f"{call_id}-2"):
                self._by_uniqueid.pop(key, None)
            twin = tracker.state.to_twin
            if twin is not None:
                self._by_channel.pop(twin, None)

    async def _outcome(self, tracker: _Tracker, lost: asyncio.Future[None], bound: float,
                       decide_by: Callable[..., Any] = decide) -> tuple[CallOutcome, Party | None, int | None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        grace_until: float | None = None
        while True:
            state = tracker.state
            grace_over = grace_until is not None and loop.time() >= grace_until
            verdict = decide_by(state, grace_over=grace_over)
            if verdict is not None:
                return verdict
            if grace_until is None and decide_by(state, grace_over=True) is not None:
                grace_until = loop.time() + self.cause_grace
            if lost.done():
                raise PbxError(f"AMI connection lost during call {state.call_id}; its outcome is "
                               "unknown (find_call tells whether it is still up)")
            now = loop.time()
            if now >= deadline:
                raise PbxError(f"call {state.call_id}: no outcome within {bound:g} s")
            wake = deadline if grace_until is None else min(deadline, grace_until)
            await asyncio.wait((tracker.waiter(), lost), timeout=max(0.0, wake - now),
                               return_when=asyncio.FIRST_COMPLETED)

    # --- voice messages and FAX (capture 04: Originate with Application) ----------------------------

    async def play(self, call_id: str, number: str, media: Path, *, ring_timeout: float,
                   caller_id: str) -> DeliveryResult:
        """Ring ``number``; on answer ``Playback(<media without .wav>)``; the phone is hung up after."""
        data = check_media_path(media)
        sound = data[: -len(".wav")] if data.lower().endswith(".wav") else data  # Playback takes no extension
        seconds = wav_seconds(Path(media)) or UNKNOWN_MEDIA_SECONDS
        return await self._deliver(call_id, number, "Playback", sound, seconds, fax=False,
                                   ring_timeout=ring_timeout, caller_id=caller_id)

    async def send_fax(self, call_id: str, number: str, tiff: Path, *, ring_timeout: float,
                       caller_id: str) -> DeliveryResult:
        """Ring the fax machine ``number``; on answer ``SendFAX(<tiff>)``; pages from the SendFAX event."""
        data = check_media_path(tiff)
        pages = tiff_pages(Path(tiff))
        seconds = FAX_SECONDS_PER_PAGE * pages if pages else UNKNOWN_MEDIA_SECONDS
        return await self._deliver(call_id, number, "SendFAX", data, seconds, fax=True,
                                   ring_timeout=ring_timeout, caller_id=caller_id)

    async def _deliver(self, call_id: str, number: str, application: str, data: str, seconds: float, *,
                       fax: bool, ring_timeout: float, caller_id: str) -> DeliveryResult:
        check_call_id(call_id)
        check_number(number)
        if not ring_timeout > 0:
            raise ValueError("ring_timeout must be positive")
        async with self._slots:
            tracker = _Tracker(DeliveryState(call_id, datetime.now(timezone.utc), fax=fax), apply_delivery)
            outcome, _, cause = await self._originate(tracker, [
                ("Channel", f"Local/{number}@{self.config.dial_context}"),
                ("Application", application),
                ("Data", data),
                ("Timeout", str(int(ring_timeout * 1000))),
                ("CallerID", caller_id),
            ], ring_timeout + seconds + self.connect_margin, decide_delivery)
        state = tracker.state
        log.debug("%s %s to %s: %s", application, call_id, number, outcome.value)
        return DeliveryResult(call_id=call_id, outcome=outcome, cause=cause, started_at=state.started_at,
                              answered_at=state.answered_at, ended_at=datetime.now(timezone.utc),
                              pages=(state.pages or 0) if fax else None)

    def _route(self, msg: Message) -> None:
        """Hand an event to the call it belongs to, if any (dictionary lookups only)."""
        event = msg.event
        tracker: _Tracker | None = None
        if event == "OriginateResponse":
            action_id = msg.get("ActionID")
            tracker = self._by_action.get(action_id) if action_id else None
        elif event in ("Hangup", "SendFAX"):
            tracker = self._by_uniqueid.get(msg.get("Uniqueid") or "") or \
                self._by_channel.get(msg.get("Channel") or "")
        else:  # DialBegin / DialEnd: the dialling channel, else the dialled one
            tracker = self._by_uniqueid.get(msg.get("Uniqueid") or "") or \
                self._by_uniqueid.get(msg.get("DestUniqueid") or "")
        if tracker is not None:
            tracker.feed(msg)
            twin = tracker.state.to_twin
            if twin is not None and twin not in self._by_channel:
                self._by_channel[twin] = tracker

    # --- line state (camp-on watch mode, status monitor) ------------------------------------------------
    #
    # ExtensionStatus (Exten in the dial context) and DeviceStateChange (Device PJSIP/<n>, or any
    # <tech>/<n> or Custom:<n>) both report a change and come in either order (capture 05); the
    # first one is passed on and the second, saying the same, is dropped (``_line_last``).

    LINE_EVENTS = ("ExtensionStatus", "DeviceStateChange", "FullyBooted")

    async def line_state(self, number: str) -> LineState:
        """The phone's state now (AMI ExtensionState in the dial context)."""
        check_number(number)
        reply = await self.client.action("ExtensionState", Exten=number, Context=self.config.dial_context)
        if not reply.ok:
            raise PbxError(f"ExtensionState {number} refused: {reply.message}")
        try:
            state = line_state_of_status(int(reply.get("Status") or "-1"))
        except ValueError:
            state = LineState.UNKNOWN
        if number in self._line_watchers:
            self._line_last[number] = state
        return state

    def watch_line(self, number: str, callback: LineCallback) -> Callable[[], None]:
        """``callback(number, state)`` on each change of ``number``'s state; returns the remover."""
        check_number(number)
        self._ensure_line_listener()
        callbacks = self._line_watchers.setdefault(number, [])
        callbacks.append(callback)

        def remove() -> None:
            current = self._line_watchers.get(number)
            if current and callback in current:
                current.remove(callback)
                if not current:
                    del self._line_watchers[number]
                    self._line_last.pop(number, None)

        return remove

    def on_resync(self, callback: Callable[[], None]) -> Callable[[], None]:
        """``callback()`` once logged in again after a reconnect (events may have been missed)."""
        self._ensure_line_listener()
        self._resync_callbacks.append(callback)

        def remove() -> None:
            if callback in self._resync_callbacks:
                self._resync_callbacks.remove(callback)

        return remove

    def _ensure_line_listener(self) -> None:
        if self._remove_line_listener is None:
            self._remove_line_listener = self.client.add_listener(self._on_line_event, *self.LINE_EVENTS)

    def _on_line_event(self, msg: Message) -> None:
        event = msg.event
        if event == "FullyBooted":  # a new session: what we knew may be stale
            self._line_last.clear()
            if self._resync_callbacks:
                asyncio.get_running_loop().create_task(self._resync())
            return
        if event == "ExtensionStatus":
            context = msg.get("Context")
            if context is not None and context != self.config.dial_context:
                return
            number = msg.get("Exten") or ""
            try:
                state = line_state_of_status(int(msg.get("Status") or "-1"))
            except ValueError:
                return
        else:  # DeviceStateChange: PJSIP/2003, SIP/2003, Custom:2003; Local/... devices never match
            device = msg.get("Device") or ""
            number = device.rpartition("/")[2] if "/" in device else device.rpartition(":")[2]
            state = line_state_of_device(msg.get("State") or "")
        callbacks = self._line_watchers.get(number)
        if not callbacks or self._line_last.get(number) is state:
            return
        self._line_last[number] = state
        for callback in tuple(callbacks):
            try:
                callback(number, state)
            except Exception:  # one faulty watcher must not break the others
                log.exception("line watcher %r failed on %s %s", callback, number, state)

    async def _resync(self) -> None:
        try:
            await self.client.wait_connected(self.client.connect_timeout * 2)
        except PbxError:
            return  # the session went again; the next FullyBooted tries again
        for callback in tuple(self._resync_callbacks):
            try:
                callback()
            except Exception:
                log.exception("resync callback %r failed", callback)

    # --- incoming calls from outside (call history, absence mail: mailgw/callhistory.py) ------------

    def watch_incoming(self, callback: IncomingCallback) -> Callable[[], None]:
        """``callback(snapshot)`` on every change of an incoming call (``pbx.incoming_context``):
        started, caller ID, each extension rung, answered, ended. Returns the remover."""
        if self._remove_incoming_listener is None:
            self._remove_incoming_listener = self.client.add_listener(self._on_incoming_event, *INCOMING_EVENTS)
        self._incoming_callbacks.append(callback)

        def remove() -> None:
            if callback in self._incoming_callbacks:
                self._incoming_callbacks.remove(callback)

        return remove

    def _on_incoming_event(self, msg: Message) -> None:
        snapshot = track(self._incoming, msg, self.config.incoming_context, datetime.now(timezone.utc))
        if snapshot is not None:
            self._tell_incoming(snapshot)

    def _tell_incoming(self, snapshot: IncomingCall) -> None:
        for callback in tuple(self._incoming_callbacks):
            try:
                callback(snapshot)
            except Exception:  # one faulty listener must not break the others
                log.exception("incoming-call listener %r failed on %s", callback, snapshot.call_id)

    def watch_outgoing(self, callback: Callable[[AnsweredOutgoing], None]) -> Callable[[], None]:
        """``callback(call)`` for every outgoing call from an extension that was answered
        (``pbx/outgoing.py``: a missed call followed up). Returns the remover."""
        dials: dict[str, tuple[str, tuple[str, ...]]] = {}

        def feed(msg: Message) -> None:
            answered = track_outgoing(dials, msg, self.config.incoming_context, datetime.now(timezone.utc))
            if answered is not None:
                callback(answered)

        return self.client.add_listener(feed, *OUTGOING_EVENTS)

    async def reconcile_incoming(self, known: Iterable[IncomingCall]) -> list[IncomingCall]:
        """Follow ``known`` calls (recorded before a restart or an AMI reconnect) again; those the
        PBX no longer shows ended unseen and are returned (and told to the listeners)."""
        calls = self._incoming
        for call in known:
            calls.setdefault(call.call_id, call)
        reply = await self.client.list_action("CoreShowChannels")
        if not reply.response.ok:
            raise PbxError(f"CoreShowChannels refused: {reply.response.message}")
        live = {ev.get("Uniqueid") for ev in reply.events} | {ev.get("Linkedid") for ev in reply.events}
        gone = [call for call_id, call in list(calls.items()) if call_id not in live]
        now = datetime.now(timezone.utc)
        ended = []
        for call in gone:
            calls.pop(call.call_id, None)
            ended.append(ended_unseen(call, now))
            self._tell_incoming(ended[-1])
        return ended

    async def dnd(self, extension: str) -> bool:
        """Whether the phone is set to do-not-disturb: AstDB ``DND/<ext>`` (where FreePBX keeps it)
        holds a value. Absence mode counts a phone in DND as an absent person."""
        check_number(extension)
        reply = await self.client.list_action("DBGet", Family="DND", Key=extension)
        if not reply.response.ok:  # "Database entry not found"
            return False
        return any((ev.get("Val") or "").strip() for ev in reply.events if ev.event == "DBGetResponse")

