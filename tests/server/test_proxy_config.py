"""deploy/proxy/haproxy.cfg: HAProxy accepts it, and its limits agree with the server's."""

from __future__ import annotations

import datetime
import re
import subprocess
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.cli import run
from server.settings import DEFAULT_MAX_UPLOAD_BYTES

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
    limit = re.search(r"req\.hdr_val\(content-length\) gt (\d+)", text)
    assert limit and int(limit.group(1)) == DEFAULT_MAX_UPLOAD_BYTES
    # the client's own X-Forwarded-For is replaced, never appended to
    assert "http-request set-header X-Forwarded-For %[src]" in text
    assert "option forwardfor" not in text
