"""The server's log: one JSON object per line, for Loki (or text, for a person at a terminal).

``fleet server run`` sends every log record of the process to standard error through one
handler: the server's own loggers (``server``, ``server.access``), uvicorn's (``uvicorn.error``)
and any library's. A line reads::

    {"ts": "2024-05-01T12:00:00.123Z", "level": "info", "component": "server",
     "logger": "server.access", "message": "POST /api/v1/devices/{device_id}/checkin 200",
     "event": "http.request", "device_id": "ab12…", "duration_s": 0.004, "method": "POST",
     "route": "/api/v1/devices/{device_id}/checkin", "status": 200, ...}

``ts`` is RFC 3339 UTC with milliseconds; ``level`` is ``debug``, ``info``, ``warning``,
``error`` or ``critical``; ``event`` is there when the call named one (``extra={"event": ...}``);
an exception is written in ``error`` (its traceback as one string), so a line is always one
line. Other ``extra`` values follow, sorted by name.

Labels: the log shipper (``deploy/monitoring/alloy/server.alloy``) gives every line of the
server's unit the Loki label ``component="server"``, the same value the line carries. Nothing
else becomes a label: device ids, routes and statuses stay fields, found with ``| json``. A
field named like a key above is written with a leading ``_``.

Secrets: access lines name the route template, never the path or query a client sent, and no
header. As a second line of defence every line is scrubbed: a field named like a secret
(``authorization``, ``token``, ``password``, ``secret``, ``cookie``) is replaced, and so is any
text that looks like a bearer credential or one of the server's tokens (``fleet_op_…``,
``fleet_enroll_…``, ``fleet_session_…``).
"""

from __future__ import annotations

import json
import logging
import logging.config
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Scope

from server.asgi import RequestObserver, route_template

COMPONENT = "server"
FORMATS = ("json", "text")
ACCESS_LOGGER = "server.access"
RESERVED_KEYS = ("ts", "level", "component", "logger", "message", "event", "error", "stack")
REDACTED = "[redacted]"
MAX_DEPTH = 6  # deeper structures are written as text: a log line is not a data dump
_SECRET_NAME = re.compile(r"authorization|token|password|passwd|secret|cookie|api_?key", re.I)
_SECRET_TEXT = re.compile(
    r"(?P<scheme>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+"
    r"|(?P<prefix>\bfleet_(?:op|enroll|session)_)[A-Za-z0-9_-]+",
    re.IGNORECASE,
)
# What every LogRecord has; anything else on a record came from ``extra``.
_RECORD_KEYS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # Python 3.12 and later
    "color_message",  # uvicorn's copy of the message with terminal colours
}


def redact(text: str) -> str:
    """``text`` with bearer credentials and the server's tokens replaced by ``[redacted]``."""
    return _SECRET_TEXT.sub(lambda m: (m.group("scheme") or m.group("prefix")) + REDACTED, text)


def rfc3339_millis(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch) as RFC 3339 UTC with milliseconds."""
    millis = math.floor(timestamp * 1000)  # integers: a rounded float could print ".1000"
    moment = datetime.fromtimestamp(millis // 1000, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis % 1000:03d}Z"


def _jsonable(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, float):
        # NaN and infinities are not JSON; Loki would reject the whole line
        return value if math.isfinite(value) else str(value)
    if depth <= 0:
        return redact(str(value))
    if isinstance(value, Mapping):
        return {
            str(key): REDACTED if _SECRET_NAME.search(str(key)) else _jsonable(item, depth - 1)
            for key, item in sorted(value.items(), key=lambda pair: str(pair[0]))
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item, depth - 1) for item in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line (see the module docstring). Never raises: a record
    that cannot be formatted still gives a line that says so."""

    def __init__(self, component: str = COMPONENT) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        try:
            return json.dumps(self._document(record), ensure_ascii=True, allow_nan=False)
        except Exception as err:  # a value whose str() raises, or a bad %-format
            return json.dumps(
                {
                    "ts": rfc3339_millis(record.created),
                    "level": "error",
                    "component": self.component,
                    "logger": str(record.name),
                    "message": "unformattable log record",
                    "error": redact(f"{type(err).__name__}: {err}"),
                },
                ensure_ascii=True,
            )

    def _document(self, record: logging.LogRecord) -> dict[str, Any]:
        document: dict[str, Any] = {
            "ts": rfc3339_millis(record.created),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        event = getattr(record, "event", None)
        if event is not None:
            document["event"] = str(event)
        if record.exc_info:
            document["error"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            document["error"] = redact(record.exc_text)
        if record.stack_info:
            document["stack"] = redact(self.formatStack(record.stack_info))
        extra = {
            (f"_{key}" if key in RESERVED_KEYS else key): value
            for key, value in record.__dict__.items()
            if key not in _RECORD_KEYS and key != "event"
        }
        for name in sorted(extra):
            secret = _SECRET_NAME.search(name)
            document[name] = REDACTED if secret else _jsonable(extra[name], MAX_DEPTH)
        return document


class TextFormatter(logging.Formatter):
    """``2024-05-01 12:00:00,123 INFO server.access: GET /healthz 200``, scrubbed of secrets
    as the JSON lines are: for a person reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def logging_config(level: str = "info", log_format: str = "json") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` configuration: every record of the process, at
    ``level`` and above, to standard error in ``log_format`` (``json`` or ``text``).

    uvicorn's loggers keep no handlers of their own and pass their records up to this one.

    Raises:
        ValueError: an unknown format.
    """
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (one of {', '.join(FORMATS)})")
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"fleet": {"()": formatter}},
        "handlers": {
            "fleet": {
                "class": "logging.StreamHandler",
                "formatter": "fleet",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            name: {"handlers": [], "level": upper, "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
        "root": {"handlers": ["fleet"], "level": upper},
    }


def configure(level: str = "info", log_format: str = "json") -> None:
    """Send every log record of this process through one handler (see :func:`logging_config`),
    Python's warnings included.

    Raises:
        ValueError: an unknown format.
    """
    logging.config.dictConfig(logging_config(level, log_format))
    logging.captureWarnings(True)


class AccessLogMiddleware(RequestObserver):
    """ASGI middleware that logs one line per HTTP request on ``server.access``: method, route
    template (``unmatched`` when no route matched), status, duration, the client's address,
    and the device id when the route names one. Never the path or query as sent, nor a header.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger | None = None) -> None:
        super().__init__(app)
        self.log = logger or logging.getLogger(ACCESS_LOGGER)

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = route_template(scope, "unmatched")
        method = str(scope.get("method", ""))
        fields: dict[str, Any] = {
            "event": "http.request",
            "method": method,
            "route": route,
            "status": status,
            "duration_s": round(seconds, 6),
        }
        client = scope.get("client")
        if client:
            fields["client"] = str(client[0])
        params = scope.get("path_params") or {}
        if "device_id" in params:
            fields["device_id"] = str(params["device_id"])
        level = logging.WARNING if status >= 500 else logging.INFO
        self.log.log(level, "%s %s %d", method, route, status, extra=fields)
