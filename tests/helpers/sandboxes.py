"""Helpers for tests that drive a sandbox host through the e2b SDK: create-and-kill, a background
HTTP server with a preview URL, a sandbox's host-side record."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from e2b import AsyncSandbox, CommandExitException

from genloop.http import preview_client
from sandbox_host.testing import RunningHost

SERVER = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = open('/home/user/project/content.txt', 'rb').read()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
    "        self.wfile.write(body)\n"
    "    def log_message(self, *a): pass\n"
    "http.server.ThreadingHTTPServer(('0.0.0.0', int(sys.argv[1])), H).serve_forever()\n"
)


@contextlib.asynccontextmanager
async def sandbox(sdk: dict[str, Any], **kwargs: Any) -> AsyncIterator[AsyncSandbox]:
    sb = await AsyncSandbox.create(**kwargs, **sdk)
    try:
        yield sb
    finally:
        await sb.kill()


async def serve(sb: AsyncSandbox, content: str, port: int = 8080) -> str:
    """Start the test server in the background (timeout=0: no deadline) and return its preview URL."""
    await sb.files.write_files(
        [
            {"path": "/home/user/project/server.py", "data": SERVER},
            {"path": "/home/user/project/content.txt", "data": content},
        ]
    )
    await sb.commands.run(f"cd /home/user/project && python3 server.py {port}", background=True, timeout=0)
    url = f"http://{sb.get_host(port)}/"
    async with preview_client(timeout=5) as client:
        for _ in range(200):
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return url
            await asyncio.sleep(0.05)
    raise AssertionError(f"server on port {port} never answered through {url}")


async def run(sb: AsyncSandbox, cmd: str, timeout: int = 60) -> tuple[int, str]:
    """Run a command; (exit code, stdout+stderr), whether it exits 0 or not."""
    try:
        result = await sb.commands.run(cmd, timeout=timeout)
        return result.exit_code, result.stdout + result.stderr
    except CommandExitException as exc:
        return exc.exit_code, (exc.stdout or "") + (exc.stderr or "")


def record_of(host: RunningHost, sandbox_id: str) -> dict[str, Any]:
    return json.loads((host.state_dir / sandbox_id / "record.json").read_text())
