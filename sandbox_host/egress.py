"""Egress for isolated sandboxes: an HTTP CONNECT proxy on the host.

A sandbox's network namespace has loopback only. When a sandbox is created with internet access
(E2B's default), its agent listens on 127.0.0.1:3128 inside the namespace and relays each
connection through a unix socket (state_dir/egress/proxy.sock, bind-mounted into every sandbox) to
this proxy, and commands get HTTP(S)_PROXY pointing there, so pip and npm reach their registries.

Only CONNECT tunnels are served, and only to addresses `may_dial` accepts: globally reachable
unicast that is not one of the host's own addresses or connected subnets, plus the networks the
operator explicitly allows (`egress_allowed_networks`, e.g. a package mirror on the LAN). Names are
resolved here and the checked address is the one dialled, so DNS cannot slip past the check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path

import psutil

log = logging.getLogger("sandbox_host.egress")

PROXY_PORT_INSIDE = 3128
SOCKET_NAME = "proxy.sock"
MAX_HEAD_BYTES = 8192
CONNECT_TIMEOUT_S = 15
CHUNK = 64 * 1024
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What `is_global` (Python 3.11's registry snapshot) still calls global but no sandbox may dial.
_NOT_GLOBAL = [
    ipaddress.ip_network(n)
    for n in (
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated, RFC 7526)
        "::/96",  # IPv4-compatible (deprecated, RFC 4291): never dialled legitimately
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "fec0::/10",  # site-local (deprecated, RFC 3879)
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # SRv6 SIDs (RFC 9602)
        "2001::/23",  # IETF protocol assignments, Teredo included (newer Pythons list exceptions)
    )
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, NAT64, 6to4, Teredo server and client):
    dialling it reaches them, so they are judged too."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def may_dial(
    ip: IPAddress | str, host_networks: Iterable[IPNetwork] = (), allowed: Iterable[IPNetwork] = ()
) -> bool:
    """May a sandbox's egress proxy connect to `ip`?

    `host_networks`: the host's own addresses and connected subnets (`host_networks()`), never
    reachable from a sandbox. `allowed`: the operator's exceptions, which win over every rule but
    loopback, unspecified and multicast.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%")[0])
    networks, allowed = list(host_networks), list(allowed)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if ip.ipv4_mapped is not None or ip in _NAT64:
            # Really an IPv4 connection: only the embedded address counts (Python files both
            # prefixes under reserved ::/8).
            return all(may_dial(v4, networks, allowed) for v4 in embedded)
        if any(not may_dial(v4, networks, allowed) for v4 in embedded):
            return False
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
        return False
    if any(ip in net for net in allowed if net.version == ip.version):
        return True
    if not ip.is_global or ip.is_reserved or ip.is_link_local:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    if any(ip in net for net in _NOT_GLOBAL if net.version == ip.version):
        return False
    return not any(ip in net for net in networks if net.version == ip.version)


def host_networks() -> list[IPNetwork]:
    """Every address of this host and the subnet each interface is connected to (gateway and LAN)."""
    found: list[IPNetwork] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            for value in (addr.address, getattr(addr, "ptp", None)):
                if value:
                    found.append(ipaddress.ip_network(value.split("%")[0]))
            if addr.netmask:
                prefix = bin(int(ipaddress.ip_address(addr.netmask.split("/")[0]))).count("1")
                found.append(ipaddress.ip_network(f"{addr.address.split('%')[0]}/{prefix}", strict=False))
    return found


def proxy_env() -> dict[str, str]:
    url = f"http://127.0.0.1:{PROXY_PORT_INSIDE}"
    env = {"HTTP_PROXY": url, "HTTPS_PROXY": url, "NO_PROXY": "localhost,127.0.0.1,::1"}
    env.update({k.lower(): v for k, v in env.items()})
    return env


class EgressProxy:
    def __init__(self, state_dir: Path, allowed: Iterable[IPNetwork] = ()):
        self.directory = state_dir / "egress"
        self.socket_path = self.directory / SOCKET_NAME
        self._server: asyncio.AbstractServer | None = None
        self._host_networks = host_networks()
        self._allowed = list(allowed)

    async def start(self) -> None:
        self.directory.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.directory, 0o755)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o666)  # sandboxes run as many different uids

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, OSError):
            writer.close()
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or parts[0] != "CONNECT" or len(head) > MAX_HEAD_BYTES:
            await self._refuse(writer, 405, "only CONNECT tunnels are supported (HTTPS_PROXY)")
            return
        host, _, port_text = parts[1].rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit():
            await self._refuse(writer, 400, "bad CONNECT target")
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            await self._refuse(writer, 502, f"cannot resolve {host}")
            return
        allowed = [info for info in infos if may_dial(info[4][0], self._host_networks, self._allowed)]
        if not allowed or len(allowed) != len(infos):
            log.warning("refused egress to %s (%s)", parts[1], ", ".join(i[4][0] for i in infos))
            await self._refuse(writer, 403, f"{host} resolves to an address sandboxes may not reach")
            return
        address = allowed[0][4][0]
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(address, int(port_text)), CONNECT_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError):
            await self._refuse(writer, 502, f"cannot connect to {parts[1]}")
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        body = reason.encode()
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        try:
            await writer.drain()
        except OSError:
            pass
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass
    finally:
        if reader.at_eof():
            writer.close()
