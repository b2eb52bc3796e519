"""``fleet demo``: a whole fleet, end to end, on embedded defaults.

1. A release signing key, and a root filesystem image (ext4) bundled, signed and verified: the
   path every real release takes.
2. A release server (SQLite, its clock ten times fast so soaks take seconds), an operator token
   and an enrollment token.
3. A virtual fleet of 50 devices running the real updater daemon, enrolled.
4. Release 2.0.0 rolled out in stages (two canaries, 5 %, 25 %, 100 %).
5. Release 3.0.0, whose health check fails on boot: it halts at the canaries and the canaries
   go back to 2.0.0, by a slot flip.

The web console's address is printed as the server starts, with an operator token (valid a
day) to sign in with and watch the rollouts live; on the demo's fast clock a page nobody clicks
signs out after a few minutes. Everything runs in WORKDIR and stops at the end unless
``--keep-server``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from chaos.fleet import MemberSpec, VirtualFleet
from chaos.lab_image import make_lab_image
from chaos.workdir import fresh_directory
from image_builder.bundle import verify_bundle
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.filesystem import build_filesystem_image
from signing.keyring import Keyring, trust_key
from signing.keys import SigningKey, generate_key

SAMPLE_FILES = {
    "etc/os-release": 'NAME="Metrica Fleet demo"\nVERSION_ID="1.0.0"\n',
    "etc/hostname": "fleet-demo\n",
    "etc/fleet/updater.toml": 'compatible = "metrica-rpi4"\n',
    "usr/bin/hello": "#!/bin/sh\necho hello from the demo root filesystem\n",
    "var/lib/.keep": "",
}
FLEET_SIZE = 50
TIME_SCALE = 10
COMPATIBLE = "lab-device"


def write_sample_tree(root: Path) -> None:
    """A small root filesystem tree, the same every time."""
    for name, text in SAMPLE_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "usr/bin/hello").chmod(0o755)


def step(text: str) -> None:
    click.secho(f"==> {text}", bold=True)


def fleet_command(*args: str) -> str:
    """Run a ``fleet`` command as an operator would; its output."""
    command = [sys.executable, "-c", "from fleet_core.cli import main; main()", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"fleet {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


def start_server(
    data: Path, log: Path, *, rollout_interval_s: float = 0.2
) -> tuple[subprocess.Popen[bytes], str]:
    """A ``fleet server run`` process and its URL. The listening socket is bound here, on a
    loopback port the kernel picks, and handed down (``--fd``): the address is known before the
    server starts, and whatever answers on it is this server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        command = [
            sys.executable, "-c", "from fleet_core.cli import main; main()", "server", "run",
            "--data-dir", str(data), "--fd", str(listener.fileno()),
            "--time-scale", str(TIME_SCALE), "--rollout-interval", str(rollout_interval_s),
            "--log-level", "warning",
        ]  # fmt: skip
        with log.open("ab") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, pass_fds=[listener.fileno()]
            )
    import requests

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise click.ClickException(f"the server exited; see {log}")
            try:
                if requests.get(f"{url}/healthz", timeout=1).ok:
                    return process, url
            except (requests.ConnectionError, requests.Timeout):
                # the socket queues connections from before the server accepts: a read may wait
                time.sleep(0.1)
        raise click.ClickException(f"the server did not come up; see {log}")
    except BaseException:
        process.terminate()  # never left running behind a failed start
        process.wait(10)
        raise


def lab_bundle(workdir: Path, key: SigningKey, version: str, behaviour: str) -> Path:
    image = workdir / f"lab-{version}.img"
    image.write_bytes(make_lab_image(version, behaviour))
    bundle = workdir / f"release-{version}.bundle"
    create_bundle(bundle, images=[ImageSource("rootfs", image)], keys=[key],
                  compatible=COMPATIBLE, version=version, security_version=1,
                  compression="zstd")  # fmt: skip
    return bundle


def follow(fleet: VirtualFleet, done: Callable[[], bool], report: Callable[[], str],
           limit_s: float) -> None:  # fmt: skip
    """Step the fleet until ``done``, printing ``report`` whenever it changes."""
    last = ""
    start = fleet.clock()
    while not done():
        if fleet.clock() - start > limit_s:
            raise click.ClickException(f"not done after {limit_s:.0f} simulated seconds")
        fleet.step(15)
        line = report()
        if line != last:
            click.echo(f"   t+{fleet.clock() - start:>5.0f}s  {line}")
            last = line


@click.command()
@click.option("--workdir", default="build/demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))  # fmt: skip
@click.option("--devices", default=FLEET_SIZE, show_default=True, type=click.IntRange(4, 500))
@click.option("--keep-server", is_flag=True, help="Leave the server running at the end.")
def demo(workdir: Path, devices: int, keep_server: bool) -> None:
    """Run the whole-fleet demo in WORKDIR (recreated each run)."""
    workdir = fresh_directory(workdir, "fleet demo")

    step("generate a release signing key")
    key = generate_key(workdir / "release-key")
    click.echo(f"key id {key.key_id} ({workdir / 'release-key.pem'}, mode 0600)")
    trust_key(workdir / "keyring", workdir / "release-key.pub")

    step("build a root filesystem image (ext4, 64 MiB), bundle and sign it, verify every byte")
    tree = workdir / "rootfs-tree"
    write_sample_tree(tree)
    rootfs = build_filesystem_image(tree, workdir / "rootfs.ext4", "ext4", size_bytes=64 << 20,
                                    label="rootfs")  # fmt: skip
    bundle_path = workdir / "rootfs-1.0.0.bundle"
    create_bundle(bundle_path, images=[ImageSource("rootfs", rootfs.path)], keys=[key],
                  compatible="metrica-rpi4", version="1.0.0", security_version=1,
                  compression="zstd")  # fmt: skip
    verified = verify_bundle(bundle_path, Keyring.load(workdir / "keyring"))
    click.echo(f"{bundle_path}: {bundle_path.stat().st_size} bytes, "
               f"signed by {verified.signed_by[0][:16]}…, every byte verified")  # fmt: skip

    step(f"start the release server (SQLite, clock x{TIME_SCALE})")
    data = workdir / "server"
    trust_key(data / "keyring", workdir / "release-key.pub")
    server, url = start_server(data, workdir / "server.log")
    try:
        console_login(url, data)
        run_fleet(workdir, data, url, key, devices)
    finally:
        if keep_server:
            click.echo(f"server still running at {url} (pid {server.pid}): the web console too")
        else:
            server.terminate()
            server.wait(10)


def console_login(url: str, data: Path) -> None:
    """Print where the web console is and an operator token to sign in with: valid a real day,
    which is :data:`TIME_SCALE` days of the server's clock. The console's idle limit runs on
    that clock too, so the line says how soon an untouched page signs out."""
    from server.ui.sessions import IDLE_TIMEOUT_S

    try:
        secret = fleet_command("server", "token", "create", "--role", "operator", "--name",
                               "demo-console", "--expires-in", f"{TIME_SCALE}d",
                               "--data-dir", str(data)).splitlines()[0]  # fmt: skip
    except click.ClickException as err:
        click.echo(f"web console: {url}/ui/ (no sign-in token: {err.message})")
        return
    idle_min = IDLE_TIMEOUT_S / 60 / TIME_SCALE
    click.echo(
        f"web console: {url}/ui/  sign in with this operator token: {secret}\n"
        f"  (the demo's clock runs {TIME_SCALE} times faster: a console page nobody clicks "
        f"signs out after {idle_min:g} minutes)"
    )


def run_fleet(workdir: Path, data: Path, url: str, key: SigningKey, devices: int) -> None:
    admin = fleet_command("server", "token", "create", "--role", "admin", "--name", "demo",
                          "--data-dir", str(data)).splitlines()[0]  # fmt: skip
    operator = ["--server", url, "--token", admin]
    enrollment = fleet_command("server", "enrollment-token", "create", "--uses", str(devices),
                               "--data-dir", str(data)).splitlines()[0]  # fmt: skip
    click.echo(f"server {url}  (metrics: {url}/metrics, audit: fleet audit verify)")

    step(f"enroll {devices} virtual devices (cameras, sensors, gateways) running 1.0.0")
    roles = ("camera", "sensor", "gateway")
    fleet = VirtualFleet(
        workdir / "fleet", [MemberSpec(role=roles[i % 3]) for i in range(devices)],
        server_urls=(url,), server_key=data / "server-key.pub",
        release_key=workdir / "release-key.pub", enrollment_token=enrollment, workers=4,
    )  # fmt: skip

    def known() -> int:
        return len(_json(fleet_command("device", "list", "--json", *operator)))

    follow(fleet, lambda: known() == devices, lambda: f"{known()} enrolled", limit_s=1200)

    canaries = [arg for m in fleet.members[:2] for arg in ("--canary", m.device_id)]

    def rollout() -> dict[str, Any]:
        rollouts: dict[str, Any] = _json(fleet_command("rollout", "status", "--json", *operator))
        latest: dict[str, Any] = rollouts["rollouts"][0]
        return latest

    def versions() -> str:
        counts = sorted((str(version), n) for version, n in fleet.versions().items())
        return "fleet " + ", ".join(f"{version}: {n}" for version, n in counts)

    def progress() -> str:
        r = rollout()
        c = r["counts"]
        return (f"rollout {r['version']}: {r['state']}, stage {r['stage_name']}; "
                f"{c['succeeded']} ok, {c['pending']} pending, {c['failed']} failed; "
                f"{versions()}")  # fmt: skip

    step("release 2.0.0: upload, then roll out (canaries, 5 %, 25 %, 100 %)")
    fleet_command("release", "upload", str(lab_bundle(workdir, key, "2.0.0", "healthy")),
                  *operator)  # fmt: skip
    fleet_command("rollout", "start", "2.0.0", *canaries, "--soak", "60s", *operator)
    follow(fleet, lambda: rollout()["state"] == "completed", progress, limit_s=7200)

    step("release 3.0.0 (its health check fails on boot): roll out")
    fleet_command("release", "upload", str(lab_bundle(workdir, key, "3.0.0", "unhealthy")),
                  *operator)  # fmt: skip
    fleet_command("rollout", "start", "3.0.0", *canaries, "--soak", "60s", *operator)
    follow(fleet, lambda: rollout()["state"] == "halted", progress, limit_s=3600)
    step("halted at the canaries; they go back to 2.0.0")
    follow(fleet, lambda: all(m.version == "2.0.0" for m in fleet.members), versions,
           limit_s=1800)  # fmt: skip
    click.echo(fleet_command("audit", "verify", "--data-dir", str(data)).strip())
    reached = sum(
        any(e.get("version") == "3.0.0" for e in m.device.events("install.verified"))
        for m in fleet.members
    )
    on_good = fleet.versions()["2.0.0"]
    click.echo(f"done: {on_good} of {devices} devices on 2.0.0; 3.0.0 was installed on "
               f"{reached} device(s), all of them canaries")  # fmt: skip
    if reached > 2 or on_good != devices:
        raise click.ClickException("the bad release went further than the canaries")


def _json(text: str) -> Any:
    import json

    return json.loads(text)
