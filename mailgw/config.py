"""Gateway configuration: YAML in, frozen dataclasses out, embedded defaults for everything.

``load_config(None)`` gives the embedded defaults (the example directory and phone book shipped
with the package, the built-in AMI simulator), so ``mailgw serve`` runs with no file at all.
Unknown keys are errors: a typo in a config file must not be silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import humanfriendly
import yaml
from pytimeparse2 import parse as parse_seconds

from .resources import shipped


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


@dataclass(frozen=True)
class PbxConfig:
    ami: AmiConfig = AmiConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    dial_context: str = "mailgw-dial"  # Local/<number>@dial_context rings one phone
    connect_context: str = "mailgw-connect"  # exten <number> here dials the second party
    ring_timeout: float = 30.0  # seconds each party may ring
    caller_id: str = '"mailgw" <mailgw>'
    max_concurrent_calls: int = 20


@dataclass(frozen=True)
class PolicyConfig:
    allow: tuple[str, ...] = ("XX", "XXX", "XXXX", "XXXXX", "0[1-9]*")
    deny: tuple[str, ...] = ("00*", "010*", "0990*", "0570*", "+*")
    per_sender_per_hour: int = 30


@dataclass(frozen=True)
class RequestConfig:
    service_mailboxes: tuple[str, ...] = ("cti",)  # local parts that take requests for any number
    monitor_default: float = 15 * 60.0
    monitor_max: float = 8 * 3600.0


@dataclass(frozen=True)
class NumberingConfig:
    region: str = "JP"  # how national numbers are read and written (phonenumbers region code)
    extension_pattern: str = r"[0-9]{2,5}"  # what counts as an internal extension


@dataclass(frozen=True)
class Config:
    domains: tuple[str, ...] = ("a.example",)
    data_dir: Path = Path("var")
    smtp: SmtpConfig = SmtpConfig()
    outbound: OutboundConfig = OutboundConfig()
    directory: Path = field(default_factory=lambda: shipped("config", "directory.yaml"))
    destinations: Path | None = None
    mailbox_root: Path = Path("mailbox")
    templates: Path = field(default_factory=lambda: shipped("templates"))
    pbx: PbxConfig = PbxConfig()
    policy: PolicyConfig = PolicyConfig()
    requests: RequestConfig = RequestConfig()
    numbering: NumberingConfig = NumberingConfig()
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
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
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


# --- building -----------------------------------------------------------------------------------

_TOP_KEYS = {
    "domains", "data_dir", "smtp", "outbound", "directory", "destinations", "mailbox",
    "templates", "pbx", "policy", "requests", "numbering", "language", "gateway_address",
}


def _build(raw: dict[str, Any], base: Path) -> Config:
    _no_unknown(raw, _TOP_KEYS, "")
    d = Config()
    smtp = _section(raw, "smtp", {"listen", "max_message_size"})
    outbound = _section(raw, "outbound", {"smarthost", "retry_interval", "max_retry_interval", "give_up_after"})
    mailbox = _section(raw, "mailbox", {"root"})
    pbx = _section(raw, "pbx", {"ami", "simulator", "dial_context", "connect_context", "ring_timeout",
                                "caller_id", "max_concurrent_calls"})
    ami = _section(pbx, "ami", {"host", "port", "username", "secret"}, "pbx.")
    sim = _section(pbx, "simulator", {"enabled", "phones", "time_scale"}, "pbx.")
    policy = _section(raw, "policy", {"allow", "deny", "per_sender_per_hour"})
    requests = _section(raw, "requests", {"service_mailboxes", "monitor_default", "monitor_max"})
    numbering = _section(raw, "numbering", {"region", "extension_pattern"})

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
            ),
            dial_context=_str(pbx, "dial_context", d.pbx.dial_context, "pbx."),
            connect_context=_str(pbx, "connect_context", d.pbx.connect_context, "pbx."),
            ring_timeout=_duration(pbx.get("ring_timeout"), d.pbx.ring_timeout, "pbx.ring_timeout"),
            caller_id=_str(pbx, "caller_id", d.pbx.caller_id, "pbx."),
            max_concurrent_calls=_int(pbx, "max_concurrent_calls", d.pbx.max_concurrent_calls, "pbx."),
        ),
        policy=PolicyConfig(
            allow=_patterns(policy, "allow", d.policy.allow),
            deny=_patterns(policy, "deny", d.policy.deny),
            per_sender_per_hour=_int(policy, "per_sender_per_hour", d.policy.per_sender_per_hour, "policy."),
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
        language=_str(raw, "language", d.language, ""),
        gateway_address=_str(raw, "gateway_address", d.gateway_address, ""),
    )


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


def _patterns(raw: dict[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = raw.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(x, (str, int)) for x in value):
        raise ConfigError(f"policy.{key}: must be a list of number patterns")
    from .policy import PatternError, compile_pattern  # policy builds on this module's types

    for pattern in value:
        try:
            compile_pattern(str(pattern))
        except PatternError as exc:
            raise ConfigError(f"policy.{key}: {exc}") from exc
    return tuple(str(x) for x in value)
