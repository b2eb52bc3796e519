"""How ``fleet server run`` meets its clients: TLS directly, and which proxies it believes.

The server terminates TLS itself when given ``--tls-cert``/``--tls-key`` (PEM files handed to
uvicorn), or sits behind a reverse proxy that does (``deploy/proxy/``); either way is described
in docs/tls.md. A proxy's ``X-Forwarded-For``/``X-Forwarded-Proto`` are believed only from the
peers named by ``--forwarded-allow-ips`` (none by default). The client address is logged (the
access log, slow-client warnings), and one decision depends on it: the web console's limit on
failed sign-ins is counted per address (server/ui/pages_login.py), so behind a proxy missing
from ``--forwarded-allow-ips`` every browser shares the proxy's count.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from server.errors import SettingsError


@dataclass(frozen=True)
class TransportSettings:
    """The TLS certificate and key (both or neither) and the trusted proxies. Build with
    :meth:`create`, which checks the files before anything listens."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    forwarded_allow_ips: tuple[str, ...] = ()

    @classmethod
    def create(
        cls, tls_cert: Path | None, tls_key: Path | None, forwarded_allow_ips: str = ""
    ) -> TransportSettings:
        """Raises:
        SettingsError: one of cert and key without the other; a file missing or unreadable;
            the key not the certificate's; an address that is neither an IP address nor a
            network.
        """
        if (tls_cert is None) != (tls_key is None):
            raise SettingsError("TLS needs both --tls-cert and --tls-key")
        if tls_cert is not None and tls_key is not None:
            _check_pair(tls_cert, tls_key)
        trusted: list[str] = []
        for item in (part.strip() for part in forwarded_allow_ips.split(",")):
            if not item:
                continue
            try:
                trusted.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise SettingsError(
                    f"--forwarded-allow-ips: {item!r:.60} is not an IP address or network"
                ) from None
        return cls(tls_cert, tls_key, tuple(trusted))

    def uvicorn_options(self) -> dict[str, object]:
        """uvicorn.Config's keyword arguments for this transport."""
        options: dict[str, object] = {
            "proxy_headers": bool(self.forwarded_allow_ips),
            "forwarded_allow_ips": list(self.forwarded_allow_ips),
        }
        if self.tls_cert is not None:
            options.update(ssl_certfile=str(self.tls_cert), ssl_keyfile=str(self.tls_key))
        return options


def _check_pair(cert: Path, key: Path) -> None:
    """The certificate and key as uvicorn will load them, each named when it is the problem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    texts: dict[str, bytes] = {}
    for path, name in ((cert, "--tls-cert"), (key, "--tls-key")):
        try:
            texts[name] = path.read_bytes()
        except OSError as err:
            raise SettingsError(f"{name} {path}: cannot read: {err.strerror}") from None
    try:
        x509.load_pem_x509_certificate(texts["--tls-cert"])
    except ValueError:
        raise SettingsError(f"--tls-cert {cert}: not a PEM certificate") from None
    try:
        serialization.load_pem_private_key(texts["--tls-key"], password=None)
    except (ValueError, TypeError):
        raise SettingsError(f"--tls-key {key}: not an unencrypted PEM private key") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise SettingsError(
                f"--tls-key {key}: not the private key of --tls-cert {cert}"
            ) from None
        raise SettingsError(f"--tls-cert {cert} / --tls-key {key}: {err.reason or err}") from None
