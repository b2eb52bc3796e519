"""TLS for real: ``fleet server run --tls-cert/--tls-key`` as a process, a CA and certificates
made here, and the two clients that talk to it (the ``fleet`` command, the device's
ServerClient and its blob downloads) verifying the server, or refusing it with a reason."""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleet_core.cli import fleet
from signing.keys import generate_key
from tests.server.conftest import listening_socket
from updater.client import ServerClient, ServerUnavailableError
from updater.errors import DownloadError
from updater.fetch import HttpStream

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass
class Authority:
    """A certificate authority made for one test: its key, its certificate and its PEM file."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        pem = directory / f"{name}.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, pem)

    def issue(
        self,
        directory: Path,
        name: str,
        *,
        ip: str | None = "127.0.0.1",
        dns: str | None = None,
        not_before: datetime.datetime = NOW - DAY,
        not_after: datetime.datetime = NOW + 7 * DAY,
    ) -> tuple[Path, Path]:
        """A server certificate for ``ip`` and/or ``dns``: (cert file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        if ip is not None:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        if dns is not None:
            names.append(x509.DNSName(dns))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path


class TlsServer:
    """``fleet server run --tls-cert --tls-key`` on a socket this test bound (``--fd``)."""

    def __init__(self, data_dir: Path, log: Path, *args: str | Path) -> None:
        self.data_dir = data_dir
        self.log = log
        listener = listening_socket()
        self.port = listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        fd = listener.fileno()
        entry = "from fleet_core.cli import main; main()"
        command = [sys.executable, "-c", entry, "server", "run", "--data-dir", str(data_dir),
                   *map(str, args), "--fd", str(fd)]  # fmt: skip
        try:
            with open(log, "ab") as out:
                self.process = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, pass_fds=[fd]
                )
        finally:
            listener.close()

    def wait_ready(self, ca: Path | None) -> None:
        """Wait until /healthz answers over TLS, verified against ``ca`` (None: not verified,
        for a certificate the test means the clients to refuse)."""
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
        if ca is None:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"server exited {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
                ):
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if tls.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:  # refused, reset, or not yet answering TLS
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up:\n{self.log.read_text()}")
            time.sleep(0.05)  # poll interval of the wait above, bounded by its deadline

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


StartServer = Callable[..., TlsServer]


@pytest.fixture
def data_dir(tmp_path: Path, keyring_dir: Path) -> Path:
    directory = tmp_path / "data"
    shutil.copytree(keyring_dir, directory / "keyring")
    return directory


@pytest.fixture
def start_server(tmp_path: Path, data_dir: Path) -> Iterator[StartServer]:
    started: list[TlsServer] = []

    def start(*args: str | Path, ready_ca: Path | None = None) -> TlsServer:
        server = TlsServer(data_dir, tmp_path / f"server{len(started)}.log", *args)
        started.append(server)
        if ready_ca is not None:
            server.wait_ready(ready_ca)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Authority, Authority]:
    """The fleet's CA, and another one (a wrong CA for the same server)."""
    directory = tmp_path / "pki"
    directory.mkdir()
    return Authority.create(directory, "fleet-ca"), Authority.create(directory, "other-ca")


def cli(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(fleet, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def admin_token(data_dir: Path) -> str:
    code, output = cli("server", "token", "create", "--role", "admin", "--name", "tls",
                       "--data-dir", data_dir)  # fmt: skip
    assert code == 0, output
    return output.splitlines()[0].strip()


def device_client(tmp_path: Path, url: str, **options: object) -> ServerClient:
    key = generate_key(tmp_path / "device" / secrets.token_hex(4))
    return ServerClient([url], key, None, timeout_s=10.0, **options)  # type: ignore[arg-type]


def enrollment_token(data_dir: Path) -> str:
    code, output = cli("server", "enrollment-token", "create", "--uses", "5",
                       "--data-dir", data_dir)  # fmt: skip
    assert code == 0, output
    return output.splitlines()[0].strip()


def test_the_fleet_command_and_a_device_trust_the_server_through_the_fleet_ca_only(
    tmp_path: Path,
    data_dir: Path,
    start_server: StartServer,
    pki: tuple[Authority, Authority],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet_ca, other_ca = pki
    # the environment's CA bundle (what requests takes for the system's store) is another
    # CA's: a configured CA file must win over it, and only it may admit the server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca.pem))
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    cert, key = fleet_ca.issue(tmp_path / "pki", "server")
    token = admin_token(data_dir)
    admission = enrollment_token(data_dir)
    server = start_server("--tls-cert", cert, "--tls-key", key, ready_ca=fleet_ca.pem)
    api = ("--server", server.url, "--token", token)

    code, output = cli("device", "list", "--json", *api, env={"FLEET_CA_FILE": str(fleet_ca.pem)})
    assert code == 0, output
    assert json.loads(output) == []
    code, output = cli("device", "list", *api, env={"FLEET_CA_FILE": str(other_ca.pem)})
    assert code == 1
    assert output.count("\n") == 1, output  # one error line
    assert "TLS handshake failed: unable to get local issuer certificate" in output
    assert f"verified against {other_ca.pem}" in output
    code, output = cli("device", "list", *api, env={"FLEET_CA_FILE": ""})
    assert code == 1 and "verified against the system's CA store" in output, output
    # --ca-file comes first, then $FLEET_CA_FILE, then cli.toml's ca_file
    code, output = cli("device", "list", *api, "--ca-file", fleet_ca.pem,
                       env={"FLEET_CA_FILE": str(other_ca.pem)})  # fmt: skip
    assert code == 0, output
    code, output = cli("device", "list", *api, "--ca-file", other_ca.pem,
                       env={"FLEET_CA_FILE": str(fleet_ca.pem)})  # fmt: skip
    assert code == 1 and f"verified against {other_ca.pem}" in output, output
    (tmp_path / "xdg" / "fleet").mkdir(parents=True)
    (tmp_path / "xdg" / "fleet" / "cli.toml").write_text(f'ca_file = "{fleet_ca.pem}"\n')
    stored = {"FLEET_CA_FILE": "", "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    code, output = cli("device", "list", *api, env=stored)
    assert code == 0, output

    device = device_client(tmp_path, server.url, ca_file=fleet_ca.pem)
    enrolled = device.enroll(compatible="metrica-rpi4", hostname="cam-1", token=admission)
    assert enrolled.device_id == device.device_id
    for trust in (other_ca.pem, None):  # a wrong CA, and the system's store
        stranger = device_client(tmp_path, server.url, ca_file=trust)
        with pytest.raises(ServerUnavailableError, match="TLS handshake failed: unable to get"):
            stranger.enroll(compatible="metrica-rpi4", hostname="cam-2", token=admission)

    # a blob download: verified with the CA file the installer hands down ([server] ca_file)
    body = HttpStream(server.url + "/healthz", verify=str(fleet_ca.pem), retries=0).read()
    assert body
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
        HttpStream(server.url + "/healthz", verify=str(other_ca.pem), retries=0).read()


@pytest.mark.parametrize(
    ("issued", "reason"),
    [
        ({"not_before": NOW - 30 * DAY, "not_after": NOW - DAY}, "certificate has expired"),
        ({"ip": None, "dns": "fleet.example.net"}, "IP address mismatch"),
        ({"ip": "127.0.0.2"}, "IP address mismatch"),
    ],
    ids=["expired", "another-host", "another-address"],
)
def test_an_expired_or_wrong_host_certificate_is_refused_by_both_clients(
    tmp_path: Path,
    data_dir: Path,
    start_server: StartServer,
    pki: tuple[Authority, Authority],
    issued: dict[str, object],
    reason: str,
) -> None:
    fleet_ca = pki[0]
    cert, key = fleet_ca.issue(tmp_path / "pki", "server", **issued)  # type: ignore[arg-type]
    token = admin_token(data_dir)
    server = start_server("--tls-cert", cert, "--tls-key", key)
    server.wait_ready(None)  # whatever the certificate: the clients below judge it

    env = {"FLEET_CA_FILE": str(fleet_ca.pem)}
    code, output = cli("device", "list", "--server", server.url, "--token", token, env=env)
    assert code == 1 and f"TLS handshake failed: {reason}" in output, output
    device = device_client(tmp_path, server.url, ca_file=fleet_ca.pem)
    with pytest.raises(ServerUnavailableError, match=f"TLS handshake failed: {reason}"):
        device.enroll(compatible="metrica-rpi4", hostname="cam-1", token=None)


def test_a_bad_certificate_or_key_is_one_error_line_and_nothing_listens(
    tmp_path: Path, data_dir: Path, start_server: StartServer, pki: tuple[Authority, Authority]
) -> None:
    fleet_ca, other_ca = pki
    cert, key = fleet_ca.issue(tmp_path / "pki", "server")
    _, other_key = other_ca.issue(tmp_path / "pki", "other")
    missing = tmp_path / "pki" / "missing.key"
    cases = [
        (("--tls-cert", cert, "--tls-key", other_key), f"--tls-key {other_key}: not the private "
         f"key of --tls-cert {cert}"),
        (("--tls-cert", cert, "--tls-key", missing), f"--tls-key {missing}: cannot read"),
        (("--tls-cert", key, "--tls-key", key), f"--tls-cert {key}: not a PEM certificate"),
        (("--tls-cert", cert, "--tls-key", cert), f"--tls-key {cert}: not an unencrypted PEM"),
        (("--tls-cert", cert), "TLS needs both --tls-cert and --tls-key"),
        (("--forwarded-allow-ips", "10.0.0.1,proxy"), "--forwarded-allow-ips: 'proxy' is not"),
    ]  # fmt: skip
    for args, message in cases:
        server = start_server(*args)
        assert server.process.wait(30) == 1
        lines = server.log.read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), lines
        with pytest.raises(requests.ConnectionError):  # the socket died with the process
            requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=2)
        server.log.unlink()


def test_proxy_headers_are_believed_only_from_the_configured_addresses(
    tmp_path: Path, data_dir: Path, start_server: StartServer, pki: tuple[Authority, Authority]
) -> None:
    fleet_ca = pki[0]
    cert, key = fleet_ca.issue(tmp_path / "pki", "server")
    tls = ("--tls-cert", cert, "--tls-key", key)
    forged = {"X-Forwarded-For": "203.0.113.9"}

    def logged_client(server: TlsServer) -> str:
        """The client address the access log names for a request that says it was forwarded
        (a route of its own: the readiness probes ask /healthz)."""
        answer = requests.get(server.url + "/api/v1/devices", headers=forged,
                              verify=str(fleet_ca.pem), timeout=10)  # fmt: skip
        assert answer.status_code == 401
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in server.log.read_text().splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("route") == "/api/v1/devices" and "client" in entry:
                    return str(entry["client"])
            time.sleep(0.05)  # poll interval of the log wait, bounded by its deadline
        pytest.fail(f"no access log line:\n{server.log.read_text()}")

    default = start_server(*tls, ready_ca=fleet_ca.pem)
    assert logged_client(default) == "127.0.0.1"  # loopback is no proxy unless named
    default.stop()
    other = start_server(*tls, "--forwarded-allow-ips", "10.0.0.0/8", ready_ca=fleet_ca.pem)
    assert logged_client(other) == "127.0.0.1"
    other.stop()
    proxied = start_server(*tls, "--forwarded-allow-ips", "127.0.0.1", ready_ca=fleet_ca.pem)
    assert logged_client(proxied) == "203.0.113.9"


def test_the_listening_socket_speaks_only_tls(
    tmp_path: Path, data_dir: Path, start_server: StartServer, pki: tuple[Authority, Authority]
) -> None:
    fleet_ca = pki[0]
    cert, key = fleet_ca.issue(tmp_path / "pki", "server")
    server = start_server("--tls-cert", cert, "--tls-key", key, ready_ca=fleet_ca.pem)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = plain.recv(4096)
    assert not answer.startswith(b"HTTP/")  # no plain-HTTP answer: TLS or nothing
