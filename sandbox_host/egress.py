"""Egress for isolated sandboxes: an HTTP CONNECT proxy on the host.

A sandbox's network namespace has loopback only. When a sandbox is created with internet access
(E2B's default), its agent listens on 127.0.0.1:3128 inside the namespace and relays each
connection through a unix socket (state_dir/egress/proxy.sock, bind-mounted into every sandbox) to
this proxy, and commands get HTTP(S)_PROXY pointing there, so pip and npm reach their registries.

Only CONNECT tunnels are served, and never to the host itself or its networks: loopback,
link-local, private (RFC 1918 / ULA), multicast and unspecified addresses, and the host's own
interface addresses, are refused. Names are resolved here and the checked address is the one
dialled, so DNS cannot be used to slip past the check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from pathlib import Path

import psutil

log = logging.getLogger("sandbox_host.egress")

PROXY_PORT_INSIDE = 3128
SOCKET_NAME = "proxy.sock"
MAX_HEAD_BYTES = 8192
CONNECT_TIMEOUT_S = 15
CHUNK = 64 * 1024
DENIED_NETWORKS = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "0.0.0.0/8", "fc00::/7")
]


def proxy_env() -> dict[str, str]:
    url = f"http://127.0.0.1:{PROXY_PORT_INSIDE}"
    env = {"HTTP_PROXY": url, "HTTPS_PROXY": url, "NO_PROXY": "localhost,127.0.0.1,::1"}
    env.update({k.lower(): v for k, v in env.items()})
    return env


def _host_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                found.add(ipaddress.ip_address(addr.address.split("%")[0]))
    return found


def address_allowed(address: str, host_addresses: set) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip in host_addresses:
        return False
    return not any(ip in net for net in DENIED_NETWORKS if net.version == ip.version)


class EgressProxy:
    def __init__(self, state_dir: Path):
        self.directory = state_dir / "egress"
        self.socket_path = self.directory / SOCKET_NAME
        self._server: asyncio.AbstractServer | None = None
        self._host_addresses = _host_addresses()

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
        allowed = [info for info in infos if address_allowed(info[4][0], self._host_addresses)]
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
