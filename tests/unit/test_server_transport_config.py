"""The device's rules for reaching the release server: ``[server] urls`` are https unless a lab
says ``allow_plain_http``, mirrors may be plain http, and ``ca_file`` reaches every client
the updater makes (check-ins and downloads)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from chaos.virtual_device import VirtualDevice
from updater.config import LoadedConfig, UpdaterConfig, parse_config
from updater.daemon import build_daemon
from updater.errors import ConfigError
from updater.install import Installer
from updater.log import EventLog
from updater.runtime import Runtime

REQUIRED = 'compatible = "metrica-rpi4"\nkeyring = "/etc/fleet/keyring"\n'


def server(table: str) -> UpdaterConfig:
    return parse_config((REQUIRED + "[server]\n" + table).encode(), "updater.toml")


def test_server_urls_must_be_https_unless_plain_http_is_allowed() -> None:
    assert server('urls = ["https://fleet.example.net"]').server_urls == (
        "https://fleet.example.net",
    )
    for urls in ('["http://fleet.example.net"]', '["https://a.example", "http://b.example"]'):
        with pytest.raises(ConfigError, match=r"server\.urls: .*plain http.*allow_plain_http"):
            server(f"urls = {urls}")
        with pytest.raises(ConfigError, match=r"server\.urls"):
            server(f"urls = {urls}\nallow_plain_http = false")
        allowed = server(f"urls = {urls}\nallow_plain_http = true")
        assert allowed.allow_plain_http and len(allowed.server_urls) == len(urls.split(","))
    with pytest.raises(ConfigError, match=r"server\.allow_plain_http: must be bool"):
        server('urls = ["http://lab"]\nallow_plain_http = "yes"')
    assert UpdaterConfig().allow_plain_http is False


def test_mirrors_may_be_plain_http_since_every_blob_is_checked_against_the_manifest() -> None:
    config = server('urls = ["https://fleet.example.net"]\nmirrors = ["http://cdn.example/f"]')
    assert config.server_mirrors == ("http://cdn.example/f",)
    assert not config.allow_plain_http


def test_ca_file_is_an_absolute_path() -> None:
    config = server('urls = ["https://fleet"]\nca_file = "/etc/fleet/server-ca.pem"')
    assert config.server_ca_file == Path("/etc/fleet/server-ca.pem")
    assert UpdaterConfig().server_ca_file is None
    for bad in ('"server-ca.pem"', "3", '""'):
        with pytest.raises(ConfigError, match=r"server\.ca_file"):
            server(f"ca_file = {bad}")


def test_the_ca_file_reaches_the_daemon_client_and_the_installer_downloads(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "server-ca.pem"
    config = UpdaterConfig(
        compatible="metrica-rpi4", data_dir=tmp_path / "data",
        server_urls=("https://fleet.example.net",), server_ca_file=ca,
    )  # fmt: skip
    runtime = Runtime(LoadedConfig(config, "test"), EventLog(io.StringIO()))
    assert build_daemon(runtime).client.ca_file == str(ca)
    installer = Installer(config, None, None, None, None)  # type: ignore[arg-type]
    assert installer.http(0.0)["verify"] == str(ca)
    without = Installer(UpdaterConfig(), None, None, None, None)  # type: ignore[arg-type]
    assert "verify" not in without.http(0.0)  # the system's store (requests' own default)


def test_the_lab_device_configuration_allows_plain_http_for_its_loopback_servers(
    tmp_path: Path,
) -> None:
    device = VirtualDevice.__new__(VirtualDevice)  # only its configuration is used
    device.config = UpdaterConfig(compatible="lab", keyring=tmp_path / "keyring")
    text = device.config_toml(extra='[server]\nurls = ["http://127.0.0.1:9"]\n')
    config = parse_config(text.encode(), "lab")
    assert config.server_urls == ("http://127.0.0.1:9",) and config.allow_plain_http
