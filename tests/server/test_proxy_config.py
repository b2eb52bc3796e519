"""deploy/proxy/haproxy.cfg: HAProxy accepts it, and its limits agree with the server's."""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import click
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.cli.serve import run
from server.settings import DEFAULT_MAX_UPLOAD_BYTES
from signing.keys import generate_key
from tests.server.conftest import listening_socket
from tests.server.test_tls import Authority, TlsServer
from updater.client import NotEnrolledError, ServerClient

CONFIG = Path(__file__).parents[2] / "deploy" / "proxy" / "haproxy.cfg"
CERT_PATH = "/etc/haproxy/certs/fleet.pem"
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def self_signed_pem(path: Path) -> None:
    """A certificate and its key in one PEM file, as HAProxy's ``crt`` takes them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet.example.net")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("fleet.example.net")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_haproxy_accepts_the_example_configuration(tmp_path: Path) -> None:
    pem = tmp_path / "fleet.pem"
    self_signed_pem(pem)
    text = CONFIG.read_text()
    assert text.count(CERT_PATH) == 1
    config = tmp_path / "haproxy.cfg"
    config.write_text(text.replace(CERT_PATH, str(pem)))
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr


def _seconds(text: str, directive: str) -> float:
    match = re.search(rf"^\s*timeout {directive} (\d+)(ms|s|m|h)\s*$", text, re.MULTILINE)
    assert match, f"timeout {directive} not set"
    return int(match.group(1)) * _UNITS[match.group(2)]


def test_the_proxy_limits_agree_with_the_servers() -> None:
    text = CONFIG.read_text()
    defaults = {p.name: p.default for p in run.params if isinstance(p, click.Option)}
    # the header deadline is the server's: a proxy that waited longer would hold what the
    # server would have dropped, a shorter one would answer before the server's rule
    assert _seconds(text, "http-request") == defaults["header_timeout"]
    # a pause mid-body is the server's to judge (its 408 removes the partial upload)
    assert _seconds(text, "client") > defaults["body_read_timeout"]
    # an upload's answer follows the verification of the whole bundle: the fleet command
    # waits up to an hour for it, so must the proxy
    from server.client import UPLOAD_ANSWER_TIMEOUT_S

    assert _seconds(text, "server") >= UPLOAD_ANSWER_TIMEOUT_S
    # a device's connection outlives the pause between its duties: one TLS handshake, not one
    # a minute, on a metered link
    from updater.config import UpdaterConfig
    from updater.daemon import JITTER

    device = UpdaterConfig()
    pause = max(device.checkin_interval_s, device.heartbeat_interval_s) * (1 + JITTER)
    assert _seconds(text, "http-keep-alive") > pause
    limit = re.search(r"req\.hdr_val\(content-length\) gt (\d+)", text)
    assert limit and int(limit.group(1)) == DEFAULT_MAX_UPLOAD_BYTES
    # the client's own X-Forwarded-For is replaced, never appended to
    assert "http-request set-header X-Forwarded-For %[src]" in text
    assert "option forwardfor" not in text


def test_through_haproxy_a_device_reaches_the_server_and_cannot_name_its_own_address(
    tmp_path: Path, keyring_dir: Path
) -> None:
    """The example as deployed: HAProxy terminates TLS for a server on loopback that believes
    the proxy; a device verifies the proxy's certificate with the fleet's CA, and a client's
    own X-Forwarded-For is replaced by the address the proxy saw."""
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = Authority.create(pki, "fleet-ca")
    cert, key = ca.issue(pki, "proxy")
    pem = pki / "proxy.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    data_dir = tmp_path / "data"
    shutil.copytree(keyring_dir, data_dir / "keyring")
    backend = TlsServer(data_dir, tmp_path / "server.log", "--forwarded-allow-ips", "127.0.0.1")
    front = listening_socket()
    port = front.getsockname()[1]
    text = CONFIG.read_text()
    for old, new in (
        ("bind :443 ", f"bind fd@{front.fileno()} "),
        (CERT_PATH, str(pem)),
        ("server fleet 127.0.0.1:8080", f"server fleet 127.0.0.1:{backend.port}"),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    with open(tmp_path / "haproxy.log", "ab") as log:
        proxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdout=log, stderr=subprocess.STDOUT, pass_fds=[front.fileno()],
        )  # fmt: skip
    front.close()
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # the proxy answers /healthz once the server does
            assert proxy.poll() is None, (tmp_path / "haproxy.log").read_text()
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/healthz", verify=str(ca.pem), timeout=2).ok:
                    break
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.05)  # poll interval, bounded by the deadline
        device = ServerClient([url], generate_key(tmp_path / "device" / "device"), None,
                              ca_file=ca.pem, timeout_s=10.0)  # fmt: skip
        with pytest.raises(NotEnrolledError):  # an answer from the server: no admission
            device.enroll(compatible="metrica-rpi4", hostname="cam-1", token=None)
        forged = requests.get(url + "/api/v1/devices", headers={"X-Forwarded-For": "203.0.113.9"},
                              verify=str(ca.pem), timeout=10)  # fmt: skip
        assert forged.status_code == 401
        clients: list[str] = []
        while time.monotonic() < deadline and not clients:
            for line in (tmp_path / "server.log").read_text().splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("route") == "/api/v1/devices":
                    clients.append(str(entry.get("client")))
            time.sleep(0.05)  # poll interval of the log wait, bounded by the deadline
        assert clients == ["127.0.0.1"]  # the proxy's view, not the header the client sent
    finally:
        proxy.terminate()
        proxy.wait(10)
        backend.stop()
