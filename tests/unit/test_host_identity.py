"""Which sandbox tier a worker is in: its own local host's (the host's id from GET /health), or the
shared one of an E2B-compatible endpoint that is not genloop's host (no id: no host queue)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from genloop.cli.worker import host_identity
from genloop.settings import load_settings


@contextlib.asynccontextmanager
async def endpoint(body: bytes, content_type: str = "application/json"):
    """A real HTTP server answering every request with 200 and `body`."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (content_type.encode(), len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def settings_for(url: str):
    return load_settings(environ={"GENLOOP_SANDBOX_API_URL": url, "GENLOOP_SANDBOX_API_KEY": "k"})


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    (b'{"status": "ok", "host_id": "h-abc123"}', "application/json", "h-abc123"),  # genloop's host
    (b'{"status": "ok"}', "application/json", ""),  # an E2B-compatible endpoint without ids
    (b"OK", "text/plain", ""),  # one whose /health is not JSON at all
    (b'["not", "a", "mapping"]', "application/json", ""),
])
async def test_the_host_id_decides_the_tier(body, content_type, expected):
    async with endpoint(body, content_type) as url:
        assert await host_identity(settings_for(url), wait_s=5) == expected


async def test_e2b_cloud_has_no_host_queue():
    settings = load_settings(environ={"E2B_API_KEY": "e2b_test"})
    assert settings.uses_e2b_cloud and await host_identity(settings) == ""


async def test_a_host_that_does_not_answer_gives_up_without_a_queue(caplog):
    async with endpoint(b"") as url:
        pass  # closed again: nothing listens there now
    assert await host_identity(settings_for(url), wait_s=0.5) == ""
    assert "did not answer /health" in caplog.text
