"""An in-memory release server speaking the server side of ``docs/device-protocol.md``.

The device side (``updater/client.py``, ``updater/daemon.py``) is tested against the real
server (``tests/integration/test_device_protocol.py``: the application on SQLite, in process);
this simulator is kept ONLY for the faults the real server cannot be made to produce:

- a server that is down, hangs up, stalls past the device's timeout, or answers 5xx or an
  arbitrary status (``faults``): failover, backoff, outages, a failing events endpoint;
- answers signed by the server's key but never made by the real server: an unknown answer
  ``format``, a ``checkin_interval_s`` outside what it sends, rewritten before signing
  (``answer_hook``; a server that answers every check-in anew: ``forget_etags``);
- a ``Date`` header far from the device's clock (``clock``);
- a server that forgets the devices it enrolled (``forget_devices``);
- blobs missing or with wrong bytes, and an assignment withdrawn while its blob is being
  fetched (``blobs``, ``blob_hook``), and an assignment of a release for other devices, which
  the real server refuses to make;
- a server that is turned off under the ``fleet-updater daemon --once`` command.

(The daemon's systemd test in ``tests/unit/test_daemon.py`` also runs against it, as the
server at hand in the unit tier: nothing in it depends on what the server answers.)

It serves real HTTP on 127.0.0.1 (so headers, 304s, Range and dropped connections behave as on
the wire), keeps its state in plain dicts, and has knobs to misbehave.

    with ServerSimulator(server_key) as server:
        server.add_token("tok", uses=1)
        release = server.add_release(manifest, signatures, blobs)
        server.assign(device_id, release)
        ... server.url ...

Knobs (``server.faults``): ``down`` (every connection is closed without an answer),
``status`` (every API request answers this, e.g. 500), ``stall_s`` (wait before answering),
``next_statuses`` (a queue of statuses for the next API requests), ``lose_answers`` (handle
the next requests, then hang up: the device cannot know they were stored). ``answer_hook``
rewrites a check-in answer document before it is signed (a stale nonce, another device), and
``sign_with`` is the key answers are signed with (a forger's key).

Server rules enforced, as the protocol states them: unknown request fields → 422; the
enrollment proof and the session signature are checked; a token is admitted ``uses`` times and
re-enrolling a known key costs nothing; challenges are single use; a session token is bound to
its device (403 for another's); an event is stored only if its ``seq`` is above the highest
stored for the device.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import secrets
import tarfile
import threading
import time
from base64 import b64encode
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from chaos.http_faults import QuietHTTPServer
from signing.keys import SigningKey
from signing.signature import sign, signed_message

API = "/api/v1"


@dataclass(frozen=True)
class SimRelease:
    release_id: int
    version: str
    security_version: int
    manifest: bytes
    manifest_sig: bytes
    blobs: Mapping[str, tuple[str, bytes]]  # sha256 -> (slot class, stored bytes)

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest).hexdigest()

    @property
    def image_blobs(self) -> list[str]:
        """The SHA-256 of each image's stored bytes (the other blobs are chunk indexes)."""
        return [image["sha256"] for image in json.loads(self.manifest)["images"]]


@dataclass
class Faults:
    down: bool = False
    status: int | None = None
    stall_s: float = 0.0
    next_statuses: deque[int] = field(default_factory=deque)
    lose_answers: int = 0  # process this many API requests, then hang up instead of answering


@dataclass
class SimDevice:
    public_key: str
    compatible: str
    hostname: str
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    events: dict[int, dict[str, Any]] = field(default_factory=dict)  # by seq
    checkins: int = 0


def split_bundle(path: Path) -> tuple[bytes, bytes, dict[str, bytes]]:
    """``manifest.json``, ``manifest.sig`` and the image blobs by SHA-256, as a server keeps
    a release."""
    with tarfile.open(path) as archive:
        members = {}
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            assert handle is not None
            members[member.name] = handle.read()
    manifest, signatures = members.pop("manifest.json"), members.pop("manifest.sig")
    return manifest, signatures, {hashlib.sha256(b).hexdigest(): b for b in members.values()}


class FakeClock:
    """A monotonic clock for tests: ``sleep`` moves it forward at once."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class ServerSimulator:
    """See the module docstring. ``clock`` is the server's wall clock (its ``Date`` header)."""

    def __init__(
        self,
        key: SigningKey,
        *,
        clock: Callable[[], float] = time.time,
        shares: ServerSimulator | None = None,
    ) -> None:
        """``shares``: another simulator whose database this one uses (two server processes
        behind two URLs); requests, faults and hooks stay per server."""
        self.key = key
        self.sign_with: SigningKey = key
        self.clock = clock
        self.faults = Faults()
        self.answer_hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.blob_hook: Callable[[str], None] | None = None  # called with a blob's path
        # the heartbeat's optional fields this server knows (fewer: a server from before them)
        self.heartbeat_optional = {"role", "tags", "metrics_address", "throttled"}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.tokens: dict[str, int]  # sha256 of the token -> uses left
        self.preauthorized: set[str]  # public keys, hex
        self.devices: dict[str, SimDevice]
        self.assignments: dict[str, SimRelease | None]
        self.releases: dict[int, SimRelease]
        self.blobs: dict[str, bytes]
        self.challenges: dict[str, str]  # challenge -> device id
        self.sessions: dict[str, str]  # token -> device id
        self._etags: dict[str, int]
        self._lock: threading.RLock
        if shares is not None:
            self._lock = shares._lock
            self.tokens, self.preauthorized = shares.tokens, shares.preauthorized
            self.devices, self.assignments = shares.devices, shares.assignments
            self.releases, self.blobs = shares.releases, shares.blobs
            self.challenges, self.sessions = shares.challenges, shares.sessions
            self._etags = shares._etags
        else:
            self._lock = threading.RLock()
            self.tokens, self.preauthorized = {}, set()
            self.devices, self.assignments = {}, {}
            self.releases, self.blobs = {}, {}
            self.challenges, self.sessions = {}, {}
            self._etags = {}
        self._server = QuietHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> ServerSimulator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # --- what an operator does -----------------------------------------------------------

    def add_token(self, token: str, uses: int = 1) -> None:
        self.tokens[hashlib.sha256(token.encode()).hexdigest()] = uses

    def preauthorize(self, public_key_hex: str) -> None:
        self.preauthorized.add(public_key_hex)

    def add_release(
        self,
        manifest: bytes,
        signatures: bytes,
        blobs: Mapping[str, bytes],
        *,
        version: str = "2.0.0",
        security_version: int = 1,
        slot_class: str = "rootfs",
    ) -> SimRelease:
        with self._lock:
            release = SimRelease(
                len(self.releases) + 1, version, security_version, manifest, signatures,
                {sha: (slot_class, data) for sha, data in blobs.items()},
            )  # fmt: skip
            self.releases[release.release_id] = release
            self.blobs.update(blobs)
            return release

    def add_bundle(self, path: Path, *, version: str, security_version: int = 1) -> SimRelease:
        manifest, signatures, blobs = split_bundle(path)
        return self.add_release(
            manifest, signatures, blobs, version=version, security_version=security_version
        )

    def assign(self, device_id: str, release: SimRelease | None) -> None:
        with self._lock:
            if self.assignments.get(device_id) != release:
                self._etags[device_id] = self._etags.get(device_id, 0) + 1
            self.assignments[device_id] = release

    def forget_devices(self) -> None:
        """Lose the device table (a server restored from an old backup)."""
        with self._lock:
            self.devices.clear()
            self.sessions.clear()

    def api_requests(self, path_part: str = "") -> list[tuple[str, str, dict[str, str]]]:
        return [r for r in self.requests if r[1].startswith(API) and path_part in r[1]]

    def forget_etags(self) -> None:
        """Make every device's next check-in a full answer (as a changed answer would)."""
        with self._lock:
            for device_id in list(self.devices):
                self._etags[device_id] = self._etags.get(device_id, 0) + 1

    def etag(self, device_id: str) -> str:
        return f"a{self._etags.get(device_id, 0)}-{device_id[:8]}"

    # --- the protocol --------------------------------------------------------------------

    def _enroll(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        _fields(body, {"public_key", "compatible", "hostname", "proof"}, {"enrollment_token"})
        public_hex, proof = body["public_key"], body["proof"]
        public_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        try:
            public_key.verify(
                bytes.fromhex(proof),
                signed_message(
                    "device-enroll",
                    f"enroll\n{public_hex}\n{body['compatible']}\n{body['hostname']}".encode(),
                ),
            )
        except InvalidSignature:
            return 422, {"error": "bad_proof", "detail": "proof does not verify"}
        device_id = hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()
        if device_id not in self.devices:
            token = body.get("enrollment_token")
            digest = hashlib.sha256(token.encode()).hexdigest() if token else None
            if digest is not None and self.tokens.get(digest, 0) > 0:
                self.tokens[digest] -= 1
            elif public_hex not in self.preauthorized:
                return 403, {"error": "not_authorized", "detail": "no valid token or key"}
            self.devices[device_id] = SimDevice(public_hex, body["compatible"], body["hostname"])
        raw = self.key.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return 200, {"device_id": device_id, "server_keys": [raw.hex()]}

    def _challenge(self, device_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        _fields(body, set())
        if device_id not in self.devices:
            return 404, {"error": "unknown_device", "detail": "enroll first"}
        challenge = secrets.token_hex(32)
        self.challenges[challenge] = device_id
        return 200, {"challenge": challenge, "expires_in": 60}

    def _session(self, device_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        _fields(body, {"challenge", "signature"})
        device = self.devices.get(device_id)
        if device is None:
            return 404, {"error": "unknown_device", "detail": "enroll first"}
        if self.challenges.pop(body["challenge"], None) != device_id:
            return 401, {"error": "bad_challenge", "detail": "unknown or used challenge"}
        public_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(device.public_key))
        message = f"session\n{device_id}\n{body['challenge']}".encode()
        try:
            public_key.verify(
                bytes.fromhex(body["signature"]), signed_message("device-session", message)
            )
        except InvalidSignature:
            return 401, {"error": "bad_signature", "detail": "session signature"}
        token = secrets.token_hex(16)
        self.sessions[token] = device_id
        return 200, {"token": token, "expires_in": 3600}

    def _checkin(
        self, device_id: str, body: dict[str, Any], if_none_match: str | None
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        _fields(body, {"nonce"})
        device = self.devices[device_id]
        device.checkins += 1
        etag = self.etag(device_id)
        if if_none_match == f'"{etag}"':
            return 304, None, {"ETag": f'"{etag}"'}
        release = self.assignments.get(device_id)
        assignment = None
        if release is not None:
            assignment = {
                "release_id": release.release_id,
                "version": release.version,
                "security_version": release.security_version,
                "manifest": b64encode(release.manifest).decode(),
                "manifest_sig": b64encode(release.manifest_sig).decode(),
                "blobs": [
                    {"slot_class": cls, "sha256": sha, "size": len(data), "url": f"/blobs/{sha}"}
                    for sha, (cls, data) in release.blobs.items()
                ],
            }
        document = {
            "format": 1, "device_id": device_id, "nonce": body["nonce"], "etag": etag,
            "assignment": assignment,
        }  # fmt: skip
        if self.answer_hook is not None:
            document = self.answer_hook(document)
        answer = json.dumps(document)
        envelope = sign(answer.encode(), [self.sign_with], "assignment")
        signed = {"answer": answer, "signatures": envelope.to_bytes().decode()}
        return 200, signed, {"ETag": f'"{etag}"'}

    def _heartbeat(self, device_id: str, body: dict[str, Any]) -> tuple[int, None]:
        _fields(body, HEARTBEAT_FIELDS, self.heartbeat_optional)
        for slot in body["slots"].values():
            _fields(slot, {"status", "version"})
        self.devices[device_id].heartbeats.append(body)
        return 204, None

    def _events(self, device_id: str, body: dict[str, Any]) -> tuple[int, None]:
        _fields(body, {"events"})
        events = body["events"]
        if not isinstance(events, list) or len(events) > 100:
            raise _Unprocessable("events: a list of at most 100")
        for event in events:
            _fields(event, {"event", "seq"}, {"fields"})
        stored = self.devices[device_id].events
        for event in sorted(events, key=lambda e: e["seq"]):
            if event["seq"] > max(stored, default=-1):  # at or below the highest: a resend
                stored[event["seq"]] = event
        return 204, None

    # --- HTTP ----------------------------------------------------------------------------

    def _route(
        self, method: str, path: str, headers: Mapping[str, str], body: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        parts = path.removeprefix(API).strip("/").split("/")
        if method != "POST" or parts[0] != "devices":
            return 404, {"error": "not_found", "detail": path}, {}
        if parts[1:] == ["enroll"]:
            status, answer = self._enroll(body)
            return status, answer, {}
        if len(parts) != 3:
            return 404, {"error": "not_found", "detail": path}, {}
        device_id, action = parts[1], parts[2]
        if action == "challenge":
            return (*self._challenge(device_id, body), {})
        if action == "session":
            return (*self._session(device_id, body), {})
        bearer = headers.get("Authorization", "").removeprefix("Bearer ")
        owner = self.sessions.get(bearer)
        if owner is None:
            return 401, {"error": "no_session", "detail": "get a new session"}, {}
        if owner != device_id:
            return 403, {"error": "forbidden", "detail": "not your device"}, {}
        if action == "checkin":
            return self._checkin(device_id, body, headers.get("If-None-Match"))
        if action == "heartbeat":
            return (*self._heartbeat(device_id, body), {})
        if action == "events":
            return (*self._events(device_id, body), {})
        return 404, {"error": "not_found", "detail": path}, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        simulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def date_time_string(self, timestamp: float | None = None) -> str:
                return email.utils.formatdate(simulator.clock(), usegmt=True)

            def _answer(
                self, status: int, document: Any, headers: Mapping[str, str] | None = None
            ) -> None:
                data = b"" if document is None else json.dumps(document).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if status not in (204, 304):
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if status not in (204, 304):
                    self.wfile.write(data)

            def _fault(self) -> bool:
                faults = simulator.faults
                if faults.stall_s:
                    time.sleep(faults.stall_s)
                if faults.down:
                    self.close_connection = True
                    return True
                status = faults.status
                if status is None and faults.next_statuses:
                    status = faults.next_statuses.popleft()
                if status is not None:
                    self._answer(status, {"error": "injected", "detail": f"HTTP {status}"})
                    return True
                return False

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with simulator._lock:
                    simulator.requests.append(("POST", self.path, _headers(self.headers)))
                if self._fault():
                    return
                try:
                    if length > 64 * 1024:
                        raise _Unprocessable("request larger than 64 KiB")
                    body = json.loads(raw or b"{}")
                    if not isinstance(body, dict):
                        raise _Unprocessable("not a JSON object")
                    with simulator._lock:
                        status, document, headers = simulator._route(
                            "POST", self.path, _headers(self.headers), body
                        )
                except (_Unprocessable, ValueError, KeyError, TypeError) as err:
                    status, document, headers = 422, {"error": "malformed", "detail": str(err)}, {}
                with simulator._lock:
                    lose = simulator.faults.lose_answers > 0
                    simulator.faults.lose_answers -= lose
                if lose:
                    self.close_connection = True
                    return
                self._answer(status, document, headers)

            def do_GET(self) -> None:
                with simulator._lock:
                    simulator.requests.append(("GET", self.path, _headers(self.headers)))
                if simulator.faults.down:
                    self.close_connection = True
                    return
                if simulator.blob_hook is not None:
                    simulator.blob_hook(self.path)
                data = simulator.blobs.get(self.path.removeprefix("/blobs/"))
                if not self.path.startswith("/blobs/") or data is None:
                    self._answer(404, {"error": "not_found", "detail": self.path})
                    return
                etag = f'"{self.path.removeprefix("/blobs/")}"'
                start, end = 0, len(data)
                wanted = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                partial = wanted is not None and (if_range is None or if_range == etag)
                if partial and wanted is not None:
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start = int(first)
                    end = int(last) + 1 if last else len(data)
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(206 if partial else 200)
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                if partial:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                self.wfile.write(data[start:end])

        return Handler


HEARTBEAT_FIELDS = {
    "version", "booted", "primary", "trial", "slots", "updater_state", "health",
    "temperature_c", "free_space_mb", "uptime_s", "clock", "clock_skew_s", "safe_mode",
}  # fmt: skip


def _headers(message: Any) -> dict[str, str]:
    """Request headers with canonical capitalisation (``If-None-Match``, ``Authorization``)."""
    return {str(k).title(): str(v) for k, v in message.items()}


class _Unprocessable(Exception):
    pass


def _fields(
    body: Any, required: set[str], optional: frozenset[str] | set[str] = frozenset()
) -> None:
    if not isinstance(body, dict):
        raise _Unprocessable("not a JSON object")
    unknown = set(body) - required - optional
    missing = required - set(body)
    if unknown:  # as the server's models say it (pydantic's extra_forbidden at its location)
        raise _Unprocessable(f"body.{sorted(unknown)[0]}: Extra inputs are not permitted")
    if missing:
        raise _Unprocessable(f"missing {sorted(missing)}")
