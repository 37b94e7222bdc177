"""Which peers a network front-end serves: its ``allow`` networks (CIDR)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Allowed:
    """The networks a server accepts peers from (``allow = ["192.168.1.0/24"]``)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __contains__(self, host: str) -> bool:
        """Whether the peer address ``host`` (IPv4, IPv6 with or without a zone,
        IPv4-mapped IPv6) lies in one of the networks."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


__all__ = ["Allowed"]
