"""The README's first rollout, run as a newcomer runs it.

The ``sh`` block under the ``<!-- walkthrough: … -->`` marker of README.md is read at run time (no
copy of its commands lives here) and run by bash with ``set -euo pipefail``, every command traced,
in an empty directory, with the project's ``.venv/bin`` first on PATH, inside a private network
namespace: the README's port 8080 is free there and nothing leaves the machine. Every command
must succeed as written (the watch too, which exits 0 only once the rollout completed), the
background programs must stop at the block's end, and the server's database must then show what
the README promises: the first rollout completed on every device, the last one paused by the
emergency stop and its assignment to its canary withdrawn. A failure names the README lines
that failed and shows their output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tools

README = Path(__file__).parents[2] / "README.md"
BIN = Path(sys.executable).parent  # the project's .venv/bin: the one running the tests
MARKER = "<!-- walkthrough:"
DEADLINE_S = 240.0  # the walkthrough takes 40 to 60 s on two busy cores
# the journey the block must take, in this order (the first line of the block holding each)
JOURNEY = (
    "fleet keys generate", "fleet image rootfs", "fleet bundle create", "fleet server run",
    "fleet server enrollment-token create", "fleet release upload", "fleet simulate",
    "fleet rollout start", "fleet rollout status --watch", "fleet emergency-stop",
)  # fmt: skip
FAILED = re.compile(r"^WALKTHROUGH FAILED at line (\d+) \(exit (\d+)\): (.*)$", re.MULTILINE)
TRACED = re.compile(r"^\++ line (\d+): ", re.MULTILINE)
BLOCK_DONE, STOPPED = "WALKTHROUGH: the block ended", "WALKTHROUGH: its background programs stopped"


@dataclass(frozen=True)
class Block:
    lines: list[str]
    first_line: int  # README.md line number of lines[0]

    def command_at(self, index: int) -> str:
        """The README's command (continuation lines joined) holding the block's line ``index``,
        with its README line numbers."""
        start = index
        while start > 0 and self.lines[start - 1].endswith("\\"):
            start -= 1
        end = index
        while end < len(self.lines) - 1 and self.lines[end].endswith("\\"):
            end += 1
        numbers = f"line {self.first_line + start}"
        if end > start:
            numbers = f"lines {self.first_line + start}-{self.first_line + end}"
        return f"README.md {numbers}: {' '.join(s.strip() for s in self.lines[start : end + 1])}"


def walkthrough(text: str) -> Block:
    """The fenced ``sh`` block right under the walkthrough marker."""
    lines = text.splitlines()
    markers = [i for i, line in enumerate(lines) if line.startswith(MARKER)]
    assert len(markers) == 1, f"README.md needs one {MARKER} … --> marker, has {len(markers)}"
    opening = markers[0] + 1
    assert lines[opening : opening + 1] == ["```sh"], "the marker is not right above a ```sh block"
    closing = lines.index("```", opening + 1)
    return Block(lines[opening + 1 : closing], opening + 2)


def server_address(block: Block) -> tuple[str, str]:
    """The data directory and port of the block's ``fleet server run``."""
    logical = "\n".join(block.lines).replace("\\\n", " ").splitlines()
    runs = [line for line in logical if line.lstrip().startswith("fleet server run")]
    assert len(runs) == 1, f"the block should start one server, has {runs}"
    words = shlex.split(runs[0], comments=True)
    options = dict(zip(words, [*words[1:], ""], strict=True))
    assert "--data-dir" in options, f"the block's server has no --data-dir: {runs[0]}"
    return options["--data-dir"], options.get("--port", "8080")


def script(block: Block, data_dir: str, port: str) -> tuple[str, int]:
    """The bash script: the block, traced, between the set-up and the check after it; and the
    script line of the block's first line."""
    prologue = [
        "set -euo pipefail",
        "ip link set lo up",
        "PS4='+ line ${LINENO}: '",
        "trap '{ status=$?; set +x; } 2> /dev/null; "
        'echo "WALKTHROUGH FAILED at line $LINENO (exit $status): $BASH_COMMAND" >&2\' ERR',
        "set -x",
    ]
    data, url = shlex.quote(data_dir), shlex.quote(f"http://127.0.0.1:{port}")
    epilogue = f"""
set +x
trap - ERR
echo '{BLOCK_DONE}'
wait
echo '{STOPPED}'
# the same data directory, read back through a server of its own
fleet server run --data-dir {data} --port {shlex.quote(port)} --log-level warning \
    2> check-server.log &
token=$(fleet server token create --role viewer --name readme-check --data-dir {data})
export FLEET_SERVER={url} FLEET_TOKEN="$token"
timeout 30 sh -c 'until fleet device list > /dev/null 2>&1; do sleep 0.2; done'
fleet rollout status --all --json > check-rollouts.json
fleet device list --json > check-devices.json
fleet audit verify --data-dir {data}
kill $!
wait
"""
    text = "\n".join([*prologue, *block.lines, epilogue])
    return text, len(prologue) + 1


def session_processes(session: int) -> list[int]:
    """The live (not zombie) processes of a session."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[3]) == session:
            found.append(int(stat.parent.name))
    return found


def kill_session(session: int) -> None:
    """Kill every process of the session (``timeout`` puts its command in a process group of its
    own, so the session, not one group, is what the run started)."""
    deadline = time.monotonic() + 10
    while pids := session_processes(session):
        assert time.monotonic() < deadline, f"processes {pids} outlived SIGKILL"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)  # polling interval of the condition above


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def report(block: Block, block_start: int, output: str, workdir: Path, what: str) -> str:
    """What went wrong, at which README line, the last of the output and of every log."""

    def place(script_line: int) -> str:
        index = script_line - block_start
        if index < 0:
            return f"the set-up before the block, script line {script_line}"
        if index < len(block.lines):
            return block.command_at(index)
        return f"the check after the block, script line {script_line}"

    parts = [what]
    failed = FAILED.findall(output)
    if failed:
        line, status, command = failed[-1]
        parts.append(f"failed (exit {status}) at {place(int(line))}\n  ran as: {command}")
    elif traced := TRACED.findall(output):
        parts.append(f"last command started: {place(int(traced[-1]))}")
    readable = TRACED.sub(lambda m: f"+ {place(int(m.group(1))).split(':')[0]}: ", output)
    parts.append("--- output (last 60 lines) ---\n" + tail(readable, 60))
    for log in sorted(workdir.glob("*.log")):
        parts.append(f"--- {log.name} (last 15 lines) ---\n" + tail(log.read_text(), 15))
    return "\n".join(parts)


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    require_tools(unshare=shutil.which("unshare") is not None,
                  ip=shutil.which("ip", path=sbin) is not None)  # fmt: skip
    assert (BIN / "fleet").exists(), f"no fleet in {BIN}: run the tests with .venv/bin/pytest"
    block = walkthrough(README.read_text(encoding="utf-8"))
    commands = [line.strip() for line in block.lines]
    starts = [
        next((i for i, c in enumerate(commands) if step in c and not c.startswith("#")), -1)
        for step in JOURNEY
    ]
    steps = ", ".join(
        f"{step!r} (line {block.first_line + i if i >= 0 else 'none'})"
        for step, i in zip(JOURNEY, starts, strict=True)
    )
    assert -1 not in starts and starts == sorted(starts), (
        f"the walkthrough must take these steps in this order: {steps}"
    )
    data_dir, port = server_address(block)
    text, block_start = script(block, data_dir, port)
    (tmp_path / "walkthrough.sh").write_text(text)
    workdir = tmp_path / "first-rollout"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}  # a fresh shell
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # as root a network namespace of its own; otherwise inside a user namespace mapping root
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "-r", "--net"]
    output_path = tmp_path / "walkthrough.out"
    started = time.monotonic()
    with output_path.open("w") as output:
        process = subprocess.Popen(
            [*unshare, "bash", str(tmp_path / "walkthrough.sh")], cwd=workdir, env=env,
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        status: int | None = process.wait(DEADLINE_S)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        kill_session(process.pid)
        process.wait()
    elapsed = time.monotonic() - started
    out = output_path.read_text()

    def why(what: str) -> str:
        return report(block, block_start, out, workdir, what)

    if status is None:
        where = "while the block ran"
        if BLOCK_DONE in out and STOPPED not in out:
            where = "after the block's end: what it started in the background was still running"
        pytest.fail(why(f"not done within {DEADLINE_S:.0f} s, {where}"), pytrace=False)
    if BLOCK_DONE not in out or status != 0:
        pytest.fail(why(f"the walkthrough failed (exit {status})"), pytrace=False)

    rollouts: list[dict[str, Any]] = json.loads((workdir / "check-rollouts.json").read_text())[
        "rollouts"
    ]
    stop = json.loads((workdir / "check-rollouts.json").read_text())["emergency_stop"]
    devices: list[dict[str, Any]] = json.loads((workdir / "check-devices.json").read_text())
    state = json.dumps({"emergency_stop": stop, "rollouts": rollouts, "devices": devices}, indent=1)
    first, last = min(rollouts, key=lambda r: r["id"]), max(rollouts, key=lambda r: r["id"])
    assert first["id"] != last["id"], f"two rollouts expected:\n{state}"
    # the watch followed the first rollout to its end: every device took it
    assert devices, f"no device enrolled:\n{state}"
    assert first["state"] == "completed", f"the first rollout did not complete:\n{state}"
    assert first["counts"] == {"succeeded": len(devices), "pending": 0, "failed": 0}, state
    # the emergency stop is on and paused the last rollout at once
    assert stop is not None and stop["active"], f"the emergency stop is not on:\n{state}"
    assert last["state"] == "paused", f"the emergency stop did not pause the rollout:\n{state}"
    assert str(last["reason"]).startswith("emergency stop"), state
    # it had assigned the last release to its canary, and no device could take it (the README
    # stops the fleet first): the stop withdrew that assignment, every device runs the first
    assert last["devices"], f"nothing assigned before the stop, nothing to withdraw:\n{state}"
    assert all(d["assigned_version"] != last["version"] for d in devices), (
        f"the emergency stop left assignments of {last['version']} in place:\n{state}"
    )
    assert {d["version"] for d in devices} == {first["version"]}, state
    print(f"the README's walkthrough ran in {elapsed:.0f} s")
