"""Egress for isolated sandboxes: one HTTP CONNECT proxy per sandbox, on the host.

A sandbox's network namespace has loopback only. When a sandbox is created with internet access
(E2B's default), its agent listens on 127.0.0.1:3128 inside the namespace and relays each
connection through a unix socket to this proxy, and commands get HTTP(S)_PROXY pointing there, so
pip and npm reach their registries. Each sandbox has its own socket (state_dir/egress/<id>/,
bind-mounted read-only at /run/e2b-egress), so its connection cap and its log lines are its own.

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
HEAD_TIMEOUT_S = 30
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
    # 6to4 (2002::/16) is judged by its embedded IPv4 (above) alone: older Pythons' registries (3.11.2,
    # Debian 12's) file the whole prefix as private, newer ones as global.
    sixtofour = isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None
    if not (ip.is_global or sixtofour) or ip.is_reserved or ip.is_link_local:
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
    # Node's own fetch() and http(s) ignore the variables unless told (npm reads them itself).
    env["NODE_USE_ENV_PROXY"] = "1"
    return env


class EgressProxy:
    """One sandbox's CONNECT proxy: its own socket, connection cap and log budget.

    Refusals are logged once per sandbox and counted (the count is logged when the proxy closes):
    a sandbox opening thousands of connections must not grow the host's log with them.
    """

    def __init__(
        self, sandbox_id: str, directory: Path, max_connections: int, allowed: Iterable[IPNetwork] = ()
    ):
        self.sandbox_id = sandbox_id
        self.directory = directory
        self.socket_path = directory / SOCKET_NAME
        self.max_connections = max_connections
        self.active = 0
        self.refused = {"cap": 0, "denied": 0}
        self._server: asyncio.AbstractServer | None = None
        self._host_networks = host_networks()
        self._allowed = list(allowed)

    async def start(self, owner_uid: int | None) -> None:
        # Only the sandbox's uid may reach its proxy (the directory is 0700 and its own): other local
        # users could otherwise use up its connection cap. Rootless hosts own it themselves.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if owner_uid is not None:
            os.chown(self.directory, owner_uid, owner_uid)
        if self.socket_path.is_socket() or self.socket_path.is_symlink():
            self.socket_path.unlink()
        # A full backlog makes the agent's connects fail with EAGAIN: let it hold every pending one.
        self._server = await asyncio.start_unix_server(
            self._handle, path=str(self.socket_path), backlog=socket.SOMAXCONN
        )
        os.chmod(self.socket_path, 0o666)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if any(self.refused.values()):
            log.info(
                "sandbox %s: %d egress connections refused at the cap, %d to denied addresses",
                self.sandbox_id,
                self.refused["cap"],
                self.refused["denied"],
            )

    def _note_refusal(self, kind: str, message: str, *args: object) -> None:
        self.refused[kind] += 1
        if self.refused[kind] == 1:
            log.warning("sandbox %s: " + message + " (logged once per sandbox)", self.sandbox_id, *args)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            self._note_refusal("cap", "egress refused: %d concurrent connections is the cap", self.max_connections)
            await _refuse(writer, 503, "too many concurrent egress connections from this sandbox")
            return
        self.active += 1
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
        finally:
            self.active -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or parts[0] != "CONNECT" or len(head) > MAX_HEAD_BYTES:
            await _refuse(writer, 405, "only CONNECT tunnels are supported (HTTPS_PROXY)")
            return
        host, _, port_text = parts[1].rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            await _refuse(writer, 400, "bad CONNECT target")
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            await _refuse(writer, 502, f"cannot resolve {host}")
            return
        addresses = [info[4][0] for info in infos]
        if not addresses or not all(may_dial(a, self._host_networks, self._allowed) for a in addresses):
            self._note_refusal("denied", "egress to %s (%s) denied", parts[1], ", ".join(addresses))
            await _refuse(writer, 403, f"{host} resolves to an address sandboxes may not reach")
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(addresses[0], int(port_text)), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError):
            await _refuse(writer, 502, f"cannot connect to {parts[1]}")
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    body = reason.encode()
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode() + body)
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
