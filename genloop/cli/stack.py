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
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    log_path: Path | None = None

    async def start(self, env: dict[str, str]) -> None:
        out = open(self.log_path, "ab") if self.log_path else None
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT if out else None,
            preexec_fn=_die_with_parent,
        )
        if out:
            out.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        if not self.ready_port:
            return
        deadline = time.monotonic() + timeout
        while not port_open(*self.ready_port):
            if self.proc and self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (log: {self.log_path})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not listen on {self.ready_port} within {timeout:.0f}s")
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
        if port_open(s.temporal.ip, s.temporal.port):
            log.info("reusing the Temporal server already listening on %s:%s", s.temporal.ip, s.temporal.port)
        else:
            children.append(Child("temporal", dev_server_command(s), (s.temporal.ip, s.temporal.port)))
        if not s.uses_e2b_cloud and not s.sandbox.api_url:
            children.append(
                Child("sandbox-host", self._python("genloop.cli", "sandbox-host"), (s.sandbox_host.host, s.sandbox_host.port))
            )
        children.append(Child("worker", self._python("genloop.cli", "worker")))
        children.append(Child("api", self._python("genloop.cli", "api"), (s.api.host, s.api.port)))
        for child in children:
            child.log_path = logs / f"{child.name}.log"
        return children

    async def start(self) -> None:
        from migrations.apply import upgrade

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GENLOOP_DATA_DIR=str(self.settings.data_dir))
        self.children = self._plan()
        for child in self.children:
            if child.name == "worker":
                # Schema first: the worker and API expect the migrated database.
                await upgrade(self.settings.database_url)
            log.info("starting %s", child.name)
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
            log.error("%s exited with %s; restart #%d in %.0fs (log: %s)",
                      child.name, code, child.restarts + 1, backoff, child.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30)
            child.restarts += 1
            await child.start(env)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        # Reverse order: the API and worker drain before the services they depend on go away.
        for child in reversed(self.children):
            await child.stop()

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
                    raise TimeoutError(f"the API at {self.api_url} did not become healthy")
                await asyncio.sleep(0.2)
