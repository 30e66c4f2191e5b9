"""Configuration: the example file says what the embedded defaults are, and mistakes are named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mailgw.config import ConfigError, HostPort, load_config
from mailgw.directory import DirectoryError, load_directory
from mailgw.media import MediaLimits, spool_dir
from mailgw.resources import shipped


def test_example_gateway_yaml_spells_out_the_embedded_defaults() -> None:
    example = load_config(shipped("config", "gateway.yaml"))
    defaults = load_config(None)
    # Paths differ only in how they are written (relative to the file vs. the working directory).
    assert replace(example, data_dir=defaults.data_dir, mailbox_root=defaults.mailbox_root) == defaults
    assert example.data_dir.resolve() == (shipped("var")).resolve()


def test_values_are_read_with_units(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("smtp: {listen: '0.0.0.0:25', max_message_size: 2MB}\n"
                    "pbx: {ring_timeout: 1m30s, ami: {port: 5039}}\noutbound: {smarthost: 'mx.example:587'}\n")
    config = load_config(path)
    assert config.smtp.listen == HostPort("0.0.0.0", 25)
    assert config.smtp.max_message_size == 2 * 1024 * 1024
    assert config.pbx.ring_timeout == 90.0
    assert config.pbx.ami.port == 5039
    assert config.outbound.smarthost == HostPort("mx.example", 587)


def test_media_section(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("data_dir: var\nmedia: {max_voice_seconds: 1m30s, max_fax_pages: 3, max_part_bytes: 1MB}\n")
    config = load_config(path)
    assert MediaLimits.of(config.media) == MediaLimits(90.0, 3, 1024 * 1024)
    assert spool_dir(config) == (tmp_path / "var" / "media").resolve()  # the default: under the data directory
    assert spool_dir(load_config(None)) == (Path.cwd() / "var" / "media").resolve()  # absolute, for the PBX
    path.write_text("media: {spool: /srv/pbx-media}\n")
    assert spool_dir(load_config(path)) == Path("/srv/pbx-media")


@pytest.mark.parametrize(("text", "message"), [
    ("smtp: {lisen: '127.0.0.1:25'}", "smtp.lisen: unknown key"),
    ("pbx: {ami: {secrte: x}}", "pbx.ami.secrte: unknown key"),
    ("colour: blue", "colour: unknown key"),
    ("smtp: {listen: nowhere}", "smtp.listen: 'nowhere' is not host:port"),
    ("pbx: {ring_timeout: soon}", "pbx.ring_timeout: 'soon' is not a duration"),
    ("smtp: {max_message_size: huge}", "smtp.max_message_size: 'huge' is not a size"),
    ("policy: {deny: ['09*9']}", "policy.deny: pattern '09\\*9'"),
    ("domains: []", "domains: a list of local mail domains is required"),
    ("- just a list", "the top level must be a mapping"),
    ("media: {max_fax_pages: 0}", "media.max_fax_pages: must be at least 1"),
    ("media: {max_voice_seconds: forever}", "media.max_voice_seconds: 'forever' is not a duration"),
    ("media: {max_part_bytes: lots}", "media.max_part_bytes: 'lots' is not a size"),
    ("media: {spol: /tmp}", "media.spol: unknown key"),
    ("absence: {html: sometimes}", "absence.html: true, false, or a list"),
    ("absence: {recordings: [relative/dir]}", "absence.recordings: must be a list of absolute"),
    ("absence: {recording_max_bytes: lots}", "absence.recording_max_bytes: 'lots' is not a size"),
])
def test_mistakes_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGW_HOME", str(tmp_path / "home"))
    assert load_config(None).data_dir == tmp_path / "home"
    assert load_config(None, data_dir=tmp_path / "flag").data_dir == tmp_path / "flag"


def test_ami_secret_from_the_environment_is_used_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGW_AMI_SECRET", "s3cret-from-env")
    config = load_config(None)
    assert config.pbx.ami.secret == "s3cret-from-env"
    assert "s3cret-from-env" not in repr(config)


def test_directory_resolves_people_and_refuses_duplicates(tmp_path: Path) -> None:
    directory = load_directory(shipped("config", "directory.yaml"))
    assert directory.by_address("Bob@A.EXAMPLE").extension == "2001"
    assert directory.by_extension("2002").language == "ja"
    assert directory.by_address("nobody@a.example") is None
    path = tmp_path / "dir.yaml"
    path.write_text("people:\n - {address: a@x.example, extension: '1'}\n - {address: b@x.example, extension: '1'}\n")
    with pytest.raises(DirectoryError, match=r"people\[2\]: extension 1 is listed twice"):
        load_directory(path)


def test_a_config_file_with_a_secret_readable_by_others_is_warned_about(tmp_path: Path) -> None:
    from mailgw.config import readable_secrets_warning

    path = tmp_path / "gw.yaml"
    path.write_text("pbx: {ami: {secret: hunter2}}\n")
    path.chmod(0o644)
    assert "can be read by others (mode 644)" in readable_secrets_warning(path)
    path.chmod(0o600)
    assert readable_secrets_warning(path) is None
