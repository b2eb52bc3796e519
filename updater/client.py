"""The device's side of the device protocol (``docs/device-protocol.md``, version 1).

:class:`ServerClient` enrolls the device, keeps a session per server, checks in, and sends
heartbeats and events. It never sleeps and never retries on its own schedule: each call is one
attempt (on one URL, or on the primary and then the active URL while the primary is being
probed), and :meth:`ServerClient.retry_delay_s` tells the caller when to try again. The rules
that decide whether a check-in answer is trusted are a pure function, :func:`verify_answer`.

Failover, over ``urls`` in order (the first is the primary):

- requests go to the *active* URL; the first failure (no answer, a timeout, a 5xx, an answer
  that does not verify) starts its *silence*;
- once the active URL has been silent for ``failover_after_s - timeout_s``, the next request
  goes to the next URL; since one request lasts at most ``timeout_s``, the device talks to the
  next URL at the latest ``failover_after_s`` after the active one went silent. While some URL
  of the outage is untried, :meth:`~ServerClient.retry_delay_s` never waits past that moment;
- once every URL has failed, retries back off exponentially with full jitter
  (:func:`updater.fetch.backoff_delay`) up to ``max_backoff_s``, so a fleet that lost its
  servers does not come back all at once;
- while another URL is active, the primary is probed every ``probe_primary_every_s``: the next
  request goes to the primary first and, if it answers, the primary is active again.

A 4xx answer is an answer: the server is alive, the request was refused
(:class:`ServerRejectedError`). A ``401`` drops the session and the request is sent once more
with a new one.

Nothing here is persisted: sessions, the last verified answer and its ETag live in memory; a
restarted daemon asks for a full answer again.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import json
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urljoin

from cryptography.hazmat.primitives import serialization

from fleet_core.tls import tls_reason
from signing.errors import SigningError
from signing.keyring import Keyring
from signing.keys import SigningKey
from signing.signature import SignatureEnvelope, signed_message
from updater.errors import UpdaterError
from updater.fetch import backoff_delay
from updater.log import EventSink

if TYPE_CHECKING:
    import requests

API_PREFIX = "/api/v1"
ENROLL_PURPOSE = "device-enroll"
SESSION_PURPOSE = "device-session"
ASSIGNMENT_PURPOSE = "assignment"
ANSWER_FORMAT = 1
MAX_REQUEST_BYTES = 64 * 1024
MAX_EVENTS_PER_REQUEST = 100
SESSION_MARGIN_S = 30.0  # renew a session this long before the server would expire it
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NONCE = re.compile(r"[0-9a-f]{32,64}")
_T = TypeVar("_T")


class ServerError(UpdaterError):
    """Base of the errors of talking to the release server."""


class ServerUnavailableError(ServerError):
    """No usable answer: no connection, a timeout, a 5xx, or an answer not fit to use. The
    caller retries after :meth:`ServerClient.retry_delay_s`."""


class AnswerRejectedError(ServerUnavailableError):
    """A check-in answer failed verification (signature, device id, nonce, format): it is
    ignored, as if the server had not answered."""


class ServerRejectedError(ServerError):
    """The server answered and refused the request (4xx other than 401)."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class NotEnrolledError(ServerRejectedError):
    """The server does not admit this device: no valid enrollment token and no pre-authorized
    key, or it no longer knows the device id (enroll again)."""


class DeviceDecommissionedError(ServerRejectedError):
    """An operator decommissioned this device: the server refuses its key until an operator
    reinstates it. Enrolling again cannot help (the key is what is refused)."""


DECOMMISSIONED = "device_decommissioned"  # the server's error code for it


# --- the answer: model and rules ----------------------------------------------------------


def _require(document: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise AnswerRejectedError(f"{where}: {key} must be {kind.__name__}, not {value!r:.40}")
    return value


def _base64(document: Mapping[str, Any], key: str, where: str) -> bytes:
    try:
        return base64.b64decode(_require(document, key, str, where), validate=True)
    except (binascii.Error, ValueError) as err:
        raise AnswerRejectedError(f"{where}: {key} is not base64") from err


@dataclass(frozen=True)
class BlobRef:
    """Where one image's stored bytes can be fetched (``url`` may be relative)."""

    slot_class: str
    sha256: str
    size: int
    url: str

    @classmethod
    def from_dict(cls, document: Any, index: int) -> BlobRef:
        where = f"assignment blob {index}"
        if not isinstance(document, dict):
            raise AnswerRejectedError(f"{where}: must be an object")
        sha = _require(document, "sha256", str, where)
        if not _HEX64.fullmatch(sha):
            raise AnswerRejectedError(f"{where}: sha256 must be 64 lowercase hex digits")
        size = _require(document, "size", int, where)
        if size < 0:
            raise AnswerRejectedError(f"{where}: size must not be negative")
        return cls(
            _require(document, "slot_class", str, where), sha, size,
            _require(document, "url", str, where),
        )  # fmt: skip


@dataclass(frozen=True)
class Assignment:
    """The release the server wants this device to run. Nothing here is trusted yet: the
    manifest is verified against the release keyring by the installer, every blob byte
    against the manifest."""

    release_id: int
    version: str
    security_version: int
    manifest: bytes
    manifest_sig: bytes
    blobs: tuple[BlobRef, ...]
    # The windows of the rollout that assigned the release (docs/rollouts.md), as the server
    # wrote them: the device starts the install only inside them and its own. Read by the
    # daemon (updater.bandwidth), which waits rather than install when it cannot read one.
    windows: tuple[str, ...] = ()

    @property
    def manifest_sha256(self) -> str:
        """The release's identity, as the state store records it (``bundle_sha256``)."""
        return hashlib.sha256(self.manifest).hexdigest()

    @classmethod
    def from_dict(cls, document: Any) -> Assignment:
        where = "assignment"
        if not isinstance(document, dict):
            raise AnswerRejectedError(f"{where}: must be an object or null")
        blobs = _require(document, "blobs", list, where)
        return cls(
            release_id=_require(document, "release_id", int, where),
            version=_require(document, "version", str, where),
            security_version=_require(document, "security_version", int, where),
            manifest=_base64(document, "manifest", where),
            manifest_sig=_base64(document, "manifest_sig", where),
            blobs=tuple(BlobRef.from_dict(b, i) for i, b in enumerate(blobs)),
            windows=_windows(document, where),
        )


def _windows(document: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """The assignment's optional ``windows``: a list of strings (absent or null: none)."""
    raw = document.get("windows")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(w, str) for w in raw):
        raise AnswerRejectedError(f"{where}: windows must be a list of strings, not {raw!r:.40}")
    return tuple(raw)


@dataclass(frozen=True)
class Answer:
    """A verified check-in answer."""

    device_id: str
    nonce: str
    etag: str
    assignment: Assignment | None
    # How often the server asks this device to check in for now (a rollout is active);
    # None: as configured.
    checkin_interval_s: int | None = None

    @classmethod
    def from_dict(cls, document: Any) -> Answer:
        """Parse the answer document; fields a later server may add are ignored.

        Raises:
            AnswerRejectedError: not an answer document of format 1.
        """
        where = "check-in answer"
        if not isinstance(document, dict):
            raise AnswerRejectedError(f"{where}: not a JSON object")
        if document.get("format") != ANSWER_FORMAT or isinstance(document.get("format"), bool):
            raise AnswerRejectedError(f"{where}: unknown format {document.get('format')!r:.20}")
        raw = document.get("assignment")
        interval = document.get("checkin_interval_s")
        if interval is not None and (
            not isinstance(interval, int) or isinstance(interval, bool) or interval < 1
        ):
            raise AnswerRejectedError(f"{where}: checkin_interval_s must be null or seconds >= 1")
        return cls(
            device_id=_require(document, "device_id", str, where),
            nonce=_require(document, "nonce", str, where),
            etag=_require(document, "etag", str, where),
            assignment=None if raw is None else Assignment.from_dict(raw),
            checkin_interval_s=interval,
        )


def _envelope_bytes(value: Any) -> bytes:
    # The protocol shows the envelope as a JSON string (its canonical text); a server that
    # embeds it as an object is read the same way: the canonical form is re-made from it and
    # must then parse, so neither spelling can smuggle anything past the signature check.
    if isinstance(value, str):
        text = value if value.endswith("\n") else value + "\n"
        return text.encode("utf-8")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    raise AnswerRejectedError("check-in answer: signatures must be a signature envelope")


def verify_answer(body: Any, keyring: Keyring, device_id: str, nonce: str) -> Answer:
    """The rules a ``200`` check-in answer must pass before the device acts on it.

    ``body`` is the parsed response ``{"answer": "<JSON text>", "signatures": <envelope>}``.
    The answer's UTF-8 bytes must carry valid signatures by ``keyring`` for purpose
    ``assignment``; the answer must be for ``device_id`` and echo ``nonce``. A stale or
    replayed answer fails the nonce check without any clock.

    Raises:
        AnswerRejectedError: any rule failed; the message says which.
    """
    if not isinstance(body, dict) or not isinstance(body.get("answer"), str):
        raise AnswerRejectedError("check-in answer: no signed answer in the response")
    try:
        payload = body["answer"].encode("utf-8")
        envelope = SignatureEnvelope.from_bytes(_envelope_bytes(body.get("signatures")))
        keyring.verify(payload, envelope, ASSIGNMENT_PURPOSE)
    except (SigningError, UnicodeError) as err:
        raise AnswerRejectedError(f"check-in answer not trusted: {err}") from err
    try:
        document = json.loads(payload)
    except ValueError as err:
        raise AnswerRejectedError(f"check-in answer: signed, but not JSON: {err}") from err
    answer = Answer.from_dict(document)
    if answer.device_id != device_id:
        raise AnswerRejectedError(
            f"check-in answer is for device {answer.device_id[:16]}…, not this one"
        )
    if answer.nonce != nonce:
        raise AnswerRejectedError("check-in answer does not echo this check-in's nonce: stale")
    return answer


@dataclass(frozen=True)
class CheckinResult:
    """The answer the device acts on. ``unchanged``: the server said ``304``, and ``answer``
    is the one verified earlier (its nonce is that earlier check-in's)."""

    answer: Answer
    unchanged: bool
    server_url: str


@dataclass(frozen=True)
class EnrollResult:
    device_id: str
    server_keys: tuple[str, ...]
    server_url: str


@dataclass
class _Session:
    token: str
    expires_at: float  # on the client's monotonic clock


class _NoAnswer(Exception):
    """One attempt on one URL failed in a way that counts as silence."""


# --- the client -----------------------------------------------------------------------------


class ServerClient:
    """See the module docstring. ``clock`` is monotonic (sessions, silence, probes);
    ``wall_clock`` is only compared with the server's ``Date`` to report the clock skew."""

    def __init__(
        self,
        urls: Sequence[str],
        key: SigningKey,
        keyring: Keyring | None,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        mirrors: Sequence[str] = (),
        failover_after_s: float = 30.0,
        probe_primary_every_s: float = 300.0,
        timeout_s: float | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        answer_refresh_s: float = 3600.0,
        log: EventSink | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        import requests

        if not urls:
            raise ServerError("no server URL configured ([server] urls)")
        self._requests = requests
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.key = key
        self.device_id = key.key_id
        self.keyring = keyring
        self.mirrors = tuple(m.rstrip("/") for m in mirrors)
        self._http = session or requests.Session()
        # https:// servers are verified against ca_file ([server] ca_file), else the system's
        # CA store (requests' default)
        self.ca_file = None if ca_file is None else os.fspath(ca_file)
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng
        self.failover_after_s = failover_after_s
        self.timeout_s = timeout_s if timeout_s is not None else min(10.0, failover_after_s / 3)
        self._switch_after_s = max(0.0, failover_after_s - self.timeout_s)
        self._probe_every_s = probe_primary_every_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._answer_refresh_s = answer_refresh_s
        self.log = log  # failover, failback, sessions and rejected answers are reported here
        self._sessions: dict[str, _Session] = {}
        self._active = 0
        self._silent_since: float | None = None
        self._tried: set[int] = set()
        self._next_probe_at = 0.0
        self.failures = 0  # consecutive failed attempts since the last answer
        self.clock_skew_s: float | None = None  # server time - device time, from ``Date``
        self._last: tuple[Answer, float] | None = None
        self._last_rejection: str | None = None

    # --- public calls --------------------------------------------------------------------

    @property
    def active_url(self) -> str:
        return self.urls[self._active]

    @property
    def last_answer(self) -> Answer | None:
        """The last verified check-in answer (None before the first)."""
        return self._last[0] if self._last else None

    def enroll(self, *, compatible: str, hostname: str, token: str | None) -> EnrollResult:
        """Ask to be admitted (harmless when already enrolled).

        Raises:
            NotEnrolledError: no valid token and the key is not pre-authorized (403).
            ServerRejectedError, ServerUnavailableError: see the module docstring.
        """
        public_key = _public_key_hex(self.key)
        proof = self.key.private_key.sign(
            signed_message(
                ENROLL_PURPOSE, f"enroll\n{public_key}\n{compatible}\n{hostname}".encode()
            )
        )
        body: dict[str, Any] = {
            "public_key": public_key, "compatible": compatible, "hostname": hostname,
            "proof": proof.hex(),
        }  # fmt: skip
        if token:
            body["enrollment_token"] = token

        def parse(response: requests.Response, url: str) -> EnrollResult:
            document = _json_object(response)
            device_id, keys = document.get("device_id"), document.get("server_keys", [])
            if device_id != self.device_id:
                raise _NoAnswer(f"enrollment answered for device {str(device_id)[:16]!r}")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise _NoAnswer("enrollment answer: server_keys must be a list of strings")
            return EnrollResult(device_id, tuple(keys), url)

        return self._request("POST", "/devices/enroll", body, parse, auth=False, expect=(200,))

    def checkin(self, nonce: str | None = None) -> CheckinResult:
        """Check in; return the verified answer to act on.

        ``nonce`` (32 to 64 hex digits) is fresh random when not given. With an answer
        verified less than ``answer_refresh_s`` ago the request carries ``If-None-Match``, and
        a ``304`` returns that answer with ``unchanged=True``. Beyond that age a full, signed
        answer is asked for, so an unauthenticated ``304`` can never freeze the device on an
        old assignment for long.

        Raises:
            AnswerRejectedError: the answer failed :func:`verify_answer`; it is ignored and
                the previous verified answer is kept.
            ServerRejectedError, ServerUnavailableError: see the module docstring.
        """
        nonce = nonce or secrets.token_hex(16)
        if not _NONCE.fullmatch(nonce):
            raise ValueError("a check-in nonce is 32 to 64 lowercase hex digits")
        if self.keyring is None:
            raise ServerError(
                "no server keyring configured ([server] keyring): assignments cannot be verified"
            )
        keyring = self.keyring
        headers: dict[str, str] = {}
        cached = self._last
        if cached is not None and self._clock() - cached[1] < self._answer_refresh_s:
            headers["If-None-Match"] = f'"{cached[0].etag}"'

        def parse(response: requests.Response, url: str) -> CheckinResult:
            if response.status_code == 304:
                if cached is None or not headers:
                    raise AnswerRejectedError("check-in: 304 for a request without If-None-Match")
                return CheckinResult(cached[0], True, url)
            answer = verify_answer(_json_object(response), keyring, self.device_id, nonce)
            return CheckinResult(answer, False, url)

        result = self._request(
            "POST", f"/devices/{self.device_id}/checkin", {"nonce": nonce}, parse,
            headers=headers, expect=(200, 304),
        )  # fmt: skip
        if not result.unchanged:
            self._last = (result.answer, self._clock())
        return result

    def heartbeat(self, document: Mapping[str, Any]) -> None:
        """Send one heartbeat (see the protocol for the document).

        Raises:
            ServerRejectedError, ServerUnavailableError: see the module docstring.
        """
        self._request(
            "POST", f"/devices/{self.device_id}/heartbeat", dict(document), _ignore,
            expect=(200, 204),
        )  # fmt: skip

    def send_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Send events (``{"event", "seq", "fields"}``); on return the server has stored them
        (or had them already: it ignores a ``seq`` it has seen).

        Raises:
            ValueError: more than fit one request (see :func:`events_that_fit`).
            ServerRejectedError, ServerUnavailableError: see the module docstring.
        """
        if events_that_fit(events) < len(events):
            raise ValueError("send_events: more events than fit one request")
        self._request(
            "POST", f"/devices/{self.device_id}/events", {"events": list(events)}, _ignore,
            expect=(200, 204),
        )  # fmt: skip

    def blob_urls(
        self, assignment: Assignment, server_url: str | None = None
    ) -> dict[str, list[str]]:
        """For each blob of ``assignment``, the URLs to fetch it from, in order: its ``url``
        resolved against ``server_url`` (default: the active URL), then every mirror's
        ``<mirror>/blobs/<sha256>``.

        A ``url`` that starts with ``/`` is a path under the server URL, as the API's paths are
        (``https://host/fleet`` + ``/blobs/…``); other relative URLs resolve as RFC 3986 says;
        an absolute URL is used as it is if it is http(s), and skipped otherwise."""
        base = (server_url or self.active_url).rstrip("/")
        urls: dict[str, list[str]] = {}
        for blob in assignment.blobs:
            if blob.url.startswith("/") and not blob.url.startswith("//"):
                first = base + blob.url
            else:
                first = urljoin(base + "/", blob.url)
            candidates = [first] if first.startswith(("http://", "https://")) else []
            candidates += [f"{mirror}/blobs/{blob.sha256}" for mirror in self.mirrors]
            urls[blob.sha256] = list(dict.fromkeys(candidates))
        return urls

    def retry_delay_s(self) -> float:
        """How long to wait before the next attempt after a failure: full-jitter exponential
        backoff, but never past the moment the active URL is given up while another URL of
        this outage is untried."""
        attempt = max(self.failures - 1, 0)
        delay = backoff_delay(attempt, self._backoff_s, self._max_backoff_s, self._rng)
        switch_at = self._switch_at()
        if switch_at is not None and len(self._tried) < len(self.urls):
            delay = min(delay, max(0.0, switch_at - self._clock()))
        return delay

    def _switch_at(self) -> float | None:
        """When the active URL is given up (None while it answers). A microsecond early, so
        that waiting exactly the delay :meth:`retry_delay_s` gave reaches it despite rounding."""
        if self._silent_since is None:
            return None
        return self._silent_since + self._switch_after_s - 1e-6

    # --- failover ------------------------------------------------------------------------

    def _order(self) -> list[int]:
        """The URLs to try for the next request: the active one, after the primary if it is
        time to probe it."""
        now = self._clock()
        switch_at = self._switch_at()
        if len(self.urls) > 1 and switch_at is not None and now >= switch_at:
            self._fail_over(now)
        if self._active != 0 and now >= self._next_probe_at:
            self._next_probe_at = now + self._probe_every_s
            return [0, self._active]
        return [self._active]

    def _fail_over(self, now: float) -> None:
        silent_s = now - (self._silent_since or now)
        previous = self._active
        self._active = (self._active + 1) % len(self.urls)
        # the first switch of an outage is news; going round the URLs while all are down is not
        first = len(self._tried) < len(self.urls)
        self._event(
            "server.failover", level="warning" if first else "debug",
            previous=self.urls[previous], url=self.active_url, silent_s=round(silent_s, 3),
        )  # fmt: skip
        self._silent_since = None
        self._next_probe_at = now + self._probe_every_s

    def _answered(self, index: int) -> None:
        if index != self._active:  # the primary answered a probe: back to it
            self._event("server.failback", url=self.urls[index], previous=self.active_url)
            self._active = index
        self.failures = 0
        self._silent_since = None
        self._tried.clear()
        self._last_rejection = None

    def _failed(self, index: int, started: float) -> None:
        if index != self._active:  # a failed probe of the primary changes nothing
            return
        self.failures += 1
        self._tried.add(index)
        if self._silent_since is None:
            self._silent_since = started

    # --- requests ------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any],
        parse: Callable[[requests.Response, str], _T],
        *,
        auth: bool = True,
        headers: Mapping[str, str] | None = None,
        expect: tuple[int, ...],
    ) -> _T:
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError(f"{path}: {len(data)} bytes, more than a device may send")
        errors: list[str] = []
        rejected: AnswerRejectedError | None = None
        for index in self._order():
            url = self.urls[index]
            started = self._clock()
            try:
                response = self._exchange(url, method, path, data, headers or {}, auth)
                try:
                    if response.status_code not in expect:
                        raise _refusal(response, f"{method} {path}")
                    result = parse(response, url)
                finally:
                    response.close()
            except ServerRejectedError:
                self._answered(index)
                raise
            except AnswerRejectedError as err:
                rejected = err
                if str(err) != self._last_rejection:  # once, not at every check-in
                    self._last_rejection = str(err)
                    self._event("server.answer_rejected", level="error", url=url, error=str(err))
            except _NoAnswer as err:
                errors.append(f"{url}: {err}")
            else:
                self._answered(index)
                return result
            self._failed(index, started)
        if rejected is not None:
            raise rejected
        raise ServerUnavailableError(f"no answer to {method} {path}: {'; '.join(errors)}")

    def _exchange(
        self,
        url: str,
        method: str,
        path: str,
        data: bytes,
        headers: Mapping[str, str],
        auth: bool,
    ) -> requests.Response:
        """One request to one URL, with a session if ``auth``; once more after a ``401``."""
        for attempt in (1, 2):
            sent = dict(headers)
            if auth:
                sent["Authorization"] = f"Bearer {self._token(url)}"
            response = self._send(url, method, path, data, sent)
            if response.status_code == 401 and auth and attempt == 1:
                response.close()
                self._sessions.pop(url, None)
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _token(self, url: str) -> str:
        session = self._sessions.get(url)
        if session is not None and self._clock() < session.expires_at:
            return session.token
        base = f"/devices/{self.device_id}"
        response = self._send(url, "POST", f"{base}/challenge", b"{}", {})
        with response:
            challenge = _session_field(response, "challenge", str)
        if not _HEX64.fullmatch(challenge):
            raise _NoAnswer("challenge: not 64 hex digits")
        message = f"session\n{self.device_id}\n{challenge}".encode()
        signature = self.key.private_key.sign(signed_message(SESSION_PURPOSE, message)).hex()
        body = json.dumps({"challenge": challenge, "signature": signature}).encode()
        response = self._send(url, "POST", f"{base}/session", body, {})
        with response:
            token = _session_field(response, "token", str)
            expires_in = _session_field(response, "expires_in", int)
        lifetime = max(0.0, float(expires_in) - SESSION_MARGIN_S)
        self._sessions[url] = _Session(token, self._clock() + lifetime)
        self._event("server.session_opened", level="debug", url=url, expires_in_s=expires_in)
        return token

    def _send(
        self, url: str, method: str, path: str, data: bytes, headers: Mapping[str, str]
    ) -> requests.Response:
        sent = {"Content-Type": "application/json", "Accept": "application/json", **headers}
        # per request: requests lets $REQUESTS_CA_BUNDLE override a session's verify
        tls: dict[str, Any] = {} if self.ca_file is None else {"verify": self.ca_file}
        try:
            response = self._http.request(
                method,
                url + API_PREFIX + path,
                data=data,
                headers=sent,
                timeout=self.timeout_s,
                **tls,
            )
        except self._requests.exceptions.SSLError as err:
            trust = self.ca_file or "the system's CA store"
            raise _NoAnswer(
                f"TLS handshake failed: {tls_reason(err)} (certificates verified against {trust})"
            ) from err
        except self._requests.RequestException as err:
            raise _NoAnswer(f"{type(err).__name__}: {err}") from err
        self._note_date(response.headers.get("Date"))
        if response.status_code >= 500 or response.status_code in (408, 429):
            response.close()
            raise _NoAnswer(f"HTTP {response.status_code}")
        return response

    def _note_date(self, value: str | None) -> None:
        if not value:
            return
        try:
            server_time = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        self.clock_skew_s = round(server_time - self._wall_clock(), 3)

    def _event(self, event: str, level: str = "info", **fields: Any) -> None:
        if self.log is not None:
            self.log.event(event, level=level, **fields)


def events_that_fit(events: Sequence[Mapping[str, Any]]) -> int:
    """How many of the leading ``events`` fit one events request (count and size limits)."""
    size = len(b'{"events":[]}')
    count = 0
    for event in events[:MAX_EVENTS_PER_REQUEST]:
        size += len(json.dumps(event, separators=(",", ":"))) + 1
        if size > MAX_REQUEST_BYTES:
            break
        count += 1
    return count


def _public_key_hex(key: SigningKey) -> str:
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def _ignore(response: requests.Response, url: str) -> None:
    return None


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        document = response.json()
    except ValueError as err:
        raise _NoAnswer(f"HTTP {response.status_code}: not JSON") from err
    if not isinstance(document, dict):
        raise _NoAnswer(f"HTTP {response.status_code}: not a JSON object")
    return document


def _error_code(response: requests.Response) -> tuple[str | None, str]:
    try:
        document = response.json()
    except ValueError:
        return None, ""
    if not isinstance(document, dict):
        return None, ""
    code, detail = document.get("error"), document.get("detail")
    return (code if isinstance(code, str) else None), (detail if isinstance(detail, str) else "")


def _refusal(response: requests.Response, what: str) -> ServerRejectedError:
    status = response.status_code
    code, detail = _error_code(response)
    message = (
        f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f": {detail}" if detail else "")
    )
    if status == 403 and code == DECOMMISSIONED:
        return DeviceDecommissionedError(message, status, code)
    if status == 403 and code == "not_authorized":
        return NotEnrolledError(message, status, code)
    if status < 400:  # a 2xx/3xx this call does not expect: a server we do not understand
        raise _NoAnswer(message)
    return ServerRejectedError(message, status, code)


def _session_field(response: requests.Response, key: str, kind: type[_T]) -> _T:
    status = response.status_code
    if status != 200:
        code, detail = _error_code(response)
        if status in (403, 404) and code != DECOMMISSIONED:  # it no longer knows the device
            raise NotEnrolledError(
                f"session: HTTP {status} {code or ''}: {detail or 'device not enrolled'}".strip(),
                status, code,
            )  # fmt: skip
        raise _refusal(response, "session")
    value = _json_object(response).get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _NoAnswer(f"session: {key} missing from the answer")
    return value
