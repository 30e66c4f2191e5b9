"""Gateway configuration: YAML in, frozen dataclasses out, embedded defaults for everything.

``load_config(None)`` gives the embedded defaults (the example directory and phone book shipped
with the package, the built-in AMI simulator), so ``mailgw serve`` runs with no file at all.
Unknown keys are errors: a typo in a config file must not be silently ignored.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import humanfriendly
from pytimeparse2 import parse as parse_seconds

from .resources import shipped
from .yamlfile import read_yaml


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SmtpConfig:
    listen: HostPort = HostPort("127.0.0.1", 2525)
    max_message_size: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class OutboundConfig:
    smarthost: HostPort | None = None
    retry_interval: float = 60.0  # first retry; doubles up to max_retry_interval
    max_retry_interval: float = 3600.0
    give_up_after: float = 2 * 86400.0


@dataclass(frozen=True)
class RelayConfig:
    """Relaying to peer gateways (mailgw/relay.py, docs/federation.md)."""

    mx: bool = False                 # domains not in the destination DB: look up their MX (else 550 5.7.1)
    retry_interval: float = 300.0    # first retry of a relayed mail (Postfix-like), doubling ...
    max_retry_interval: float = 3600.0  # ... up to this; never past the request's monitor time
    give_up_after: float = 15 * 60.0  # for relayed mail without a request (and its monitor time)
    max_hops: int = 25               # more Received headers than this: a loop, 554 5.4.6
    dns: tuple[HostPort, ...] = ()   # name servers for MX look-ups (default: the system's)
    mx_port: int = 25                # the port MX hosts are reached on (25; tests use another)


@dataclass(frozen=True)
class AmiConfig:
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "mailgw"
    secret: str = field(default="mailgw-secret", repr=False)  # never printed


@dataclass(frozen=True)
class SimulatorConfig:
    enabled: bool = True
    phones: Path = field(default_factory=lambda: shipped("pbx", "phones.yaml"))
    time_scale: float = 1.0  # < 1 makes the simulated phones act faster (tests)
    # In a child process of the gateway, as a real PBX is a process of its own: the gateway's
    # event loop then has no phones to run. False: in the gateway's loop (tests, embedding).
    process: bool = True


@dataclass(frozen=True)
class PbxConfig:
    ami: AmiConfig = AmiConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    dial_context: str = "mailgw-dial"  # Local/<number>@dial_context rings one phone
    connect_context: str = "mailgw-connect"  # exten <number> here dials the second party
    ring_timeout: float = 30.0  # seconds each party may ring
    caller_id: str = '"mailgw" <mailgw>'
    max_concurrent_calls: int = 20
    incoming_context: str = "from-trunk"  # where calls from outside arrive (call history, absence mail)


ACTIONS = ("connect", "camp-on", "cancel", "monitor")


@dataclass(frozen=True)
class GroupPolicy:
    """What the members of one directory group may do; unset keys fall back to ``policy``."""

    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] | None = None
    actions: tuple[str, ...] | None = None
    per_sender_per_hour: int | None = None


@dataclass(frozen=True)
class PolicyConfig:
    allow: tuple[str, ...] = ("XX", "XXX", "XXXX", "XXXXX", "0[1-9]*")
    deny: tuple[str, ...] = ("00*", "010*", "0990*", "0570*", "+*")
    actions: tuple[str, ...] = ACTIONS
    per_sender_per_hour: int = 30
    per_number_per_minute: int = 1   # requests that ring one number (GoAlert-like defaults) ...
    per_number_per_hour: int = 5     # ... a sender's own phone excepted
    groups: tuple[tuple[str, GroupPolicy], ...] = ()  # (group name, policy), first match wins


@dataclass(frozen=True)
class DkimKey:
    """A domain whose mail must be DKIM-signed, and the public key to check it with (the ``p=``
    of its DNS record, configured here so checks need no DNS and work between offices offline)."""

    domain: str
    selector: str
    public_key: str = field(repr=False)


@dataclass(frozen=True)
class SecurityConfig:
    # Clients connecting from these networks may place calls without SMTP AUTH (like Postfix's
    # mynetworks). Everyone else must authenticate, over TLS, as the person the mail is from.
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    tls_cert: Path | None = None  # PEM; unset: a self-signed certificate is made under data_dir/tls
    tls_key: Path | None = None
    dkim: tuple[DkimKey, ...] = ()  # mail claiming these domains must carry their valid DKIM signature


@dataclass(frozen=True)
class RequestConfig:
    service_mailboxes: tuple[str, ...] = ("cti",)  # local parts that take requests for any number
    monitor_default: float = 15 * 60.0
    monitor_max: float = 8 * 3600.0


@dataclass(frozen=True)
class CamponConfig:
    """Camp-on, cancel and the status monitor (see mailgw/campon.py)."""

    retry_busy: float = 3 * 60.0         # retry mode: wait after a busy attempt
    retry_no_answer: float = 5 * 60.0    # after an attempt nobody answered (also watch mode)
    retry_other: float = 3 * 60.0        # after congestion, unreachable, an unknown failure
    max_per_caller: int = 5              # pending camp-ons one caller number may have (CCSS-like)
    max_per_target: int = 5              # pending camp-ons on one destination number
    max_concurrent_originates: int = 10  # camp-on attempts placed at once; express ones go first
    admins: tuple[str, ...] = ()         # addresses that may cancel anyone's camp-on
    poll_interval: float = 2.0           # how often the running gateway looks for `mailgw campons cancel`
    monitor_mail_interval: float = 60.0  # status monitor: at most one mail per this many seconds


@dataclass(frozen=True)
class NumberingConfig:
    region: str = "JP"  # how national numbers are read and written (phonenumbers region code)
    extension_pattern: str = r"[0-9]{2,5}"  # what counts as an internal extension


@dataclass(frozen=True)
class MediaConfig:
    """Voice and FAX parts (see mailgw/media.py and docs/media.md)."""

    spool: Path | None = None  # converted files the PBX reads; None: <data_dir>/media
    max_voice_seconds: float = 300.0
    max_fax_pages: int = 20
    max_part_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class ScenariosConfig:
    """Stored scenarios (see mailgw/scenario.py and docs/scenarios.md)."""

    dir: Path = field(default_factory=lambda: shipped("scenarios"))  # NAME.yaml, referenced as NAME
    reload_interval: float = 2.0  # how often a running gateway looks for edited files
    # What a "confirm: {via: phone}" call plays before reading the key (1 yes, 2 no): an Asterisk
    # sound name or an absolute path without extension; record one that says so (docs/scenarios.md).
    confirm_prompt: str = "beep"


@dataclass(frozen=True)
class AbsenceConfig:
    """Call history and missed-call mail (see mailgw/absence.py and docs/absence.md)."""

    enabled: bool = True
    representative: str | None = None  # mail for unknown / withheld callers; None: the directory's
    notify_unanswered: bool = False    # also mail unanswered calls when nobody is absent (claim 8)
    history: int = 5                   # earlier calls of the same caller shown in the mail
    poll_interval: float = 2.0         # how soon a running gateway sends a memo from `mailgw memo`
    # Fixed phrases a colleague picks for a memo (`mailgw memo --phrase N`), per language.
    memo_phrases: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("en", ("Please call the customer back.", "Please call the office.", "The customer will call again.",
                "No need to call back.")),
        ("ja", ("お客様に電話してください。", "会社に電話してください。", "お客様から改めてお電話があります。",
                "折り返しは不要です。")),
    )

    # Batched missed-call mail per person: address -> (calls, every seconds); see absence.DigestPreference.
    digests: tuple[tuple[str, int | None, float | None], ...] = ()
    # Where recordings the PBX names may be read from (directories, http(s) URL prefixes); empty:
    # the simulator's <data_dir>/sim-recordings and /var/spool/asterisk. See absence_recording.py.
    recordings: tuple[str, ...] = ()
    recording_max_bytes: int = 5 * 1024 * 1024  # bigger recordings are not attached (the mail says so)
    # An HTML alternative (templates/absence.<language>.html) after the plain text: for everyone
    # (True), nobody (False), or the addresses listed.
    html: bool | tuple[str, ...] = False

    def wants_html(self, address: str) -> bool:
        return self.html if isinstance(self.html, bool) else address.lower() in self.html

    def phrases(self, language: str) -> tuple[str, ...]:
        table = dict(self.memo_phrases)
        return table.get(language) or table.get("en") or ()


@dataclass(frozen=True)
class Config:
    domains: tuple[str, ...] = ("a.example",)
    data_dir: Path = Path("var")
    smtp: SmtpConfig = SmtpConfig()
    outbound: OutboundConfig = OutboundConfig()
    directory: Path = field(default_factory=lambda: shipped("config", "directory.yaml"))
    destinations: Path | None = None
    relay: RelayConfig = RelayConfig()
    mailbox_root: Path = Path("mailbox")
    # A group that may read and flag the Maildirs (an IMAP server such as Dovecot serving them):
    # delivered files become 0660 and folders 2770 with this group. None: private (0600/0700).
    mailbox_group: str | None = None
    # Maildir deliveries made by a child process (mailbox_agent), not by threads of the gateway.
    mailbox_agent: bool = True
    templates: Path = field(default_factory=lambda: shipped("templates"))
    pbx: PbxConfig = PbxConfig()
    policy: PolicyConfig = PolicyConfig()
    security: SecurityConfig = SecurityConfig()
    requests: RequestConfig = RequestConfig()
    numbering: NumberingConfig = NumberingConfig()
    campon: CamponConfig = CamponConfig()
    media: MediaConfig = MediaConfig()
    scenarios: ScenariosConfig = field(default_factory=ScenariosConfig)
    absence: AbsenceConfig = AbsenceConfig()
    language: str = "en"
    gateway_address: str = ""  # From of the mail we send; default mailgw@<first domain>

    @property
    def sender_address(self) -> str:
        return self.gateway_address or f"mailgw@{self.domains[0]}"

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in {d.lower() for d in self.domains}


def load_config(path: Path | None, *, data_dir: Path | None = None) -> Config:
    """Read a gateway.yaml (or none, for the embedded defaults) into a Config.

    Relative paths in the file are relative to the file's folder; ``data_dir`` (``--data``)
    wins over the file, which wins over ``MAILGW_HOME``, which wins over ``./var``.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        raw = read_yaml(path, ConfigError) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        base = Path(path).resolve().parent
    config = _build(raw, base)
    env_home = os.environ.get("MAILGW_HOME")
    if data_dir is not None:
        config = replace(config, data_dir=Path(data_dir))
    elif "data_dir" not in raw and env_home:
        config = replace(config, data_dir=Path(env_home))
    return config


def readable_secrets_warning(path: Path) -> str | None:
    """A warning when a config file holding a secret can be read by other users of the machine."""
    try:
        mode = Path(path).stat().st_mode
        text = Path(path).read_text(encoding="utf-8")
        holds_secret = "secret" in text or "password:" in text
    except OSError:
        return None
    if holds_secret and mode & 0o077:
        return (f"{path} holds a secret and can be read by others (mode {mode & 0o777:o}); "
                f"chmod 600 it, or put the AMI secret in MAILGW_AMI_SECRET")
    return None


def _mailbox_group(value: object) -> str | None:
    if value is None:
        return None
    try:
        grp.getgrnam(str(value))
    except KeyError:
        raise ConfigError(f"mailbox.group: there is no group {value!r} on this machine") from None
    return str(value)


# --- building -----------------------------------------------------------------------------------

_TOP_KEYS = {
    "domains", "data_dir", "smtp", "outbound", "directory", "destinations", "mailbox",
    "templates", "pbx", "policy", "security", "requests", "numbering", "language", "gateway_address",
    "campon", "media", "scenarios", "relay", "absence",
}


def _build(raw: dict[str, Any], base: Path) -> Config:
    _no_unknown(raw, _TOP_KEYS, "")
    d = Config()
    smtp = _section(raw, "smtp", {"listen", "max_message_size"})
    outbound = _section(raw, "outbound", {"smarthost", "retry_interval", "max_retry_interval", "give_up_after"})
    mailbox = _section(raw, "mailbox", {"root", "group", "agent"})
    pbx = _section(raw, "pbx", {"ami", "simulator", "dial_context", "connect_context", "ring_timeout",
                                "caller_id", "max_concurrent_calls", "incoming_context"})
    ami = _section(pbx, "ami", {"host", "port", "username", "secret"}, "pbx.")
    sim = _section(pbx, "simulator", {"enabled", "phones", "time_scale", "process"}, "pbx.")
    policy = _section(raw, "policy", {"allow", "deny", "actions", "per_sender_per_hour", "per_number_per_minute",
                                      "per_number_per_hour", "groups"})
    security = _section(raw, "security", {"trusted_networks", "tls", "dkim"})
    tls = _section(security, "tls", {"cert", "key"}, "security.")
    requests = _section(raw, "requests", {"service_mailboxes", "monitor_default", "monitor_max"})
    numbering = _section(raw, "numbering", {"region", "extension_pattern"})
    campon = _section(raw, "campon", {"retry_busy", "retry_no_answer", "retry_other", "max_per_caller",
                                      "max_per_target", "max_concurrent_originates", "admins", "poll_interval",
                                      "monitor_mail_interval"})

    domains = raw.get("domains", list(d.domains))
    if isinstance(domains, str):
        domains = [domains]
    if not domains or not all(isinstance(x, str) and x for x in domains):
        raise ConfigError("domains: a list of local mail domains is required")

    secret = os.environ.get("MAILGW_AMI_SECRET") or _str(ami, "secret", d.pbx.ami.secret, "pbx.ami.")
    return Config(
        domains=tuple(x.lower() for x in domains),
        data_dir=_path(raw, "data_dir", d.data_dir, base),
        smtp=SmtpConfig(
            listen=_hostport(smtp.get("listen"), d.smtp.listen, "smtp.listen"),
            max_message_size=_size(smtp.get("max_message_size"), d.smtp.max_message_size, "smtp.max_message_size"),
        ),
        outbound=OutboundConfig(
            smarthost=_hostport(outbound.get("smarthost"), None, "outbound.smarthost"),
            retry_interval=_duration(outbound.get("retry_interval"), d.outbound.retry_interval, "outbound.retry_interval"),
            max_retry_interval=_duration(outbound.get("max_retry_interval"), d.outbound.max_retry_interval,
                                         "outbound.max_retry_interval"),
            give_up_after=_duration(outbound.get("give_up_after"), d.outbound.give_up_after, "outbound.give_up_after"),
        ),
        directory=_path(raw, "directory", d.directory, base),
        destinations=_path(raw, "destinations", None, base),
        mailbox_root=_path(mailbox, "root", d.mailbox_root, base),
        mailbox_group=_mailbox_group(mailbox.get("group")),
        mailbox_agent=_bool(mailbox, "agent", d.mailbox_agent, "mailbox."),
        templates=_path(raw, "templates", d.templates, base),
        pbx=PbxConfig(
            ami=AmiConfig(
                host=_str(ami, "host", d.pbx.ami.host, "pbx.ami."),
                port=_int(ami, "port", d.pbx.ami.port, "pbx.ami."),
                username=_str(ami, "username", d.pbx.ami.username, "pbx.ami."),
                secret=secret,
            ),
            simulator=SimulatorConfig(
                enabled=_bool(sim, "enabled", d.pbx.simulator.enabled, "pbx.simulator."),
                phones=_path(sim, "phones", d.pbx.simulator.phones, base),
                time_scale=_float(sim, "time_scale", d.pbx.simulator.time_scale, "pbx.simulator."),
                process=_bool(sim, "process", d.pbx.simulator.process, "pbx.simulator."),
            ),
            dial_context=_str(pbx, "dial_context", d.pbx.dial_context, "pbx."),
            connect_context=_str(pbx, "connect_context", d.pbx.connect_context, "pbx."),
            ring_timeout=_duration(pbx.get("ring_timeout"), d.pbx.ring_timeout, "pbx.ring_timeout"),
            caller_id=_str(pbx, "caller_id", d.pbx.caller_id, "pbx."),
            max_concurrent_calls=_int(pbx, "max_concurrent_calls", d.pbx.max_concurrent_calls, "pbx."),
            incoming_context=_str(pbx, "incoming_context", d.pbx.incoming_context, "pbx."),
        ),
        policy=PolicyConfig(
            allow=_patterns(policy, "allow", d.policy.allow),
            deny=_patterns(policy, "deny", d.policy.deny),
            actions=_actions(policy, d.policy.actions, "policy."),
            per_sender_per_hour=_int(policy, "per_sender_per_hour", d.policy.per_sender_per_hour, "policy."),
            per_number_per_minute=_int(policy, "per_number_per_minute", d.policy.per_number_per_minute, "policy."),
            per_number_per_hour=_int(policy, "per_number_per_hour", d.policy.per_number_per_hour, "policy."),
            groups=_groups(policy.get("groups") or {}),
        ),
        security=SecurityConfig(
            trusted_networks=_networks(security, d.security.trusted_networks),
            tls_cert=_path(tls, "cert", None, base),
            tls_key=_path(tls, "key", None, base),
            dkim=_dkim(security.get("dkim") or []),
        ),
        requests=RequestConfig(
            service_mailboxes=tuple(requests.get("service_mailboxes", d.requests.service_mailboxes)),
            monitor_default=_duration(requests.get("monitor_default"), d.requests.monitor_default,
                                      "requests.monitor_default"),
            monitor_max=_duration(requests.get("monitor_max"), d.requests.monitor_max, "requests.monitor_max"),
        ),
        numbering=NumberingConfig(
            region=_str(numbering, "region", d.numbering.region, "numbering.").upper(),
            extension_pattern=_str(numbering, "extension_pattern", d.numbering.extension_pattern, "numbering."),
        ),
        campon=_campon(campon, d.campon),
        media=_media(_section(raw, "media", {"spool", "max_voice_seconds", "max_fax_pages", "max_part_bytes"}),
                     d.media, base),
        scenarios=_scenarios(_section(raw, "scenarios", {"dir", "reload_interval", "confirm_prompt"}), d.scenarios, base),
        relay=_relay(_section(raw, "relay", {"mx", "retry_interval", "max_retry_interval", "give_up_after",
                                             "max_hops", "dns", "mx_port"}), d.relay),
        absence=_absence(_section(raw, "absence", {"enabled", "representative", "notify_unanswered", "history",
                                                        "poll_interval", "memo_phrases", "digests",
                                                        "recordings", "recording_max_bytes", "html"}),
                         d.absence),
        language=_str(raw, "language", d.language, ""),
        gateway_address=_str(raw, "gateway_address", d.gateway_address, ""),
    )


def _scenarios(raw: dict[str, Any], d: ScenariosConfig, base: Path) -> ScenariosConfig:
    return ScenariosConfig(dir=_path(raw, "dir", d.dir, base) or d.dir,
                           reload_interval=_duration(raw.get("reload_interval"), d.reload_interval,
                                                     "scenarios.reload_interval"),
                           confirm_prompt=_prompt(raw.get("confirm_prompt", d.confirm_prompt)))


def _prompt(value: object) -> str:
    # What Asterisk's Read() is given: a sound name or an absolute path, nothing that could
    # break out of its argument list.
    text = str(value)
    if not re.fullmatch(r"/?[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}", text) or ".." in text:
        raise ConfigError(f"scenarios.confirm_prompt: {text!r} is not a sound name or absolute path "
                          "(letters, digits, _ . / -; no extension)")
    return text


def _absence(raw: dict[str, Any], d: AbsenceConfig) -> AbsenceConfig:
    representative = raw.get("representative", d.representative)
    if representative is not None and (not isinstance(representative, str) or "@" not in representative):
        raise ConfigError("absence.representative: must be a mail address")
    history = _int(raw, "history", d.history, "absence.")
    if history < 0:
        raise ConfigError("absence.history: must be 0 or more")
    phrases = raw.get("memo_phrases", dict(d.memo_phrases))
    if not isinstance(phrases, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v) for k, v in phrases.items()):
        raise ConfigError("absence.memo_phrases: must map a language to a list of phrases, e.g. {en: [...], ja: [...]}")
    digests = []
    for address, pref in (raw.get("digests") or {}).items():
        where = f"absence.digests.{address}"
        if not isinstance(pref, dict) or not pref or set(pref) - {"calls", "every"}:
            raise ConfigError(f"{where}: give calls: N and/or every: DURATION")
        calls = _int(pref, "calls", 0, where + ".") or None
        every = _duration(pref.get("every"), 0.0, where + ".every") or None
        if calls is not None and calls < 1:
            raise ConfigError(f"{where}.calls: must be at least 1")
        digests.append((str(address).strip().lower(), calls, every))
    recordings = raw.get("recordings", list(d.recordings))
    if not isinstance(recordings, (list, tuple)) or not all(
            isinstance(r, str) and (r.startswith(("/", "http://", "https://"))) for r in recordings):
        raise ConfigError("absence.recordings: must be a list of absolute directories or http(s):// URL prefixes")
    max_bytes = _size(raw.get("recording_max_bytes"), d.recording_max_bytes, "absence.recording_max_bytes")
    html = raw.get("html", d.html)
    if isinstance(html, (list, tuple)) and all(isinstance(a, str) and "@" in a for a in html):
        html = tuple(a.strip().lower() for a in html)
    elif not isinstance(html, bool):
        raise ConfigError("absence.html: true, false, or a list of the mail addresses that want it")
    return AbsenceConfig(
        recordings=tuple(recordings), recording_max_bytes=max_bytes, html=html,
        digests=tuple(digests),
        enabled=_bool(raw, "enabled", d.enabled, "absence."),
        representative=representative.strip().lower() if representative else None,
        notify_unanswered=_bool(raw, "notify_unanswered", d.notify_unanswered, "absence."), history=history,
        poll_interval=_duration(raw.get("poll_interval"), d.poll_interval, "absence.poll_interval"),
        memo_phrases=tuple((k, tuple(v)) for k, v in phrases.items()))


def _campon(raw: dict[str, Any], d: CamponConfig) -> CamponConfig:
    def duration(key: str) -> float:
        return _duration(raw.get(key), getattr(d, key), f"campon.{key}")

    def count(key: str) -> int:
        value = _int(raw, key, getattr(d, key), "campon.")
        if value < 1:
            raise ConfigError(f"campon.{key}: must be at least 1")
        return value

    admins = raw.get("admins", list(d.admins))
    if not isinstance(admins, list) or not all(isinstance(a, str) and "@" in a for a in admins):
        raise ConfigError("campon.admins: must be a list of mail addresses")
    return CamponConfig(
        retry_busy=duration("retry_busy"), retry_no_answer=duration("retry_no_answer"),
        retry_other=duration("retry_other"), max_per_caller=count("max_per_caller"),
        max_per_target=count("max_per_target"), max_concurrent_originates=count("max_concurrent_originates"),
        admins=tuple(a.strip().lower() for a in admins), poll_interval=duration("poll_interval"),
        monitor_mail_interval=duration("monitor_mail_interval"),
    )


def _media(raw: dict[str, Any], d: MediaConfig, base: Path) -> MediaConfig:
    pages = _int(raw, "max_fax_pages", d.max_fax_pages, "media.")
    size = _size(raw.get("max_part_bytes"), d.max_part_bytes, "media.max_part_bytes")
    if pages < 1 or size < 1:
        key = "max_fax_pages" if pages < 1 else "max_part_bytes"
        raise ConfigError(f"media.{key}: must be at least 1")
    return MediaConfig(
        spool=_path(raw, "spool", d.spool, base),
        max_voice_seconds=_duration(raw.get("max_voice_seconds"), d.max_voice_seconds, "media.max_voice_seconds"),
        max_fax_pages=pages, max_part_bytes=size,
    )
def _relay(raw: dict[str, Any], d: RelayConfig) -> RelayConfig:
    def duration(key: str) -> float:
        return _duration(raw.get(key), getattr(d, key), f"relay.{key}")

    return RelayConfig(mx=_bool(raw, "mx", d.mx, "relay."), retry_interval=duration("retry_interval"),
                       max_retry_interval=duration("max_retry_interval"), give_up_after=duration("give_up_after"),
                       max_hops=_int(raw, "max_hops", d.max_hops, "relay."),
                       dns=_nameservers(raw.get("dns", [])), mx_port=_int(raw, "mx_port", d.mx_port, "relay."))


def _nameservers(raw: Any) -> tuple[HostPort, ...]:
    if not isinstance(raw, list):
        raise ConfigError("relay.dns: must be a list of name servers (\"192.0.2.53\" or \"192.0.2.53:5353\")")
    servers = []
    for index, entry in enumerate(raw, start=1):
        text = str(entry)
        servers.append(_hostport(text if ":" in text else f"{text}:53", None, f"relay.dns[{index}]"))
    return tuple(s for s in servers if s is not None)


def _no_unknown(section: dict[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")


def _section(raw: dict[str, Any], key: str, known: set[str], prefix: str = "") -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{prefix}{key}: must be a mapping")
    _no_unknown(value, known, f"{prefix}{key}.")
    return value


def _str(raw: dict[str, Any], key: str, default: str, prefix: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{prefix}{key}: must be a string")
    return value


def _int(raw: dict[str, Any], key: str, default: int, prefix: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}{key}: must be a whole number")
    return value


def _float(raw: dict[str, Any], key: str, default: float, prefix: str) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{prefix}{key}: must be a positive number")
    return float(value)


def _bool(raw: dict[str, Any], key: str, default: bool, prefix: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key}: must be true or false")
    return value


def _path(raw: dict[str, Any], key: str, default: Path | None, base: Path) -> Path | None:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(base / path))


def _hostport(value: Any, default: HostPort | None, name: str) -> HostPort | None:
    if value is None:
        return default
    if isinstance(value, str) and ":" in value:
        host, _, port = value.rpartition(":")
        if port.isdigit() and host:
            return HostPort(host.strip("[]"), int(port))
    raise ConfigError(f"{name}: {value!r} is not host:port")


def _size(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return humanfriendly.parse_size(str(value), binary=True)
    except humanfriendly.InvalidSize as exc:
        raise ConfigError(f"{name}: {value!r} is not a size (e.g. 10MB)") from exc


def _duration(value: Any, default: float, name: str) -> float:
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    seconds = parse_seconds(str(value)) if isinstance(value, str) else None
    if seconds is None or seconds <= 0:
        raise ConfigError(f"{name}: {value!r} is not a duration (e.g. 30s, 5m, 1h30m)")
    return float(seconds)


def _actions(raw: dict[str, Any], default: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    value = raw.get("actions", list(default))
    if not isinstance(value, list) or not all(x in ACTIONS for x in value):
        raise ConfigError(f"{prefix}actions: must be a list of {', '.join(ACTIONS)}")
    return tuple(value)


def _groups(raw: Any) -> tuple[tuple[str, GroupPolicy], ...]:
    if not isinstance(raw, dict):
        raise ConfigError("policy.groups: must be a mapping of group name to policy")
    groups = []
    for name, entry in raw.items():
        prefix = f"policy.groups.{name}."
        entry = entry or {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{prefix[:-1]}: must be a mapping")
        _no_unknown(entry, {"allow", "deny", "actions", "per_sender_per_hour"}, prefix)
        groups.append((str(name), GroupPolicy(
            allow=_patterns(entry, "allow", (), prefix) if "allow" in entry else None,
            deny=_patterns(entry, "deny", (), prefix) if "deny" in entry else None,
            actions=_actions(entry, (), prefix) if "actions" in entry else None,
            per_sender_per_hour=_int(entry, "per_sender_per_hour", 0, prefix) if "per_sender_per_hour" in entry else None,
        )))
    return tuple(groups)


def _dkim(raw: Any) -> tuple[DkimKey, ...]:
    if not isinstance(raw, list):
        raise ConfigError("security.dkim: must be a list of {domain, selector, public_key}")
    keys = []
    for index, entry in enumerate(raw, start=1):
        where = f"security.dkim[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping")
        _no_unknown(entry, {"domain", "selector", "public_key"}, f"{where}.")
        values = [entry.get(k) for k in ("domain", "selector", "public_key")]
        if not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{where}: domain, selector and public_key are required")
        keys.append(DkimKey(values[0].lower(), values[1], "".join(values[2].split())))
    return tuple(keys)


def _networks(raw: dict[str, Any], default: tuple[str, ...]) -> tuple[str, ...]:
    value = raw.get("trusted_networks", list(default))
    if not isinstance(value, list):
        raise ConfigError("security.trusted_networks: must be a list of networks (127.0.0.0/8)")
    for network in value:
        try:
            ipaddress.ip_network(str(network), strict=False)
        except ValueError as exc:
            raise ConfigError(f"security.trusted_networks: {exc}") from exc
    return tuple(str(n) for n in value)


def _patterns(raw: dict[str, Any], key: str, default: tuple[str, ...], prefix: str = "policy.") -> tuple[str, ...]:
    value = raw.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(x, (str, int)) for x in value):
        raise ConfigError(f"{prefix}{key}: must be a list of number patterns")
    from .policy import PatternError, compile_pattern  # policy builds on this module's types

    for pattern in value:
        try:
            compile_pattern(str(pattern))
        except PatternError as exc:
            raise ConfigError(f"{prefix}{key}: {exc}") from exc
    return tuple(str(x) for x in value)
