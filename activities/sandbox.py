"""The e2b SDK as genloop uses it: one code path for the local sandbox host and E2B cloud.

The only difference between the two is the connection options (api_url/sandbox_url for the local
host) and how the preview is reached from this process (genloop.http.preview_client).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import e2b
import httpx
from e2b import AsyncSandbox, SandboxQuery

from genloop.errors import ErrorKind, GenloopError, redact_secrets
from genloop.http import is_localhost_name
from genloop.settings import Settings

SANDBOX_METADATA_KEY = "genloop_build_id"
PROJECT_METADATA_KEY = "genloop_project_id"


def idempotency_key_for(build_id: str, serve: int = 0) -> str:
    # Derived from the build id, so a retried create returns the sandbox the first attempt made; a
    # version served again (serve n) gets a key of its own, so it never gets the old, gone sandbox.
    # Hashed because E2B accepts only [a-z0-9-] and build ids may hold capitals and underscores.
    name = build_id if not serve else f"{build_id}/serve-{serve}"
    return "genloop-" + hashlib.sha256(name.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class SandboxConfig:
    api_key: str
    api_url: str | None
    template: str
    timeout_s: int

    @classmethod
    def from_settings(cls, settings: Settings) -> SandboxConfig:
        return cls(
            api_key=settings.sandbox_api_key,
            api_url=settings.sandbox_api_url,
            template=settings.sandbox.template,
            timeout_s=settings.sandbox.timeout_s,
        )

    def sdk_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"api_key": self.api_key}
        if self.api_url:
            # A self-hosted endpoint serves both the control plane and envd (routed by E2b-Sandbox-Id).
            opts.update(api_url=self.api_url, sandbox_url=self.api_url)
        return opts

    @property
    def is_local(self) -> bool:
        return bool(self.api_url)

    def __repr__(self) -> str:  # never show the key
        return f"SandboxConfig(api_url={self.api_url!r}, template={self.template!r})"


class SandboxClient:
    """Create / reattach / find / kill sandboxes. Subclassed by fault-injection test doubles."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config

    async def create(self, build_id: str, project_id: str, *, serve: int = 0) -> AsyncSandbox:
        return await AsyncSandbox.create(
            template=self.config.template,
            timeout=self.config.timeout_s,
            metadata={SANDBOX_METADATA_KEY: build_id, PROJECT_METADATA_KEY: project_id},
            idempotency_key=idempotency_key_for(build_id, serve),
            **self.config.sdk_options(),
        )

    async def connect(self, sandbox_id: str) -> AsyncSandbox:
        return await AsyncSandbox.connect(sandbox_id, **self.config.sdk_options())

    async def find_for_build(self, build_id: str) -> list[str]:
        return [s.sandbox_id for s in await self.list({SANDBOX_METADATA_KEY: build_id})]

    async def list(self, metadata: dict[str, str] | None = None) -> list[Any]:
        paginator = AsyncSandbox.list(
            query=SandboxQuery(metadata=metadata) if metadata else None, **self.config.sdk_options()
        )
        found: list[Any] = []
        while paginator.has_next:
            found.extend(await paginator.next_items())
        return found

    async def kill(self, sandbox_id: str) -> bool:
        return await AsyncSandbox.kill(sandbox_id, **self.config.sdk_options())

    def preview_url(self, sandbox: AsyncSandbox, port: int) -> str:
        host = sandbox.get_host(port)
        # The local host serves plain http on loopback names; E2B cloud serves https.
        scheme = "http" if is_localhost_name(host.rsplit(":", 1)[0]) else "https"
        return f"{scheme}://{host}"


def classify_sandbox_error(exc: BaseException) -> GenloopError:
    """Map an SDK / transport exception onto the error taxonomy; anything else is genloop's own bug."""
    if isinstance(exc, GenloopError):
        return exc
    detail = f"{type(exc).__name__}: {redact_secrets(str(exc))}"
    if isinstance(exc, e2b.RateLimitException):
        return GenloopError(ErrorKind.RATE_LIMITED, detail)
    if isinstance(exc, e2b.AuthenticationException):
        return GenloopError(ErrorKind.AUTH_FAILED, detail)
    if isinstance(exc, (e2b.SandboxNotFoundException, e2b.NotFoundException)):
        return GenloopError(ErrorKind.SANDBOX_GONE, detail)
    if isinstance(exc, (e2b.InvalidArgumentException, e2b.TemplateException, e2b.NotEnoughSpaceException)):
        return GenloopError(ErrorKind.INVALID_INPUT, detail)
    if isinstance(exc, (e2b.TimeoutException, httpx.TransportError, ConnectionError, OSError)):
        # Includes SandboxUnreachable / NotRunning (TimeoutException subclasses): the sandbox may
        # exist; the idempotency key and the metadata sweep make the retry safe.
        return GenloopError(ErrorKind.SANDBOX_UNREACHABLE, detail)
    if isinstance(exc, e2b.ServiceBusyException):
        return GenloopError(ErrorKind.SERVICE_BUSY, detail)
    if isinstance(exc, (e2b.SandboxException, httpx.HTTPError)):
        # Anything else from the SDK or below: retry (bounded by the activity's retry policy).
        return GenloopError(ErrorKind.SANDBOX_UNREACHABLE, detail)
    return GenloopError(ErrorKind.INTERNAL_ERROR, detail)


async def close_sdk_transports() -> None:
    """Close the e2b SDK's process-wide connection pools (pyqwest, a Rust runtime) while the event
    loop still runs; left open, their threads can abort the interpreter at exit."""
    from e2b.api import client_async

    for cache in (client_async._httpx_transports, client_async._transports, client_async._pools):
        transports = list(cache.values())
        cache.clear()
        for transport in transports:
            aclose = getattr(transport, "aclose", None)  # retry wrappers hold no connections
            if aclose is not None:
                await aclose()
