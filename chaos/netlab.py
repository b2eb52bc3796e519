"""Real network faults on one machine: network namespaces joined to the host by veth pairs,
and partitions made with nftables rules inside them.

:func:`lab_namespace` makes a namespace with one end of a veth pair in it and the other end
in the host's namespace, each with an address of a private ``/30`` in ``10.200.0.0/16``. That
``/30`` is the only route either side gets: the namespace has no default route, the host end
forwards nothing (its ``forwarding`` is switched off) and there is no NAT, so whatever runs in
the namespace can reach the host's end of the pair and nothing else, and nothing from it leaves
the machine. Processes run inside with ``ip netns exec`` (:meth:`LabNamespace.popen`).

Partitions (:meth:`LabNamespace.cut`) are an nftables table inside the namespace, so the host's
own ruleset is never touched. The choice between the two ways of cutting is explicit:

- ``reject``: a TCP packet crossing the cut is answered with a TCP reset, anything else with
  an ICMP "administratively prohibited", so a client fails at once (connection refused);
- ``drop``: packets vanish, so a client waits for its own timeout, as behind a dead link.

A cut may be one-way: ``in`` stops what the host sends into the namespace, ``out`` what the
namespace sends to the host; ``both`` stops both. :meth:`LabNamespace.heal` removes the table.

Clean-up: leaving the ``with`` block stops the processes started in the namespace and deletes
it, which deletes the veth pair. Names carry the creating process's id, so a run that was
killed before it could clean up leaves names :func:`sweep` recognises: every new namespace
sweeps first, removing what belonged to processes that no longer exist (and nothing of a run
still alive). Everything here needs root (``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN``), the ``ip``
command (iproute2) and the ``nft`` command (nftables): :func:`check_environment` says clearly
which is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

NAMESPACE_PREFIX = "mfnet-"  # namespaces: mfnet-<pid>-<n>
LINK_PREFIX = "mfn"  # host ends of veth pairs: mfn<pid>x<n> (interface names: 15 bytes at most)
INSIDE_LINK = "lab0"  # the namespace's end of the pair
LAB_NETWORK = ipaddress.IPv4Network("10.200.0.0/16")  # carved into /30s, one per namespace
TABLE = "netlab"  # the nftables table (family inet) a cut installs in the namespace
LOCK_FILE = Path("/run/lock/metrica-netlab.lock")  # serialises choosing a free /30
STOP_TIMEOUT_S = 10.0

_NAMESPACE_NAME = re.compile(rf"^{re.escape(NAMESPACE_PREFIX)}(\d+)-(\d+)$")
_LINK_NAME = re.compile(rf"^{re.escape(LINK_PREFIX)}(\d+)x(\d+)$")
_counter = itertools.count()

CutMode = Literal["reject", "drop"]
Direction = Literal["both", "in", "out"]


class NetlabUnavailable(RuntimeError):
    """This machine cannot make lab networks: not root, or a tool is missing."""


class NetlabError(RuntimeError):
    """A lab network could not be set up or changed."""


def check_environment() -> None:
    """Make sure namespaces, veth pairs and nftables rules can be made here.

    Raises:
        NetlabUnavailable: naming what is missing (root, ``ip``, ``nft``, pyroute2).
    """
    if os.geteuid() != 0:
        raise NetlabUnavailable(
            "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run as root"
        )
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise NetlabUnavailable(f"the {tool!r} command is missing: install {package}")
    try:
        import pyroute2  # noqa: F401
    except ImportError as err:
        raise NetlabUnavailable(f"pyroute2 is missing ({err}): pip install pyroute2") from err


@dataclass(frozen=True)
class Cut:
    """A partition in force: how packets are stopped, and which way."""

    mode: CutMode
    direction: Direction


def ruleset(cut: Cut, link: str = INSIDE_LINK) -> str:
    """The nftables script that puts ``cut`` in force on ``link``, replacing any earlier cut
    in one transaction (the table is made, deleted and made again: ``nft -f`` applies the
    whole script or none of it)."""
    if cut.mode not in ("reject", "drop") or cut.direction not in ("both", "in", "out"):
        raise ValueError(f"a cut is reject or drop, both, in or out: not {cut}")
    if cut.mode == "reject":
        verdicts = ["meta l4proto tcp reject with tcp reset", "reject with icmpx admin-prohibited"]
    else:
        verdicts = ["drop"]
    chains = []
    for hook, match, way in (("input", "iifname", "in"), ("output", "oifname", "out")):
        rules = (
            [f'{match} "{link}" {v}' for v in verdicts] if cut.direction in ("both", way) else []
        )
        if rules and hook == "output" and cut.mode == "reject":
            # the answers the input chain's rejects send must leave, or no client hears them
            rules[:0] = [f'{match} "{link}" tcp flags rst accept',
                         f'{match} "{link}" icmp type destination-unreachable accept']  # fmt: skip
        body = "".join(f"\n\t\t{rule}" for rule in rules)
        chains.append(
            f"\tchain {hook} {{\n\t\ttype filter hook {hook} priority filter; policy accept;"
            f"{body}\n\t}}"
        )
    return (
        f"table inet {TABLE}\ndelete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n" + "\n".join(chains) + "\n}\n"
    )


class LabNamespace:
    """One namespace and its veth pair (see the module docstring). Make it with
    :func:`lab_namespace`; :attr:`address` is the namespace's end, :attr:`host_address` the
    host's."""

    def __init__(self, name: str, host_link: str, network: ipaddress.IPv4Network) -> None:
        hosts = list(network.hosts())
        self.name = name
        self.host_link = host_link
        self.network = network
        self.host_address = str(hosts[0])
        self.address = str(hosts[1])
        self.cut_in_force: Cut | None = None
        self._processes: list[subprocess.Popen[Any]] = []

    def url(self, port: int, scheme: str = "http") -> str:
        """A URL for a server listening on ``port`` at the namespace's address."""
        return f"{scheme}://{self.address}:{port}"

    # --- processes -----------------------------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command that runs it inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; it is stopped when the namespace is closed."""
        process = subprocess.Popen(self.command(argv), **kwargs)
        self._processes.append(process)
        return process

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside the namespace to its end (``subprocess.run``'s arguments)."""
        return subprocess.run(self.command(argv), **kwargs)

    # --- partitions ----------------------------------------------------------------------

    def cut(self, mode: CutMode = "reject", direction: Direction = "both") -> None:
        """Partition the namespace from the host (see the module docstring); a cut already
        in force is replaced.

        Raises:
            ValueError: an unknown mode or direction.
            NetlabError: ``nft`` refused the ruleset (its message is included).
        """
        cut = Cut(mode, direction)
        self._nft(ruleset(cut))
        self.cut_in_force = cut

    def heal(self) -> None:
        """End the partition: the namespace's nftables table is removed (harmless when there
        is none)."""
        self._nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n")
        self.cut_in_force = None

    def rules(self) -> str:
        """The namespace's whole nftables ruleset, as ``nft list ruleset`` prints it."""
        result = self.run(["nft", "list", "ruleset"], capture_output=True, text=True)
        if result.returncode != 0:
            raise NetlabError(f"nft list ruleset in {self.name}: {result.stderr.strip()}")
        return str(result.stdout)

    def _nft(self, script: str) -> None:
        result = self.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
        if result.returncode != 0:
            raise NetlabError(f"nft in {self.name} refused the ruleset: {result.stderr.strip()}")

    # --- the end -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the processes started inside, then delete the namespace and its veth pair."""
        for process in self._processes:
            _stop(process)
        self._processes.clear()
        _remove_namespace(self.name)
        _remove_link(self.host_link)


@contextlib.contextmanager
def lab_namespace() -> Iterator[LabNamespace]:
    """A new :class:`LabNamespace`, deleted on leaving the block whatever happens inside.

    Raises:
        NetlabUnavailable: see :func:`check_environment`.
        NetlabError: the namespace or its link could not be made (what was made is removed).
    """
    check_environment()
    sweep()
    number = next(_counter)
    name = f"{NAMESPACE_PREFIX}{os.getpid()}-{number}"
    host_link = f"{LINK_PREFIX}{os.getpid()}x{number}"
    created = False
    namespace: LabNamespace | None = None
    try:
        from pyroute2 import IPRoute, NetNS, netns

        try:
            netns.create(name)
        except OSError as err:
            raise NetlabUnavailable(f"cannot create network namespace {name}: {err}") from err
        created = True
        with _lock():
            network = _free_network()
            namespace = LabNamespace(name, host_link, network)
            with IPRoute() as ipr:
                ipr.link("add", ifname=host_link, kind="veth",
                         peer={"ifname": INSIDE_LINK, "net_ns_fd": name})  # fmt: skip
                index = ipr.link_lookup(ifname=host_link)[0]
                _no_forwarding(host_link)
                ipr.addr("add", index=index, address=namespace.host_address,
                         prefixlen=network.prefixlen)  # fmt: skip
                ipr.link("set", index=index, state="up")
        with NetNS(name) as inside:
            for link in ("lo", INSIDE_LINK):
                index = inside.link_lookup(ifname=link)[0]
                if link == INSIDE_LINK:
                    inside.addr("add", index=index, address=namespace.address,
                                prefixlen=network.prefixlen)  # fmt: skip
                inside.link("set", index=index, state="up")
    except NetlabUnavailable:
        if created:
            _remove_namespace(name)
        _remove_link(host_link)
        raise
    except Exception as err:
        if created:
            _remove_namespace(name)
        _remove_link(host_link)
        raise NetlabError(f"setting up network namespace {name}: {err}") from err
    try:
        yield namespace
    finally:
        namespace.close()


def sweep() -> list[str]:
    """Remove the namespaces and host links that processes no longer running left behind
    (a run that was killed); return their names. A live process's are left alone."""
    from pyroute2 import IPRoute, netns

    removed = []
    for name in netns.listnetns():
        match = _NAMESPACE_NAME.match(name)
        if match and not _alive(int(match[1])):
            _remove_namespace(name)  # and what the killed run left running in it
            removed.append(name)
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname") or ""
            match = _LINK_NAME.match(name)
            if match and not _alive(int(match[1])):
                _remove_link(name)
                removed.append(name)
    return removed


# --- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free_network() -> ipaddress.IPv4Network:
    """The first /30 of :data:`LAB_NETWORK` that no address of the host's namespace is in."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        used = {
            ipaddress.IPv4Network(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
            for a in ipr.get_addr(family=2)
        }
    for network in LAB_NETWORK.subnets(new_prefix=30):
        if not any(network.overlaps(u) for u in used):
            return network
    raise NetlabError(f"no free /30 left in {LAB_NETWORK}")


def _no_forwarding(link: str) -> None:
    """Packets arriving on ``link`` are never forwarded to another interface, and it speaks no
    IPv6 (no link-local addresses to reach the host by)."""
    Path(f"/proc/sys/net/ipv4/conf/{link}/forwarding").write_text("0\n")
    with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
        Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6").write_text("1\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_in(name: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                            check=False)  # fmt: skip
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _remove_namespace(name: str) -> None:
    from pyroute2 import netns

    for pid in _pids_in(name):  # what the processes started inside left running
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError, OSError):
        netns.remove(name)


def _remove_link(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        indexes = ipr.link_lookup(ifname=name)
        for index in indexes:
            with contextlib.suppress(Exception):
                ipr.link("del", index=index)
