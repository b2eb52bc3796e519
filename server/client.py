"""The operator commands' side of the API: where the server is, which token, and the calls.

The server URL and the token come from, in order: the command's ``--server`` / ``--token``,
the environment (``FLEET_SERVER``, ``FLEET_TOKEN``), then the config file
``$XDG_CONFIG_HOME/fleet/cli.toml`` (default ``~/.config/fleet/cli.toml``)::

    server = "https://fleet.example.net"
    token = "fleet_op_..."
    ca_file = "/etc/fleet/server-ca.pem"   # optional

An ``https://`` server's certificate is verified against a CA file when one is set (the
command's ``--ca-file``, ``FLEET_CA_FILE``, then the config file's ``ca_file``), against the
system's CA store otherwise.

Imports only ``requests`` (lazily), never the server's web stack.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fleet_core.tls import tls_reason
from server.errors import (
    ClientConfigError,
    RequestRejectedError,
    ServerError,
    ServerUnreachableError,
)

if TYPE_CHECKING:
    import requests

SERVER_ENV = "FLEET_SERVER"
TOKEN_ENV = "FLEET_TOKEN"  # noqa: S105 (the variable's name, not a secret)
CA_FILE_ENV = "FLEET_CA_FILE"
TIMEOUT_S = 30.0
UPLOAD_CHUNK = 1024 * 1024
UPLOAD_ANSWER_TIMEOUT_S = 3600.0


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the ``fleet`` command's config file is."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleet" / "cli.toml"


@dataclass(frozen=True)
class ClientConfig:
    """The server to talk to and the operator token to use."""

    server: str
    token: str
    ca_file: Path | None = None  # verifies an https:// server; None: the system's CA store

    @classmethod
    def resolve(
        cls,
        server: str | None,
        token: str | None,
        environ: Mapping[str, str] = os.environ,
        *,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> ClientConfig:
        """Fill what the flags left open from the environment, then the config file.

        Raises:
            ClientConfigError: the config file is malformed, or no server URL or token is set.
        """
        server = server or environ.get(SERVER_ENV)
        token = token or environ.get(TOKEN_ENV)
        ca_file = (None if ca_file is None else os.fspath(ca_file)) or environ.get(CA_FILE_ENV)
        if not server or not token or not ca_file:
            stored = _read_config(config_path(environ))
            server = server or stored.get("server")
            token = token or stored.get("token")
            ca_file = ca_file or stored.get("ca_file")
        if not server:
            raise ClientConfigError(
                f"no server: give --server, set {SERVER_ENV}, or set 'server' in "
                f"{config_path(environ)}"
            )
        if not server.startswith(("http://", "https://")):
            raise ClientConfigError(f"server {server!r}: must be an http:// or https:// URL")
        if not token:
            raise ClientConfigError(
                f"no operator token: give --token, set {TOKEN_ENV}, or set 'token' in "
                f"{config_path(environ)}"
            )
        if ca_file is not None and not Path(ca_file).is_file():
            raise ClientConfigError(f"CA file {ca_file!r}: no such file")
        return cls(server.rstrip("/"), token, None if ca_file is None else Path(ca_file))


def _read_config(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        document = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ClientConfigError(f"{path}: cannot read: {err}") from err
    unknown = sorted(set(document) - {"server", "token", "ca_file"})
    if unknown:
        raise ClientConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    for key, value in document.items():
        if not isinstance(value, str):
            raise ClientConfigError(f"{path}: '{key}' must be a string")
    return dict(document)


class ServerAnswerError(ServerError):
    """The server answered, but not what a Metrica Fleet server sends: not JSON, not a JSON
    object, or an object without a field the command reads (a proxy, a captive portal, another
    service on that port, or a server of another version)."""


NOT_OURS = "not what a Metrica Fleet server sends (is --server the right URL and port?)"


class Answer(dict[str, Any]):
    """A JSON object the server answered (each object within it too): reading a field it lacks
    is a :class:`ServerAnswerError` naming the request, rather than a ``KeyError`` deep in a
    command. (``.get`` reads an optional field as usual.)"""

    def __init__(self, fields: Mapping[str, Any], where: str) -> None:
        super().__init__(fields)
        self.where = where

    def __missing__(self, key: str) -> Any:
        raise ServerAnswerError(f"{self.where}: the server's answer has no {key!r}: {NOT_OURS}")

    def require(self, *keys: str) -> Answer:
        """Itself, once each of ``keys`` is there (for an answer printed as it is, with --json,
        which a command would otherwise not read)."""
        for key in keys:
            self[key]  # read: a missing one raises (__missing__)
        return self


def decode_answer(content: bytes, where: str) -> Answer:
    """The JSON object in an answer's body (``where``: the request, for the error), every object
    in it an :class:`Answer`.

    Raises:
        ServerAnswerError: not JSON, or JSON but not an object.
    """
    try:
        document = json.loads(content, object_hook=lambda fields: Answer(fields, where))
    except ValueError:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        start = " ".join(content[:40].decode("utf-8", "replace").split())
        raise ServerAnswerError(
            f"{where}: the server's answer is not JSON (it starts {start!r}): {NOT_OURS}"
        ) from None
    if not isinstance(document, Answer):
        kind = "null" if document is None else f"a JSON {type(document).__name__}"
        raise ServerAnswerError(
            f"{where}: the server's answer is {kind} where a JSON object belongs: {NOT_OURS}"
        )
    return document


class ProgressReader:
    """A file read in chunks, reporting each chunk's size; sized, so it is sent with a
    Content-Length rather than chunked."""

    def __init__(self, handle: BinaryIO, size: int, report: Callable[[int], None]) -> None:
        self._handle = handle
        self._size = size
        self._report = report

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._report(len(chunk))
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(UPLOAD_CHUNK):
            yield chunk


class ApiClient:
    """Calls to the server's operator API; every failure is one :class:`ServerError` line."""

    def __init__(self, config: ClientConfig) -> None:
        # imported here: commands that never talk to a server do not pay for requests
        import requests

        self._requests = requests
        self.config = config
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {config.token}"

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self.config.server + path
        kwargs.setdefault("timeout", TIMEOUT_S)
        if self.config.ca_file is not None:
            # per request: requests lets $REQUESTS_CA_BUNDLE override a session's verify
            kwargs["verify"] = str(self.config.ca_file)
        try:
            response = self._session.request(method, url, **kwargs)
        except self._requests.exceptions.SSLError as err:
            raise ServerUnreachableError(
                f"{method} {url}: TLS handshake failed: {tls_reason(err)} (the server's "
                f"certificate is {self._trust()})"
            ) from err
        except self._requests.ConnectionError as err:
            uploading = kwargs.get("data") is not None
            raise ServerUnreachableError(
                f"{method} {url}: {connection_problem(err, uploading)}"
            ) from err
        except self._requests.RequestException as err:
            raise ServerUnreachableError(f"{method} {url}: {err}") from err
        if response.status_code >= 400:
            code, detail = _error_of(response)
            raise RequestRejectedError(
                f"{method} {path}: {response.status_code} {code}: {detail}",
                status=response.status_code,
                code=code,
            )
        return response

    def _trust(self) -> str:
        if self.config.ca_file is None:
            return f"verified against the system's CA store (set {CA_FILE_ENV} for another CA)"
        return f"verified against {self.config.ca_file}"

    def _answer(self, method: str, path: str, **kwargs: Any) -> Answer:
        """The one place answers are decoded: a JSON object, or a :class:`ServerAnswerError`."""
        response = self._call(method, path, **kwargs)
        return decode_answer(response.content, f"{method} {self.config.server + path}")

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Answer:
        return self._answer("GET", path, params=params)

    def post(self, path: str, document: Mapping[str, Any]) -> Answer:
        return self._answer("POST", path, json=document)

    def delete(self, path: str) -> Answer:
        return self._answer("DELETE", path)

    def upload(self, path: str, bundle: Path, report: Callable[[int], None]) -> Answer:
        """POST the file ``bundle`` as the request body, streamed, calling ``report`` per chunk."""
        size = bundle.stat().st_size
        with open(bundle, "rb") as handle:
            body = ProgressReader(handle, size, report)
            return self._answer(
                "POST",
                path,
                data=body,
                headers={"Content-Type": "application/octet-stream"},
                # the server verifies the whole bundle before it answers
                timeout=(TIMEOUT_S, UPLOAD_ANSWER_TIMEOUT_S),
            )


def connection_problem(err: BaseException, uploading: bool) -> str:
    """What a failed connection was, in words: refused, a name not found, or cut on the way
    (during an upload, most likely the server's upload limit)."""
    import urllib3.exceptions

    reason = getattr(err.args[0], "reason", None) if err.args else None
    # NameResolutionError is urllib3 2's (1.26 reports the same as a NewConnectionError)
    unresolved = getattr(urllib3.exceptions, "NameResolutionError", ())
    if isinstance(reason, unresolved):
        return "connection failed: the server's host name does not resolve"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):  # (a ConnectTimeoutError)
        refused = "refused" in str(reason).lower()
        return "connection failed: " + (
            "refused (is the server running, on this address and port?)"
            if refused
            else "the server cannot be reached"
        )
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "connection failed: no answer to the connection (timed out)"
    if uploading:
        return (
            "connection cut during the upload (a server refuses a bundle above its upload "
            "limit by closing the connection)"
        )
    return f"connection cut ({type(err).__name__})"


def _error_of(response: requests.Response) -> tuple[str, str]:
    try:
        document = response.json()
        return str(document["error"]), str(document["detail"])
    except (ValueError, KeyError, TypeError):
        if "html" in response.headers.get("Content-Type", "").lower():  # a proxy's or a portal's
            return "error", f"{response.reason or 'no reason given'} (an HTML page: {NOT_OURS})"
        return "error", " ".join(response.text.split())[:200] or response.reason
