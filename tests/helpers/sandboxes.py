"""Helpers for tests that drive a sandbox host through the e2b SDK: create-and-kill, a background
HTTP server with a preview URL, a sandbox's host-side record and its processes (in either mode)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from e2b import AsyncSandbox, CommandExitException

from genloop.http import preview_client
from sandbox_host.isolation import namespace_processes
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


def pid_namespace_of(host: RunningHost, sandbox_id: str) -> int:
    """The inode of the sandbox's pid namespace: every process it has lives there, in either mode."""
    ns = record_of(host, sandbox_id)["pid_ns"]
    assert ns, "an isolated sandbox records its pid namespace"
    return ns


def processes_in(pid_ns: int) -> list[int]:
    """The live processes of a sandbox, by its pid namespace (pid_namespace_of)."""
    return namespace_processes(pid_ns)


ISOLATION_PROBE = (
    "cat {a_home} /home/user/secret.txt /root/.bashrc 2>&1; ls /work {state_dir} 2>&1; "
    "kill -9 {host_pid} 2>&1; kill -9 {test_pid} 2>&1; "
    "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\" 2>&1 | tail -1; "
    "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status /proc/1/status; "
    "unshare -Ur true 2>/dev/null; echo unshare=$?; "
    "id -u"
)


async def assert_isolated_from_each_other(host: RunningHost, a: AsyncSandbox, b: AsyncSandbox) -> str:
    """Sandbox b can see neither a's files, the host's home, the repository, state_dir, host pids nor
    the host's loopback services; it holds no capabilities; it is uid 1000. Returns b's output."""
    await a.files.write("/home/user/secret.txt", "a's secret")
    a_init = record_of(host, a.sandbox_id)["init_pid"]
    a_home = Path(f"/proc/{a_init}/root/home/user/secret.txt")
    # A's home is a tmpfs in A's mount namespace: not on the host's disk; the host reaches it only
    # through A's pid 1.
    assert not (host.state_dir / a.sandbox_id / "home" / "secret.txt").exists()
    assert a_home.read_text() == "a's secret"
    probe = ISOLATION_PROBE.format(
        a_home=a_home, state_dir=host.state_dir, host_pid=host.pid, test_pid=os.getpid(), port=host.port
    )
    out = (await b.commands.run(probe, timeout=30)).stdout
    assert "a's secret" not in out
    assert out.count("No such file or directory") >= 5, out
    assert out.count("No such process") == 2, out  # host pids do not exist in its pid namespace
    assert "ConnectionRefusedError" in out, out  # its own network: the host's port is not there
    caps = re.findall(r"Cap(?:Inh|Prm|Eff|Bnd|Amb):\s*([0-9a-f]+)", out)
    assert len(caps) == 10 and set(caps) == {"0000000000000000"}, out  # b's shell and its pid 1
    assert "unshare=0" not in out  # no nested user namespace: no capabilities to be had there
    assert out.strip().endswith("1000")
    return out
