"""More of the simulator's AMI actions, each matched to a reference capture.

``ManagerActions`` is a mixin of ``AmiSimulator`` (it uses the simulator's sessions, channels,
calls and dial plan); ``MANAGER_ACTIONS`` maps action names to its handlers.

* ``Redirect`` (06a), ``Status`` + ``StatusComplete`` (07b), ``BridgeList`` (08a).
* AstDB: ``DBPut``, ``DBGet``, ``DBGetTree``, ``DBDel``, ``DBDelTree`` (07a; the texts are
  Asterisk's, and ``DBGetResponse`` carries ActionID last). Call forwarding reads ``CF/<ext>``.
* ``Setvar`` / ``Getvar``: ``DEVICE_STATE(<device>)`` with no Channel (05), global variables
  (07c: ``VarSet`` with ``Channel: none``), channel variables with a Channel.
* ``Command``: ``devstate change <device> <STATE>``, ``core show version``, ``core show hints``,
  ``core show channels count``; anything else is the CLI's "No such command" (07c framing).
* ``ListCommands`` (minimal), ``ConfbridgeList``, ``ConfbridgeListRooms``, ``ConfbridgeKick`` (08c).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .ami import Field, Message
from .phones import EXTENSION_STATUS, DeviceState

if TYPE_CHECKING:
    from .simulator import Channel, _Session

VERSION_LINE = ("Asterisk 22.10.1 built by mailgw-simulator @ localhost on a x86_64 running Linux "
                "(AMI simulator of mailgw)")
_HINT_LINE = "{:<30}: {:<62}State:{:<16}Presence:{:<16}Watchers {:>2}"


MAX_FORWARD_HOPS = 5  # a forward chain longer than this rings where it got to


class ManagerActions:
    """Mixin: needs ``_channels``, ``_calls``, ``astdb``, ``global_vars``, ``dialplan``,
    ``conferences``, ``_broadcast``, ``_send_list``, ``set_device_state``, ``device_state``."""

    _channels: dict[str, Channel]
    astdb: dict[str, str]
    global_vars: dict[str, str]
    dialplan: Any
    conferences: dict[str, Any]
    phones: dict[str, Any]
    dial_context: str

    # --- AstDB ---------------------------------------------------------------------------------------

    def _action_db_put(self, session: _Session, msg: Message) -> None:
        family, key = msg.get("Family") or "", msg.get("Key") or ""
        if not family:
            session.respond(msg, "Error", ("Message", "No family specified"))
        elif not key:
            session.respond(msg, "Error", ("Message", "No key specified"))
        else:
            self.astdb[f"/{family}/{key}"] = msg.get("Val") or ""
            session.respond(msg, "Success", ("Message", "Updated database successfully"))

    def _action_db_get(self, session: _Session, msg: Message) -> None:
        family, key = msg.get("Family") or "", msg.get("Key") or ""
        if not family or not key:
            session.respond(msg, "Error", ("Message", "No family specified" if not family else "No key specified"))
            return
        value = self.astdb.get(f"/{family}/{key}")
        if value is None:
            session.respond(msg, "Error", ("Message", "Database entry not found"))
            return
        self._send_db_list(session, msg, "DBGetResponse", [[("Family", family), ("Key", key), ("Val", value)]],
                           "DBGetComplete")

    def _action_db_get_tree(self, session: _Session, msg: Message) -> None:
        prefix = "/" + "/".join(p for p in (msg.get("Family") or "", msg.get("Key") or "") if p)
        items = [[("Key", k), ("Val", v)] for k, v in sorted(self.astdb.items())
                 if prefix == "/" or k == prefix or k.startswith(prefix + "/")]
        self._send_db_list(session, msg, "DBGetTreeResponse", items, "DBGetTreeComplete")

    def _send_db_list(self, session: _Session, msg: Message, item_event: str, items: list[list[Field]],
                      complete_event: str) -> None:
        """07a: DB list items carry no Privilege and their ActionID is the LAST line."""
        action_id = msg.get("ActionID")
        id_field: list[Field] = [] if action_id is None else [("ActionID", action_id)]
        out = [self._response(msg, "Success", ("EventList", "start"), ("Message", "Result will follow"))]
        out += [Message._trusted([("Event", item_event), *item, *id_field]).encode() for item in items]
        out.append(Message._trusted([("Event", complete_event), *id_field, ("EventList", "Complete"),
                                     ("ListItems", str(len(items)))]).encode())
        session.write(b"".join(out))

    def _action_db_del(self, session: _Session, msg: Message) -> None:
        family, key = msg.get("Family") or "", msg.get("Key") or ""
        if not family or not key:
            session.respond(msg, "Error", ("Message", "No family specified" if not family else "No key specified"))
        elif self.astdb.pop(f"/{family}/{key}", None) is None:
            session.respond(msg, "Error", ("Message", "Database entry could not be deleted"))
        else:
            session.respond(msg, "Success", ("Message", "Key deleted successfully"))

    def _action_db_del_tree(self, session: _Session, msg: Message) -> None:
        family = msg.get("Family") or ""
        if not family:
            session.respond(msg, "Error", ("Message", "No family specified"))
            return
        prefix = "/" + "/".join(p for p in (family, msg.get("Key") or "") if p)
        doomed = [k for k in self.astdb if k == prefix or k.startswith(prefix + "/")]
        for key in doomed:
            del self.astdb[key]
        if doomed:
            session.respond(msg, "Success", ("Message", "Key tree deleted successfully"))
        else:
            session.respond(msg, "Error", ("Message", "Database entry not found"))

    def call_forward(self, number: str) -> str | None:
        """Where calls to ``number`` go: AstDB ``CF/<number>``, as the pairing dial plan reads it."""
        return self.astdb.get(f"/CF/{number}") or None

    def forwarded(self, number: str) -> str:
        """The number a call to ``number`` finally rings, following forwards (loops stop)."""
        seen = {number}
        for _ in range(MAX_FORWARD_HOPS):
            target = self.call_forward(number)
            if not target or target in seen:
                break
            seen.add(target)
            number = target
        return number

    # --- variables ---------------------------------------------------------------------------------------

    def _action_setvar(self, session: _Session, msg: Message) -> None:
        variable = msg.get("Variable") or ""
        if not variable:
            session.respond(msg, "Error", ("Message", "No variable specified"))
            return
        value = msg.get("Value") or ""
        channel_name = msg.get("Channel")
        channel = self._find_channel(channel_name) if channel_name else None
        if channel_name and channel is None:
            session.respond(msg, "Error", ("Message", "No such channel"))
            return
        session.respond(msg, "Success", ("Message", "Variable Set"))
        if variable.upper().startswith("DEVICE_STATE(") and variable.endswith(")"):
            self.set_device_state(variable[len("DEVICE_STATE("):-1], value)
            return
        from .simulator import channel_fields  # here, not at the top: simulator imports this module

        if channel is None:
            self.global_vars[variable] = value
            fields: list[Field] = [("Channel", "none"), ("Uniqueid", "none")]
        else:
            channel.variables[variable] = value
            fields = channel_fields(channel)
        self._broadcast([("Event", "VarSet"), ("Privilege", "dialplan,all"), *fields,
                         ("Variable", variable), ("Value", value)])

    def _action_getvar(self, session: _Session, msg: Message) -> None:
        variable = msg.get("Variable") or ""
        if not variable:
            session.respond(msg, "Error", ("Message", "No variable specified"))
            return
        channel_name = msg.get("Channel")
        channel = self._find_channel(channel_name) if channel_name else None
        if channel_name and channel is None:
            session.respond(msg, "Error", ("Message", "No such channel"))
            return
        if variable.upper().startswith("DEVICE_STATE(") and variable.endswith(")"):
            value = self.device_state(variable[len("DEVICE_STATE("):-1]).value
        elif channel is not None:
            value = channel.variables.get(variable, self.global_vars.get(variable, ""))
        else:
            value = self.global_vars.get(variable, "")
        session.respond(msg, "Success", ("Variable", variable), ("Value", value))

    # --- CLI commands -----------------------------------------------------------------------------------

    def _action_command(self, session: _Session, msg: Message) -> None:
        command = " ".join((msg.get("Command") or "").split())
        words = command.split(" ")
        if len(words) == 4 and words[:2] == ["devstate", "change"]:
            device, state = words[2], words[3].upper()
            if not device.lower().startswith("custom:") or state not in DeviceState.__members__:
                self._command_output(session, msg, False, [f"Invalid device state change: {command}"])
                return
            self._command_output(session, msg, True, [f"Changing {device[7:]} to {state}"])
            self.set_device_state(device, state)
        elif command == "core show version":
            self._command_output(session, msg, True, [VERSION_LINE])
        elif command == "core show hints":
            self._command_output(session, msg, True, self._hint_lines())
        elif command == "core show channels count":
            calls = len(self._calls)  # type: ignore[attr-defined]
            self._command_output(session, msg, True, [f"{len(self._channels)} active channels",
                                                      f"{calls} active calls"])
        else:
            self._command_output(session, msg, False, [
                f"No such command '{command}' (type 'core show help {' '.join(words[:2])}' for other "
                "possible commands)"])

    def _command_output(self, session: _Session, msg: Message, ok: bool, lines: list[str]) -> None:
        """07c: ``Message: Command output follows`` and one ``Output:`` header per line; a CLI
        error is ``Response: Error`` with the same Message."""
        session.respond(msg, "Success" if ok else "Error", ("Message", "Command output follows"),
                        *(("Output", line) for line in lines))

    def _hint_lines(self) -> list[str]:
        hints = [(f"{exten}@{context}", device) for context, exten, device in self.dialplan.hints()]
        hints += [(f"{n}@{self.dial_context}", p.device) for n, p in sorted(self.phones.items()) if p.hinted]
        lines = ["", "    -= Registered Asterisk Dial Plan Hints =-"]
        for where, device in hints:
            _, text = EXTENSION_STATUS[self.device_state(device)]
            lines.append(_HINT_LINE.format(where, device, text, "not_set", 0))
        return lines + ["----------------", f"- {len(hints)} hints registered"]

    def _action_list_commands(self, session: _Session, msg: Message) -> None:
        names = sorted(self._actions)  # type: ignore[attr-defined]
        session.respond(msg, "Success", *((name, f"{name} (simulated)") for name in names))

    # --- Redirect, Status, BridgeList --------------------------------------------------------------------

    def _action_redirect(self, session: _Session, msg: Message) -> None:
        name = msg.get("Channel") or ""
        if not name:
            session.respond(msg, "Error", ("Message", "Channel not specified"))
            return
        channel = self._find_channel(name)
        if channel is None:
            session.respond(msg, "Error", ("Message", f"Channel does not exist: {name}"))
            return
        call = channel.call
        context, exten = msg.get("Context") or channel.context, msg.get("Exten") or ""
        priority_text = (msg.get("Priority") or "1").strip()
        if not exten or not priority_text.isdigit():
            session.respond(msg, "Error", ("Message", "Invalid priority" if exten else "Exten not specified"))
            return
        if call.redirect is None or call.redirect.done() or call.a is None or channel is not call.a.one:
            session.respond(msg, "Error", ("Message", "Redirect failed"))
            return
        session.respond(msg, "Success", ("Message", "Redirect successful"))
        call.redirect.set_result((context, exten, int(priority_text)))

    def _action_status(self, session: _Session, msg: Message) -> None:
        from .simulator import CALL, channel_fields

        wanted = msg.get("Channel")
        now = time.monotonic()
        channels = [c for c in self._channels.values() if not wanted or c.name == wanted]
        action_id = msg.get("ActionID")
        id_field: list[Field] = [] if action_id is None else [("ActionID", action_id)]
        out = [self._response(msg, "Success", ("EventList", "start"), ("Message", "Channel status will follow"))]
        for ch in channels:
            out.append(Message._trusted([
                ("Event", "Status"), ("Privilege", CALL.split(",")[0].capitalize()), *channel_fields(ch),
                ("Type", ch.name.split("/")[0]), ("DNID", ""), ("EffectiveConnectedLineNum", ch.connected_num),
                ("EffectiveConnectedLineName", ch.connected_name), ("TimeToHangup", "0"),
                ("BridgeID", ch.bridge_id), ("Application", ch.application), ("Data", ch.app_data),
                ("Nativeformats", "(slin)"), ("Readformat", "slin"), ("Readtrans", ""),
                ("Writeformat", "slin"), ("Writetrans", ""), ("Callgroup", "0"), ("Pickupgroup", "0"),
                ("Seconds", str(int(now - ch.created))), *id_field]).encode())
        out.append(Message._trusted([("Event", "StatusComplete"), *id_field, ("EventList", "Complete"),
                                     ("ListItems", str(len(channels))), ("Items", str(len(channels)))]).encode())
        session.write(b"".join(out))

    def _action_bridge_list(self, session: _Session, msg: Message) -> None:
        from .simulator import bridge_fields

        bridges: dict[str, int] = {}
        for ch in self._channels.values():
            if ch.bridge_id and ch.bridge_id not in {c.bridge_id for c in self.conferences.values()}:
                bridges[ch.bridge_id] = bridges.get(ch.bridge_id, 0) + 1
        self._send_list(session, msg, "Bridge listing will follow", "BridgeListItem",  # type: ignore[attr-defined]
                        [bridge_fields(b, n) for b, n in bridges.items()], "BridgeListComplete")

    # --- ConfBridge ----------------------------------------------------------------------------------------

    def _action_confbridge_list(self, session: _Session, msg: Message) -> None:
        from .simulator import channel_fields

        room = msg.get("Conference") or ""
        conf = self.conferences.get(room)
        if not room:
            session.respond(msg, "Error", ("Message", "No Conference name provided."))
            return
        if conf is None:
            session.respond(msg, "Error", ("Message", "No active conferences."))
            return
        now = time.monotonic()
        items = [[("Conference", room), ("Admin", "No"), ("MarkedUser", "No"), ("WaitMarked", "No"),
                  ("EndMarked", "No"), ("EndMarkedAny", "No"), ("Waiting", "No"), ("Muted", "No"),
                  ("Talking", "No"), ("AnsweredTime", str(int(now - m.joined))), *channel_fields(m.channel)]
                 for m in conf.members]
        self._send_list(session, msg, "Confbridge user list will follow", "ConfbridgeList", items,  # type: ignore[attr-defined]
                        "ConfbridgeListComplete")

    def _action_confbridge_list_rooms(self, session: _Session, msg: Message) -> None:
        if not self.conferences:
            session.respond(msg, "Error", ("Message", "No active conferences."))
            return
        items = [[("Conference", room), ("Parties", str(len(c.members))), ("Marked", "0"), ("Locked", "No"),
                  ("Muted", "No")] for room, c in sorted(self.conferences.items())]
        self._send_list(session, msg, "Confbridge conferences will follow", "ConfbridgeListRooms", items,  # type: ignore[attr-defined]
                        "ConfbridgeListRoomsComplete")

    def _action_confbridge_kick(self, session: _Session, msg: Message) -> None:
        room, name = msg.get("Conference") or "", msg.get("Channel") or ""
        conf = self.conferences.get(room)
        member = next((m for m in conf.members if m.channel.name == name), None) if conf else None
        if member is None or member.kicked.done():
            session.respond(msg, "Error", ("Message", "No Conference by that name found."
                                           if conf is None else "No Channel by that name found in Conference."))
            return
        session.respond(msg, "Success", ("Message", "User kicked"))
        member.kicked.set_result(None)

    # --- helpers -----------------------------------------------------------------------------------------

    def _response(self, msg: Message, status: str, *fields: Field) -> bytes:
        from .simulator import response

        return response(msg, status, *fields).encode()

    def _find_channel(self, name: str) -> Channel | None:  # provided by AmiSimulator
        raise NotImplementedError


MANAGER_ACTIONS = {
    "redirect": "_action_redirect",
    "status": "_action_status",
    "bridgelist": "_action_bridge_list",
    "dbput": "_action_db_put",
    "dbget": "_action_db_get",
    "dbgettree": "_action_db_get_tree",
    "dbdel": "_action_db_del",
    "dbdeltree": "_action_db_del_tree",
    "setvar": "_action_setvar",
    "getvar": "_action_getvar",
    "command": "_action_command",
    "listcommands": "_action_list_commands",
    "confbridgelist": "_action_confbridge_list",
    "confbridgelistrooms": "_action_confbridge_list_rooms",
    "confbridgekick": "_action_confbridge_kick",
}
