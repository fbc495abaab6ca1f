"""Instant in-process doubles for measuring orchestration overhead (named as doubles, bench only).

`InstantSandboxClient` is a `SandboxClient` whose create/connect return a `FakeSandbox`: file
writes, commands, set_timeout and kill do nothing. Its `get_host(port)` names an `AlwaysOkServer`
(a tiny asyncio HTTP server in the bench process answering 200 to everything) as
`{port}-{id}.localhost:{server_port}`, so the real `start_and_check` runs unchanged: it builds the
preview URL, opens `genloop.http.preview_client()`, finds `/health` answering 200 on its first probe
(the "already started" path) and returns — no launch, no 0.2 s poll sleep. The activity code, the
repository (SQLite) and the workflow are all the real ones.
"""

from __future__ import annotations

import asyncio
from typing import Any

from activities.sandbox import SandboxClient

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class AlwaysOkServer:
    """HTTP/1.1 keep-alive server on 127.0.0.1 that answers every request with 200 "ok"."""

    def __init__(self) -> None:
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> AlwaysOkServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                writer.write(_OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


class _Files:
    async def write_files(self, entries: list[dict[str, Any]]) -> list[Any]:
        return []

    async def write(self, path: str, data: Any) -> None:
        return None

    async def read(self, path: str) -> str:
        return "web: python3 app.py\n"


class _Handle:
    async def wait(self) -> None:
        await asyncio.Event().wait()

    async def disconnect(self) -> None:
        return None


class _Commands:
    async def run(self, cmd: str, **kwargs: Any) -> _Handle:
        return _Handle()


class FakeSandbox:
    def __init__(self, sandbox_id: str, server_port: int) -> None:
        self.sandbox_id = sandbox_id
        self._server_port = server_port
        self.files = _Files()
        self.commands = _Commands()

    def get_host(self, port: int) -> str:
        return f"{port}-{self.sandbox_id}.localhost:{self._server_port}"

    async def set_timeout(self, timeout: int) -> None:
        return None

    async def kill(self) -> bool:
        return True


class InstantSandboxClient(SandboxClient):
    """Test double: sandboxes that exist only as FakeSandbox objects (no host, no network but the
    preview health probe against AlwaysOkServer)."""

    def __init__(self, config: Any, server_port: int) -> None:
        super().__init__(config)
        self.server_port = server_port

    async def create(self, build_id: str, project_id: str, *, serve: int = 0) -> Any:
        return FakeSandbox(f"fake-{build_id}", self.server_port)

    async def connect(self, sandbox_id: str) -> Any:
        return FakeSandbox(sandbox_id, self.server_port)

    async def find_for_build(self, build_id: str) -> list[str]:
        return []

    async def list(self, metadata: dict[str, str] | None = None) -> list[Any]:
        return []

    async def kill(self, sandbox_id: str) -> bool:
        return True
