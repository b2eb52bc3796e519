"""Where Prometheus may scrape a device: the rule for a heartbeat's ``metrics_address``.

The server lists every device's ``metrics_address`` for Prometheus's service discovery
(``server/api/sd.py``), and Prometheus then connects there from wherever it runs. An address a
device chooses is thus a request that Prometheus makes on the device's behalf, so the server
admits only addresses that name a device on the fleet's networks:

- The form: ``host:port``, the port 1 to 65535, the host an IPv4 address (dotted quad, no
  leading zeros), an IPv6 address in brackets (no zone), or a host name (letters, digits and
  hyphens in dot-separated labels of at most 63 characters; the last label not numeric, so
  ``127.1`` or ``2130706433`` cannot pass as a name a resolver reads as an address).
- Never: the cloud metadata services (:data:`METADATA_ADDRESSES`), multicast, unspecified,
  reserved and "this network" (``0.0.0.0/8``) addresses, whatever the settings say.
- With no networks configured (the default): any other address except loopback and
  link-local (``127.0.0.0/8``, ``::1``, ``169.254.0.0/16``, ``fe80::/10``); a host name except
  ``localhost`` and the metadata services' names. A name cannot be checked further without
  resolving it, and what it resolves to may change after the check.
- With networks configured (``fleet server run --metrics-networks 10.0.0.0/8,...``): only an
  address inside one of them (a loopback or link-local network may be configured on purpose,
  for a lab); a host name is refused, since it cannot be checked against them.

IPv6 addresses that embed an IPv4 address (``::ffff:a.b.c.d``, ``::a.b.c.d``, NAT64
``64:ff9b::a.b.c.d``) are judged as the IPv4 address they reach.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

# Instance metadata and platform services of the common clouds: a target there would have
# Prometheus fetch credentials. 169.254.169.254 is link-local too, but stays refused even when
# an operator allows link-local networks.
METADATA_ADDRESSES = frozenset(
    ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS, over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure platform (wireserver)
    )
)
METADATA_NAMES = frozenset(
    {"metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal"}
)
_ALWAYS_REFUSED_NETWORKS = (ip_network("0.0.0.0/8"),)
# IPv6 prefixes whose last 32 bits are an IPv4 address a connection may end up at.
_EMBEDDING_V4 = (ip_network("::ffff:0:0/96"), ip_network("::/96"), ip_network("64:ff9b::/96"))
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
MAX_ADDRESS_LENGTH = 261  # a 253-character name, ':' and a port; a bracketed IPv6 is shorter


def parse_networks(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8,192.168.0.0/16,fd00::/8`` as networks (empty text: none).

    Raises:
        ValueError: an entry that is not a network with its prefix length, or has host bits
            set (``10.0.0.1/8``: write ``10.0.0.0/8``).
    """
    networks = []
    for part in text.split(","):
        entry = part.strip()
        if not entry:
            continue
        if "/" not in entry:
            raise ValueError(f"{entry!r}: give a network with its prefix length (10.0.0.0/8)")
        try:
            networks.append(ip_network(entry))
        except ValueError as err:
            raise ValueError(f"{entry!r}: {err}") from None
    return tuple(networks)


def _split(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise ValueError("give host:port")
    if _PORT.fullmatch(port) is None or not 1 <= int(port) <= 65535:
        raise ValueError("the port must be 1 to 65535")
    return host, int(port)


def _literal(host: str) -> Address | None:
    """The address ``host`` spells, None if it is not an address literal."""
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        if "%" in inner:
            raise ValueError("an IPv6 address with a zone cannot be scraped from elsewhere")
        try:
            return IPv6Address(inner)
        except ValueError:
            raise ValueError("not an IPv6 address in brackets") from None
    if ":" in host:
        raise ValueError("an IPv6 address goes in brackets ([2001:db8::1]:9101)")
    try:
        return IPv4Address(host)
    except ValueError:
        return None


def _check_name(host: str) -> None:
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not an IP address or a host name")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise ValueError("not an IP address, and numeric for a host name")
    name = host.lower()
    if name == "localhost" or name.endswith(".localhost"):
        raise ValueError("a loopback name cannot be scraped from elsewhere")
    if name in METADATA_NAMES:
        raise ValueError("a cloud metadata service is never a scrape target")


def _effective(address: Address) -> Address:
    """The address a connection to ``address`` reaches: the IPv4 address an IPv6 address
    embeds (mapped, compatible, NAT64), or ``address`` itself."""
    if not isinstance(address, IPv6Address) or address.is_loopback or address.is_unspecified:
        return address
    if any(address in n for n in _EMBEDDING_V4):
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _check_address(address: Address, networks: Sequence[Network]) -> None:
    target = _effective(address)
    if target in METADATA_ADDRESSES:
        raise ValueError("a cloud metadata service is never a scrape target")
    if target.is_multicast:
        raise ValueError("a multicast address is never a scrape target")
    if target.is_unspecified or any(target in n for n in _ALWAYS_REFUSED_NETWORKS):
        raise ValueError("an unspecified address is never a scrape target")
    if target.is_reserved and not (target.is_loopback or target.is_link_local):
        raise ValueError("a reserved address is never a scrape target")
    if networks:
        if not any(target in n for n in networks if n.version == target.version):
            raise ValueError("not in the networks the server allows (--metrics-networks)")
        return
    if target.is_loopback:
        raise ValueError("a loopback address cannot be scraped from elsewhere")
    if target.is_link_local:
        raise ValueError("a link-local address is refused unless its network is allowed")


def check_metrics_address(address: str, networks: Sequence[Network] = ()) -> str:
    """``address`` itself if Prometheus may scrape it, given the allowed ``networks`` (none
    configured: the defaults of the module docstring).

    Raises:
        ValueError: why not, in words that hold nothing of ``address``.
    """
    host, _port = _split(address)
    literal = _literal(host)
    if literal is None:
        _check_name(host)
        if networks:
            raise ValueError("a host name cannot be checked against --metrics-networks")
        return address
    _check_address(literal, networks)
    return address
