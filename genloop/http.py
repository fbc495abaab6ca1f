"""Reach preview URLs (`http://8080-<id>.localhost:PORT`) from httpx.

RFC 6761 makes every `*.localhost` name loopback, and browsers resolve them so, but the system
resolver here does not. This transport connects such hosts to 127.0.0.1 and leaves the Host header
as the URL had it, which is what the sandbox host routes previews by.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import ssl
from collections.abc import Iterable
from functools import cache
from typing import Any

import httpx


@cache
def _tls_context() -> ssl.SSLContext:
    # Building a default context loads the CA bundle (~17 ms of CPU); previews are checked per build.
    return ssl.create_default_context()


def is_localhost_name(host: str) -> bool:
    host = host.rstrip(".").lower()
    return host == "localhost" or host.endswith(".localhost")


def host_name(header: str) -> str:
    """The name in a Host header, without port or brackets, lower-case, without a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1 : header.find("]")] if "]" in header else ""
    elif header.count(":") == 1:
        name = header.split(":", 1)[0]
    else:
        name = header  # a bare IPv6 address, or no port
    return name.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostNames:
    """The Host header names a server answers to: loopback names and addresses, the address it is
    bound to, the configured public names (`*.example.com` allowed) and, for a preview router, any
    `*.localhost` name. A DNS-rebinding page reaches a loopback port under its own domain, so its
    requests name a host outside this set."""

    def __init__(self, bind_host: str, public_hosts: Iterable[str] = (), *, localhost_subdomains: bool = False):
        self.exact: set[str] = set()
        self.suffixes = [".localhost"] if localhost_subdomains else []
        try:
            if not ipaddress.ip_address(bind_host).is_unspecified:
                self.exact.add(bind_host.lower())
        except ValueError:
            self.exact.add(bind_host.lower().rstrip("."))
        for name in public_hosts:
            name = host_name(name)
            if name.startswith("*."):
                self.suffixes.append(name[1:])
            elif name:
                self.exact.add(name)

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        name = host_name(header)
        if is_loopback_name(name) or name in self.exact:
            return True
        return any(name.endswith(suffix) and len(name) > len(suffix) for suffix in self.suffixes)


# Per-connection headers a proxy must not pass on (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
     "upgrade"}
)

_NOT_LABEL = re.compile(r"[^a-z0-9-]+")
VERSION_LABEL = re.compile(r"\Av[0-9]{1,9}--[a-z0-9-]{1,60}\Z")
MAX_LABEL = 63  # a DNS label


def version_label(project_id: str, version_number: int) -> str:
    """The host label of one version's stable URL: `v3--my-project`. Project ids may hold capitals
    and underscores, which host names cannot tell apart: such an id gets a short hash so two
    projects never share a label."""
    prefix = f"v{version_number}--"
    name = _NOT_LABEL.sub("-", project_id.lower()).strip("-")
    suffix = "" if name == project_id else "-" + hashlib.sha256(project_id.encode()).hexdigest()[:6]
    room = MAX_LABEL - len(prefix) - len(suffix)
    if len(name) > room:
        name = name[:room].rstrip("-")
        suffix = suffix or "-" + hashlib.sha256(project_id.encode()).hexdigest()[:6]
        name = name[: MAX_LABEL - len(prefix) - len(suffix)].rstrip("-")
    return f"{prefix}{name or 'p'}{suffix}"


def preview_label_of(host_header: str | None) -> str | None:
    """The version label a preview request's Host names (`v3--my-project.localhost:8000` →
    `v3--my-project`), or None when the Host is not a version URL."""
    if not host_header:
        return None
    first = host_name(host_header).split(".", 1)[0]
    return first if VERSION_LABEL.match(first) and "." in host_name(host_header) else None


class LoopbackTransport(httpx.AsyncBaseTransport):
    def __init__(self, **transport_kwargs: Any):
        transport_kwargs.setdefault("verify", _tls_context())
        self._inner = httpx.AsyncHTTPTransport(**transport_kwargs)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if is_localhost_name(request.url.host):
            # The Host header was set from the original URL when the request was built.
            request.url = request.url.copy_with(host="127.0.0.1")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def preview_client(**client_kwargs: Any) -> httpx.AsyncClient:
    """An httpx.AsyncClient that can fetch `*.localhost` preview URLs."""
    return httpx.AsyncClient(transport=LoopbackTransport(), **client_kwargs)
