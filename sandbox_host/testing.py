"""A real sandbox host for tests: `async with running_host(tmp_path) as host: ...`.

The host runs as a subprocess (`python -m sandbox_host`) on a free port, exactly as in production.
On exit it is stopped and every sandbox it started is killed, even if the test killed the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from genloop.settings import get_settings
from sandbox_host.config import HostConfig
from sandbox_host.egress import host_networks, may_dial
from sandbox_host.isolation import IsolationUnavailable, check_traversable
from sandbox_host.sandboxes import SandboxManager

READY_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_INDEXES = ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def package_index_exceptions() -> list[str]:
    """The addresses package indexes resolve to here that egress would deny.

    Some machines (CI sandboxes) resolve PyPI to a mirror at a private or documentation address;
    tests that install packages allow exactly those, as an operator with a mirror on the LAN would
    (`sandbox_host.egress_allowed_networks`).
    """
    found: set[str] = set()
    networks = host_networks()
    for name in PACKAGE_INDEXES:
        try:
            infos = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            continue
        found.update(info[4][0] for info in infos if not may_dial(info[4][0], networks))
    return sorted(found)


class RunningHost:
    def __init__(
        self,
        state_dir: Path,
        log_path: Path,
        port: int,
        api_key: str | None,
        overrides: dict[str, Any],
        env: dict[str, str] | None = None,
    ):
        """`api_key` None: the host generates its key into its data dir (`data_dir`); `env`: extra
        environment variables of the host process."""
        self.state_dir = state_dir
        self.data_dir = state_dir.parent / "data"
        self.log_path = log_path
        self.port = port
        self.api_key = api_key or ""
        self._generate_key = api_key is None
        self.url = f"http://127.0.0.1:{port}"
        self._overrides = overrides
        self._env = env or {}
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "the host is not running"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def sdk_options(self) -> dict[str, Any]:
        """Keyword arguments for AsyncSandbox.create/connect/list (and instance calls' **opts)."""
        return {"api_key": self.api_key, "api_url": self.url, "sandbox_url": self.url}

    def config(self) -> HostConfig:
        settings = get_settings()
        section = settings.sandbox_host.model_copy(
            update={"state_dir": str(self.state_dir), "port": self.port, **self._overrides}
        )
        return HostConfig.from_settings(settings.model_copy(update={"sandbox_host": section}))

    @property
    def key_file(self) -> Path:
        return self.data_dir / "sandbox-host.key"

    async def start(self) -> None:
        env = {**os.environ, **self._env}
        for key, value in self._overrides.items():
            env[f"GENLOOP_SANDBOX_HOST_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        args = ["--port", str(self.port), "--state-dir", str(self.state_dir)]
        if self._generate_key:
            env["GENLOOP_DATA_DIR"] = str(self.data_dir)
            env.pop("GENLOOP_SANDBOX_HOST_API_KEY", None)
        else:
            args += ["--api-key", self.api_key]
        with open(self.log_path, "ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sandbox_host", *args, cwd=REPO_ROOT, env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self._process.returncode is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/health", timeout=1)).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        try:
            if self._process.returncode is not None or time.monotonic() >= deadline:
                raise RuntimeError("it did not answer /health")
            if self._generate_key:
                self.api_key = self.key_file.read_text().strip()
        except (RuntimeError, OSError) as exc:
            await self.kill()  # a failed start leaves no host behind
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"sandbox host did not become ready ({exc}):\n{tail}") from None

    async def _signal(self, sig: int) -> None:
        if self._process is None or self._process.returncode is not None:
            return
        self._process.send_signal(sig)
        await self._process.wait()

    async def stop(self) -> None:
        """SIGTERM: a graceful stop. Sandboxes keep running; the next start adopts them."""
        await self._signal(signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL the host, as a crash would."""
        await self._signal(signal.SIGKILL)

    async def restart(self, *, crash: bool = False) -> None:
        await (self.kill() if crash else self.stop())
        await self.start()

    async def reap(self) -> None:
        """Kill every sandbox this host started (the host must not be running)."""
        manager = SandboxManager(self.config())
        await manager.start()
        await manager.kill_all()
        await manager.shutdown()


@contextlib.asynccontextmanager
async def running_host(
    tmp_dir: Path | str, *, generate_key: bool = False, env: dict[str, str] | None = None, **setting_overrides: Any
) -> AsyncIterator[RunningHost]:
    """Start a host whose state lives under tmp_dir; `setting_overrides` are settings.sandbox_host fields.

    `generate_key`: start it without a key, so it generates one into `host.data_dir` (read back into
    `host.api_key`). `env`: extra environment variables of the host process.

    Sandboxes run as unprivileged uids that must be able to reach state_dir; when tmp_dir's parents
    are private (pytest's tmp_path is under a 0700 directory) the state goes to a fresh directory in
    the system temp dir instead, removed afterwards.
    """
    api_key = None if generate_key else str(setting_overrides.pop("api_key", None) or "test-" + secrets.token_hex(8))
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        check_traversable(tmp_dir)
        state_dir, own_dir = tmp_dir / "sandbox-host", None
    except IsolationUnavailable:
        own_dir = Path(tempfile.mkdtemp(prefix="sandbox-host-"))
        os.chmod(own_dir, 0o711)
        state_dir = own_dir / "state"
    host = RunningHost(state_dir, tmp_dir / "sandbox-host.log", free_port(), api_key, setting_overrides, env)
    try:
        await host.start()
        yield host
    finally:
        await host.stop()
        await host.reap()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
