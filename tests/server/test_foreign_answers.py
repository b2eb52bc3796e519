"""A server (or a proxy, a captive portal, another service on that port) that answers 200 with
something a Metrica Fleet server never sends: every command fails with one Error line naming
the request and what was wrong, and none reports a write as done (``null``, exit 0)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from server.client import ServerAnswerError, decode_answer
from tests.conftest import assert_one_line_error

ANSWERS = {
    "html": (b"<html><body>Welcome to the hotel network</body></html>", "not JSON"),
    "list": (b"[1, 2, 3]", "a JSON list where a JSON object belongs"),
    "null": (b"null", "null where a JSON object belongs"),
    "empty object": (b"{}", "the server's answer has no "),
    "binary": (b"\xff\xfe\x00garbage", "not JSON"),
}


class Foreign(BaseHTTPRequestHandler):
    body = b""

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.body.startswith(b"<") else "x/y")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = do_DELETE = answer

    def log_message(self, *_args: object) -> None:  # quiet
        pass


@pytest.fixture
def foreign() -> Iterator[tuple[str, type[Foreign]]]:
    handler = type("Handler", (Foreign,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


COMMANDS = [
    ["device", "list"],
    ["device", "show", "cafe"],
    ["device", "rename", "cafe", "x"],
    ["device", "assign", "cafe", "1.4.0"],
    ["device", "remove", "cafe", "--yes"],
    ["device", "quarantine", "cafe", "--reason", "x"],
    ["release", "list"],
    ["release", "upload", "BUNDLE"],
    ["rollout", "status"],
    ["rollout", "status", "1", "--watch", "--interval", "0.1"],
    ["rollout", "start", "1.4.0"],
    ["rollout", "pause", "1", "--json"],
    ["emergency-stop"],
    ["emergency-stop", "--json"],
    ["emergency-stop", "--clear", "--json"],
    ["audit", "list"],
    ["audit", "verify"],
    ["audit", "head"],
    ["server", "token", "list"],
]


def run(url: str, args: list[str], bundle: Path) -> Result:
    args = [str(bundle) if a == "BUNDLE" else a for a in args]
    return CliRunner().invoke(fleet, [*args, "--server", url, "--token", "fleet_op_x"])


@pytest.mark.parametrize("kind", sorted(ANSWERS))
def test_every_command_refuses_an_answer_no_fleet_server_sends(
    foreign: tuple[str, type[Foreign]], kind: str, tmp_path: Path
) -> None:
    url, handler = foreign
    handler.body, problem = ANSWERS[kind]
    bundle = tmp_path / "release.bundle"
    bundle.write_bytes(b"not really a bundle")
    for args in COMMANDS:
        result = run(url, args, bundle)
        assert_one_line_error(result, problem)
        assert f" {url}/api/v1/" in result.stderr, (args, result.stderr)
        assert "Metrica Fleet server" in result.stderr, (args, result.stderr)
        assert result.stdout == "" or "--json" not in args, (args, result.stdout)


def test_an_object_lacking_a_field_is_named() -> None:
    answer = decode_answer(b'{"rollouts": [{"id": 1}]}', "GET http://h/api/v1/rollouts")
    assert answer["rollouts"][0]["id"] == 1
    with pytest.raises(ServerAnswerError) as caught:
        answer["rollouts"][0]["state"]
    assert str(caught.value).startswith(
        "GET http://h/api/v1/rollouts: the server's answer has no 'state'"
    )


def test_an_html_error_page_is_not_folded_into_the_line(
    foreign: tuple[str, type[Foreign]], tmp_path: Path
) -> None:
    url, handler = foreign
    handler.body = b"<html>" + b"<p>lots of markup</p>" * 50 + b"</html>"

    def not_found(self: Foreign) -> None:
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    handler.do_GET = not_found  # type: ignore[method-assign]
    result = run(url, ["device", "list"], tmp_path)
    assert_one_line_error(result, "GET /api/v1/devices: 404 error: Not Found (an HTML page: ")
    assert "markup" not in result.stderr
