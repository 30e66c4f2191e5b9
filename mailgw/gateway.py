"""The gateway: every stage wired together on one event loop.

``Gateway(config).start()`` opens the store, starts the built-in AMI simulator when it is enabled,
connects the AMI driver, resumes unfinished work, starts the outbox worker and finally listens for
SMTP. ``stop()`` undoes it in reverse order. ``mailgw serve`` is a thin wrapper around this, and
the tests start the same object on ephemeral ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from dataclasses import replace

from .absence_mail import AbsenceMailer
from .absence_mailcmd import AbsenceByMail
from .absence_recording import sim_recordings
from .callhistory import CallHistory
from .campon import Campons
from .config import Config
from .directory import Directory, load_directory
from .destinations import Destinations, load_destinations
from .dispatch import Dispatcher
from .ingress import IngressHandler, start_smtp
from .mailbox_agent import MailboxAgent
from .media import spool_dir
from .notify import Notifier
from .outbound import Outbox
from .pbx.driver import AmiPbx
from .pbx.sim_process import SimulatorProcess, SimulatorSettings
from .pbx.simulator import AmiSimulator
from .relay import Relay
from .resources import shipped
from .scenario_library import ScenarioLibrary
from .spool import Spool
from .store import Store

log = logging.getLogger("mailgw.gateway")


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.directory: Directory = load_directory(config.directory)
        self.store = Store(config.data_dir / "mailgw.sqlite3")
        self.spool = Spool(config.data_dir / "spool")
        self.simulator: AmiSimulator | None = None  # pbx.simulator.process false: in this loop
        self.simulator_process: SimulatorProcess | None = None  # true: a child process
        self.pbx: AmiPbx | None = None
        self.destinations: Destinations = load_destinations(config.destinations)
        self.outbox = Outbox(config, self.directory, self.store, config.data_dir / "outbox", self.destinations)
        self.mailbox_agent = MailboxAgent() if config.mailbox_agent else None  # its process starts when needed
        if self.mailbox_agent is not None:
            self.outbox.mailboxes = self.mailbox_agent
        self.dispatcher: Dispatcher | None = None
        self.campons: Campons | None = None
        self.call_history: CallHistory | None = None
        self.absence_mailer: AbsenceMailer | None = None
        self.scenarios = ScenarioLibrary(config.scenarios.dir, interval=config.scenarios.reload_interval)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def smtp_port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def ami_port(self) -> int:
        return self.config.pbx.ami.port

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await asyncio.to_thread(self.scenarios.scan)
        if self.config.pbx.simulator.enabled:
            await self._start_simulator()
        self.pbx = AmiPbx(self.config.pbx)
        await self.pbx.start()
        notifier = Notifier(self.config, self.directory)
        self.dispatcher = Dispatcher(self.config, self.store, self.pbx, notifier, self.outbox)
        self.dispatcher.mailboxes = self.outbox.mailboxes
        self.campons = Campons(self.config, self.directory, self.store, self.pbx, notifier, self.outbox)
        self.dispatcher.campons = self.campons
        self._tasks.append(asyncio.create_task(self.outbox.run(), name="outbox"))
        self._watchers = [asyncio.create_task(self.dispatcher.reading.run(), name="read-watcher"),
                          asyncio.create_task(self.dispatcher.imap_reading.run(), name="imap-read-watcher"),
                          asyncio.create_task(self.dispatcher.receipt_deadlines.run(), name="receipt-deadlines"),
                          asyncio.create_task(self.scenarios.run(), name="scenario-reload")]
        if self.config.absence.enabled:  # call history and missed-call mail (docs/absence.md)
            self.absence_mailer = AbsenceMailer(self.config, self.directory, self.store, self.outbox, notifier)
            self.call_history = CallHistory(self.config, self.directory, self.store, self.pbx,
                                            self.absence_mailer.wake)
            self._watchers.append(asyncio.create_task(self.absence_mailer.run(), name="absence-mail"))
            await self.call_history.start()
        await self.campons.start()  # before the dispatcher: camp-ons resume from their own rows
        await self.dispatcher.resume()
        handler = IngressHandler(self.config, self.directory, self.store, self.spool, self.dispatcher.submit)
        handler.campons = self.campons
        handler.scenarios = self.scenarios
        if self.config.absence.enabled:
            handler.absence = AbsenceByMail(self.config, self.directory, self.store, self.outbox, notifier)
            handler.absence.on_memo = self.absence_mailer.wake if self.absence_mailer else handler.absence.on_memo
        handler.relay = Relay(self.config, self.directory, self.destinations, self.outbox.root, self.outbox.take)
        self._server = await start_smtp(handler, self.config)
        log.info("mailgw listening for SMTP on %s:%d for %s; PBX %s at %s:%d", self.config.smtp.listen.host,
                 self.smtp_port, ", ".join(self.config.domains),
                 "simulator" if self.config.pbx.simulator.enabled else "Asterisk", self.config.pbx.ami.host,
                 self.ami_port)

    async def _start_simulator(self) -> None:
        ami = self.config.pbx.ami
        sim = self.config.pbx.simulator
        # Like Asterisk's sounds directory: the media spool, then the shipped sample prompts.
        media_dirs = [spool_dir(self.config), shipped("media")]
        if sim.process:
            self.simulator_process = SimulatorProcess(SimulatorSettings(
                host=ami.host, port=ami.port, phones=str(sim.phones), username=ami.username, secret=ami.secret,
                time_scale=sim.time_scale, dial_context=self.config.pbx.dial_context,
                connect_context=self.config.pbx.connect_context, media_dirs=tuple(map(str, media_dirs)),
                recording_dir=str(sim_recordings(self.config))))
            port = await self.simulator_process.start()
        else:
            self.simulator = AmiSimulator(
                phones=sim.phones, username=ami.username, secret=ami.secret, time_scale=sim.time_scale,
                dial_context=self.config.pbx.dial_context, connect_context=self.config.pbx.connect_context,
                media_dirs=media_dirs, recording_dir=sim_recordings(self.config))
            port = await self.simulator.start(ami.host, ami.port)
        if port != ami.port:  # port 0 in the config: tell the driver where the simulator listens
            self.config = replace(self.config, pbx=replace(self.config.pbx, ami=replace(ami, port=port)))
        log.info("built-in AMI simulator listening on %s:%d (phones from %s%s)", ami.host, port, sim.phones,
                 "; its own process" if sim.process else "")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.campons is not None:
            await self.campons.stop()
        if self.call_history is not None:
            await self.call_history.stop()
        for watcher in self._watchers:  # they poll forever: cancel them (the outbox below finishes its mail)
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self.outbox.stop()
        _, pending = await asyncio.wait(self._tasks, timeout=10) if self._tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.mailbox_agent is not None:  # after the outbox and the dispatcher: nothing delivers now
            await self.mailbox_agent.stop()
        if self.pbx is not None:
            await self.pbx.stop()
        if self.simulator is not None:
            await self.simulator.stop()
        if self.simulator_process is not None:
            await self.simulator_process.stop()
        await self.store.close()
        log.info("mailgw stopped")


async def serve(config: Config, stop: asyncio.Event) -> None:
    gateway = Gateway(config)
    await gateway.start()
    # Everything loaded so far (modules, config, directory, number plans) lives as long as the
    # process: keep it out of the collector's full passes, which otherwise pause the loop ~50 ms.
    gc.freeze()
    # A store thread's COMMIT, and each system call of a Maildir delivery, gives the GIL up and
    # must get it back; under load the event loop holds it for the whole default 5 ms interval.
    # bench/request_path.py, p50 DATA->Originate at C=10: 25-26 ms with 0.5 ms, 21-23 ms with
    # 0.2 ms, at the same CPU per mail (with 5 ms, in an earlier round, p99 at half load was 61 ms).
    sys.setswitchinterval(0.0002)
    try:
        await stop.wait()
    finally:
        await gateway.stop()

