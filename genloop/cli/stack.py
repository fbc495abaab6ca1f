"""`genloop up`: the local stack as supervised child processes.

Temporal dev server (file-backed, so in-flight builds resume after a restart), migrations, sandbox
host, worker, API. Children run in their own process groups and get SIGTERM if this process dies
(PR_SET_PDEATHSIG), so neither Ctrl-C nor a crash leaves orphans. A child that exits unexpectedly is
restarted with backoff.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from genloop.devserver import temporal_binary
from genloop.errors import GenloopError
from genloop.settings import Settings

log = logging.getLogger("genloop.cli.stack")

_PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0


def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class StackError(Exception):
    """An expected start-up failure (a port in use, a service that will not start, a database that
    cannot be reached): one line that names the cause and what to do about it."""

    def __repr__(self) -> str:
        return f"StackError({str(self)!r})"


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def dev_server_command(settings: Settings) -> list[str]:
    t = settings.temporal
    cmd = [
        temporal_binary(), "server", "start-dev",
        "--ip", t.ip, "--port", str(t.port), "--ui-port", str(t.ui_port),
        "--db-filename", str(settings.resolve(t.db_file)),
        "--log-level", "warn",
    ]
    if t.namespace != "default":
        cmd += ["--namespace", t.namespace]
    cmd += t.dev_server_args()
    for name, kind in t.search_attributes.items():
        cmd += ["--search-attribute", f"{name}={kind.capitalize()}"]
    return cmd


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_port: tuple[str, int] | None = None
    port_setting: str = ""  # the variable that moves it to another port
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    log_path: Path | None = None

    def last_log_line(self) -> str:
        """The child's last meaningful log line: services end a failed start with the reason."""
        try:
            lines = (
                [line.strip() for line in self.log_path.read_text(errors="replace").splitlines()]
                if self.log_path
                else []
            )
        except OSError:
            lines = []
        lines = [line for line in lines if line and not line.startswith(("Traceback", "File ", "^"))]
        return lines[-1] if lines else "no output"

    async def start(self, env: dict[str, str]) -> None:
        out = open(self.log_path, "ab") if self.log_path else None
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT if out else None,
            preexec_fn=_die_with_parent,
        )
        if out:
            out.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        if not self.ready_port:
            await asyncio.sleep(0.5)  # no port to wait for: give it a moment to fail fast instead
            if self.proc and self.proc.returncode is not None:
                raise StackError(f"the {self.name} stopped at start: {self.last_log_line()} (log: {self.log_path})")
            return
        deadline = time.monotonic() + timeout
        while not port_open(*self.ready_port):
            if self.proc and self.proc.returncode is not None:
                raise StackError(f"the {self.name} stopped at start: {self.last_log_line()} (log: {self.log_path})")
            if time.monotonic() > deadline:
                raise StackError(
                    f"the {self.name} did not listen on {self.ready_port[0]}:{self.ready_port[1]} "
                    f"within {timeout:.0f}s (log: {self.log_path})"
                )
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("%s did not stop in %.0fs: killing", self.name, STOP_GRACE_S)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self._stopping = False
        self._supervisors: list[asyncio.Task] = []

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", *args]

    def _plan(self) -> list[Child]:
        s = self.settings
        logs = s.resolve("logs")
        logs.mkdir(parents=True, exist_ok=True)
        children = []
        if s.temporal.address:
            log.info("using the Temporal server at %s (TEMPORAL_ADDRESS)", s.temporal.address)
        elif port_open(s.temporal.ip, s.temporal.port):
            log.info("reusing the Temporal server already listening on %s:%s", s.temporal.ip, s.temporal.port)
        else:
            children.append(
                Child(
                    "Temporal dev server",
                    dev_server_command(s),
                    (s.temporal.ip, s.temporal.port),
                    "GENLOOP_TEMPORAL_PORT",
                )
            )
        if self.local_sandbox_host:
            children.append(
                Child(
                    "sandbox host",
                    self._python("genloop.cli", "sandbox-host"),
                    (s.sandbox_host.host, s.sandbox_host.port),
                    "GENLOOP_SANDBOX_HOST_PORT",
                )
            )
        children.append(Child("worker", self._python("genloop.cli", "worker")))
        children.append(Child("API", self._python("genloop.cli", "api"), (s.api.host, s.api.port), "GENLOOP_API_PORT"))
        for child in children:
            child.log_path = logs / f"{child.name.lower().replace(' ', '-')}.log"
        return children

    @property
    def local_sandbox_host(self) -> bool:
        return not self.settings.uses_e2b_cloud and not self.settings.sandbox.api_url

    def _check_ports(self, children: list[Child]) -> None:
        for child in children:
            if child.ready_port and port_open(*child.ready_port):
                host, port = child.ready_port
                raise StackError(
                    f"port {port} on {host} is already in use, so the {child.name} cannot start: stop "
                    f"what uses it (a `genloop up` still running?) or set {child.port_setting}"
                )

    async def _check_temporal(self) -> None:
        from genloop.temporal import connect

        try:
            await asyncio.wait_for(connect(self.settings), 10)
        except Exception as exc:  # noqa: BLE001 - the SDK reports an unreachable server as RuntimeError
            raise StackError(
                f"cannot reach Temporal at {self.settings.temporal.target} ({type(exc).__name__}): check "
                "TEMPORAL_ADDRESS, or unset it to run a local dev server"
            ) from None

    async def start(self) -> None:
        """Start every service in order; a StackError (one line) when one cannot start."""
        from migrations.apply import upgrade

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GENLOOP_DATA_DIR=str(self.settings.data_dir))
        self.children = self._plan()
        self._check_ports(self.children)
        if self.settings.temporal.address:
            await self._check_temporal()
        for child in self.children:
            if child.name == "worker":
                # Schema first: the worker and API expect the migrated database.
                try:
                    await upgrade(self.settings.database_url)
                except GenloopError as err:
                    raise StackError(
                        f"cannot reach the database ({err.detail}): start it, or fix GENLOOP_DATABASE_URL"
                    ) from None
            log.info("starting the %s", child.name)
            await child.start(env)
            await child.wait_ready()
            self._supervisors.append(asyncio.create_task(self._supervise(child, env)))

    async def _supervise(self, child: Child, env: dict[str, str]) -> None:
        backoff = 1.0
        while not self._stopping:
            assert child.proc is not None
            code = await child.proc.wait()
            if self._stopping:
                return
            log.error(
                "%s exited with %s; restart #%d in %.0fs (log: %s)",
                child.name,
                code,
                child.restarts + 1,
                backoff,
                child.log_path,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30)
            child.restarts += 1
            await child.start(env)

    async def stop(self) -> list[str]:
        """Stop every child this stack started; returns their names, in the order stopped."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        stopped = []
        # Reverse order: the API and worker drain before the services they depend on go away.
        for child in reversed(self.children):
            if child.proc is not None:
                await child.stop()
                stopped.append(child.name)
        return stopped

    async def sandbox_mode(self) -> str:
        """How sandboxes run: the local host's mode (per-uid, rootless, unsafe), or E2B cloud."""
        s = self.settings
        if s.uses_e2b_cloud:
            return "E2B cloud"
        if not self.local_sandbox_host:
            return f"the E2B-compatible host at {s.sandbox.api_url}"
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                health = (await http.get(f"{s.sandbox_host_url}/health")).json()
        except (httpx.HTTPError, ValueError):
            return "local host"
        mode = health.get("mode") or ("isolated" if health.get("isolated") else "unsafe (no isolation)")
        return f"local host at {s.sandbox_host_url}, {mode}"

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api.host}:{self.settings.api.port}"

    async def wait_api_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                try:
                    if (await http.get(f"{self.api_url}/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the API at {self.api_url} did not become healthy within {timeout:.0f}s "
                        f"(log: {self.settings.resolve('logs')}/api.log)"
                    )
                await asyncio.sleep(0.2)
