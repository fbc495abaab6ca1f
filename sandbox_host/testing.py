"""A real sandbox host for tests: `async with running_host(tmp_path) as host: ...`.

The host runs as a subprocess (`python -m sandbox_host`) on a free port, exactly as in production.
On exit it is stopped and every sandbox it started is killed, even if the test killed the host.

Its mode is whatever the test process's user gives it: per-uid as root, rootless otherwise.
`run_as=UID` (root only) runs it as an unprivileged uid instead, i.e. rootless; `hide=[paths]` runs
it in a private mount namespace where those paths are /dev/null (a machine without system node).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from genloop.settings import get_settings
from sandbox_host.config import HostConfig
from sandbox_host.egress import host_networks, may_dial
from sandbox_host.isolation import IsolationUnavailable, check_traversable
from sandbox_host.sandboxes import SandboxManager
from sandbox_host.toolchain import node_distribution

READY_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_INDEXES = ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org")
# What a machine's own node installation puts on PATH (hidden for "a machine with only Python").
SYSTEM_NODE = tuple(f"{d}/{name}" for d in ("/usr/bin", "/usr/local/bin") for name in ("node", "nodejs", "npm", "npx"))


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


def unused_uid() -> int:
    """A uid no account and no process has: an unprivileged user for a test's host (root only)."""
    taken = {entry.pw_uid for entry in pwd.getpwall()}
    taken |= {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"] is not None}
    return next(uid for uid in range(61000, 65000) if uid not in taken)


def _others_may_traverse(path: Path) -> bool:
    return bool(os.stat(path).st_mode & 0o001)


def _reach_script(paths: Iterable[Path]) -> list[str]:
    """Shell lines (run as root in a private mount namespace) that let any uid reach `paths`: each
    directory on the way that others may not traverse (a venv's python under /root, say) is covered by
    a 0711 tmpfs holding only the entries on the way, bound back from the original."""
    paths = [p.resolve() for p in paths if p.exists()]
    lines: list[str] = []
    covered: set[Path] = set()
    while True:
        on_the_way = [d for p in paths for d in reversed(p.parents)]
        blocked = next((d for d in on_the_way if d not in covered and not _others_may_traverse(d)), None)
        if blocked is None:
            return lines
        covered.add(blocked)
        entries = sorted({p.relative_to(blocked).parts[0] for p in paths if blocked in p.parents})
        d = shlex.quote(str(blocked))
        lines.append(f"s=$(mktemp -d) && mount --bind {d} $s && mount -t tmpfs -o mode=0711 reach {d}")
        for name in entries:
            q = shlex.quote(name)
            lines.append(f"{{ [ -d $s/{q} ] && mkdir {d}/{q} || touch {d}/{q}; }} && mount --bind $s/{q} {d}/{q}")
        lines.append("umount -l $s && rmdir $s")


def private_mounts_prefix(
    *, hide: Sequence[str] = (), run_as: int | None = None, reach: Iterable[Path] = ()
) -> list[str]:
    """A command prefix that runs a command in a private mount namespace where each path of `hide` that
    exists is /dev/null, as uid `run_as` (root only) with `reach` made reachable for it. An ordinary
    user gets the namespace from an unprivileged user namespace (the command then sees itself as root
    of that namespace, which maps no other uid: a host there runs rootless)."""
    hidden = [p for p in hide if os.path.lexists(p)]
    if not hidden and run_as is None:
        return []
    lines = [f"mount --bind /dev/null {shlex.quote(p)}" for p in hidden]
    if os.geteuid() != 0:
        assert run_as is None, "only root can run a host as another uid"
        return ["unshare", "--map-root-user", "--mount", "--propagation", "private", "sh", "-ec",
                "\n".join([*lines, 'exec "$@"']), "sh"]  # fmt: skip
    if run_as is not None:
        lines += _reach_script(reach)
        lines.append(f'exec setpriv --reuid={run_as} --regid={run_as} --clear-groups -- "$@"')
    else:
        lines.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "\n".join(lines), "sh"]


class RunningHost:
    def __init__(
        self,
        state_dir: Path,
        log_path: Path,
        port: int,
        api_key: str | None,
        overrides: dict[str, Any],
        env: dict[str, str] | None = None,
        run_as: int | None = None,
        hide: Sequence[str] = (),
    ):
        """`api_key` None: the host generates its key into its data dir (`data_dir`); `env`: extra
        environment variables of the host process; `run_as`, `hide`: see the module docstring."""
        self.state_dir = state_dir
        self.data_dir = state_dir.parent / "data"
        self.log_path = log_path
        self.port = port
        self.api_key = api_key or ""
        self._generate_key = api_key is None
        self.url = f"http://127.0.0.1:{port}"
        self._overrides = overrides
        self._env = env or {}
        self._run_as = run_as
        self._hide = tuple(hide)
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

    async def health(self) -> dict[str, Any]:
        """GET /health: {"status", "isolated", "mode", "host_id"}."""
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.url}/health", timeout=5)).json()

    def _prefix(self) -> list[str]:
        needed = [Path(os.path.realpath(sys.executable)), Path(sys.base_prefix), Path(sys.prefix), REPO_ROOT]
        node = node_distribution()
        return private_mounts_prefix(hide=self._hide, run_as=self._run_as, reach=[*needed, *([node] if node else [])])

    async def start(self) -> None:
        env = {**os.environ, **self._env}
        if self._run_as is not None:
            env.update(HOME=str(self.state_dir.parent), GENLOOP_DATA_DIR=str(self.data_dir))
        for key, value in self._overrides.items():
            env[f"GENLOOP_SANDBOX_HOST_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        args = ["--port", str(self.port), "--state-dir", str(self.state_dir)]
        if self._generate_key:
            env["GENLOOP_DATA_DIR"] = str(self.data_dir)
            env.pop("GENLOOP_SANDBOX_HOST_API_KEY", None)
        else:
            args += ["--api-key", self.api_key]
        with open(self.log_path, "ab") as log:
            command = [*self._prefix(), sys.executable, "-m", "sandbox_host", *args]
            self._process = await asyncio.create_subprocess_exec(
                *command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log
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
    tmp_dir: Path | str,
    *,
    generate_key: bool = False,
    env: dict[str, str] | None = None,
    run_as: int | None = None,
    hide: Sequence[str] = (),
    **setting_overrides: Any,
) -> AsyncIterator[RunningHost]:
    """Start a host whose state lives under tmp_dir; `setting_overrides` are settings.sandbox_host fields.

    `generate_key`: start it without a key, so it generates one into `host.data_dir` (read back into
    `host.api_key`). `env`: extra environment variables of the host process. `run_as` (root only):
    the uid the host runs as, rootless. `hide`: paths that are /dev/null for the host and its sandboxes.

    Sandboxes of a root host run as unprivileged uids that must be able to reach state_dir; when
    tmp_dir's parents are private (pytest's tmp_path is under a 0700 directory) the state goes to a
    fresh directory in the system temp dir instead, removed afterwards. So does the state of a host
    run as another uid, which owns it there.
    """
    api_key = None if generate_key else str(setting_overrides.pop("api_key", None) or "test-" + secrets.token_hex(8))
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        if run_as is not None:
            raise IsolationUnavailable("the host's uid must own its state")
        check_traversable(tmp_dir)
        state_dir, own_dir = tmp_dir / "sandbox-host", None
    except IsolationUnavailable:
        own_dir = Path(tempfile.mkdtemp(prefix="sandbox-host-"))
        os.chmod(own_dir, 0o711)
        state_dir = own_dir / "state"
        if run_as is not None:
            for directory in (state_dir, own_dir / "data"):
                directory.mkdir(mode=0o700)
                os.chown(directory, run_as, run_as)
    host = RunningHost(
        state_dir, tmp_dir / "sandbox-host.log", free_port(), api_key, setting_overrides, env, run_as, hide
    )
    try:
        await host.start()
        yield host
    finally:
        await host.stop()
        await host.reap()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
