"""Reach preview URLs (`http://8080-<id>.localhost:PORT`) from httpx.

RFC 6761 makes every `*.localhost` name loopback, and browsers resolve them so, but the system
resolver here does not. This transport connects such hosts to 127.0.0.1 and leaves the Host header
as the URL had it, which is what the sandbox host routes previews by.
"""

from __future__ import annotations

import ipaddress
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


def host_name(host_header: str) -> str:
    """The name in a Host header, without port, brackets or trailing dot, lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        host = name
    return host.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, public_hosts: Iterable[str] = (), *, localhost_subdomains: bool = False) -> bool:
    """Whether a request's Host names this server: a loopback name or address, one of the
    configured public names, or (for a preview router) any `*.localhost` name. A DNS-rebinding page
    reaches a loopback port under its own domain, so its requests fail this check."""
    if not host_header:
        return False
    name = host_name(host_header)
    if is_loopback_name(name) or name in {host_name(h) for h in public_hosts}:
        return True
    return localhost_subdomains and is_localhost_name(name)


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
