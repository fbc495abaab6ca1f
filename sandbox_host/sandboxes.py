"""Sandbox lifecycle: create, adopt after a restart, expire, kill, reap.

How a sandbox's processes are found and killed depends on the host's mode (isolation.py):

- per-uid (root): every sandbox runs as its own host uid, from a block derived from state_dir.
  `kill -9 -1` executed as the uid kills every process the sandbox has, atomically, whatever
  namespaces or sessions they moved to; a restarted host also kills every process in its uid block
  that belongs to no sandbox it adopted.
- rootless: every sandbox runs as the host's user, in a pid namespace of its own. Killing the
  namespace's init kills all of it. The init is recorded (pid, start time, pid-namespace inode)
  before the agent is given its secret, and an agent that never gets it exits, taking the namespace
  with it: so every sandbox that can run code is recorded, and the host only ever kills an init
  whose pid, start time and namespace all match a record.
- unsafe: the agent kills what it started when told to stop (per-uid as root as well).

A restarted host adopts the sandboxes whose records are intact and whose agents answer, and kills
the rest, so nothing it started is left behind.

Pause (README "Lifecycle"): the agent ends every command and streams a tar of the sandbox's files,
the host keeps it in the sandbox's host-only directory and kills every process; the record says
`paused` and has no init. Resume launches a new agent (a free slot, so per-uid perhaps another uid),
which unpacks the tar, under the same id, token and secret. Pause, resume and kill of one sandbox
take turns (`_transition`); a restarted host lists paused records again without adopting anything.

Sandboxes outlive the host process (a graceful stop leaves them running); each agent enforces its
sandbox's deadline itself, so none outlives its TTL even if the host never comes back.

Layout of state_dir (0711: traversable, not listable):

    <id>/            0700, the host's only: record.json (0600), agent.sock, agent.log; files.tar while
                     paused (its /home/user and /tmp, packed and later unpacked by its agent)
    host-id          the host's stable id (config.with_host_id), unless sandbox_host.host_id is set
    egress/<id>/     0700, owned by the sandbox: its egress proxy socket (bind-mounted read-only)
    unsafe/<id>/     --unsafe-no-isolation only: the sandbox's home and tmp on the host's disk
    toolchain/bin/   --unsafe-no-isolation only: python, pip, npm, npx links (toolchain.py)

(0711 as root, so bwrap and unsafe agents can reach their directories as the sandboxes' uids; 0700
for an ordinary user, whose sandboxes are that user.)

Nothing a sandbox can write is ever a path the host follows: the agent's socket is bound by the
host in <id>/ and handed to the agent as a descriptor, and the agent proves it holds the sandbox's
secret before a restarted host trusts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import string
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from sandbox_host import isolation, toolchain
from sandbox_host.agent_client import AGENT_SOCKET, AgentCallError, AgentClient, AgentUnavailable, listen_socket
from sandbox_host.config import HostConfig
from sandbox_host.egress import SOCKET_NAME, EgressProxy
from sandbox_host.egress import proxy_env as egress_env

log = logging.getLogger("sandbox_host.sandboxes")

ID_ALPHABET = string.ascii_lowercase + string.digits
RECORD_FILE = "record.json"
IDEMPOTENCY_FILE = "idempotency.json"
AGENT_LOG = "agent.log"
# What agent.log keeps of the sandbox's stdout/stderr. Its pid 1 (bwrap) holds them and is dumpable,
# so sandbox code can take them (pidfd_getfd): they are a pipe the host drains, never a file.
AGENT_LOG_MAX_BYTES = 256 * 1024
EGRESS_DIR = "egress"
UNSAFE_DIR = "unsafe"
TOOLCHAIN_DIR = "toolchain"
IDEMPOTENCY_TTL_S = 24 * 3600
AGENT_READY_TIMEOUT_S = 15.0
RUNNING = "running"
PAUSED = "paused"
# A paused sandbox's files: a tar of /home/user and /tmp made inside the sandbox by its agent, kept
# in its host-only directory. The host never unpacks it: the next agent of the sandbox does.
FILES_ARCHIVE = "files.tar"
# An auto-pausing sandbox's agent ends it this long after its TTL if the host has not paused it
# by then (the host is down): the agent's own deadline is the backstop that no sandbox outlives.
AUTO_PAUSE_GRACE_S = 120.0
# A pause's archive comes from inside the sandbox: the host bounds its size (what the sandbox's two
# writable tmpfs can hold, plus tar's overhead) and its duration, whatever the sandbox does to it.
ARCHIVE_SLACK_BYTES = 64 * 1024 * 1024
ARCHIVE_TIMEOUT_S = 300.0
ARCHIVE_CHUNK_MAX = 1024 * 1024  # the agent sends 64 KiB chunks


class SandboxLimitReached(Exception):
    pass


class SandboxStartError(Exception):
    pass


class SandboxPauseError(Exception):
    pass


@dataclass
class SandboxRecord:
    """What survives a host restart (state_dir/<id>/record.json)."""

    sandbox_id: str
    template_id: str
    slot: int
    uid: int
    access_token: str
    started_at: float
    end_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    internet_access: bool = True
    init_pid: int | None = None  # bwrap's pid 1 as the host sees it (unsafe: the agent)
    init_started: float | None = None  # its start time (psutil), to tell it from a reused pid
    pid_ns: int | None = None  # the inode of its pid namespace (isolated sandboxes)
    secret: str = ""  # hex; the agent proves it holds it (agent_client.AgentClient.verify)
    mode: str = isolation.PER_UID  # the host's mode when it was created (records before modes: per-uid)
    own_uid: bool = True  # `uid` is the sandbox's own (root hosts): cleanup by uid
    state: str = RUNNING  # RUNNING or PAUSED (a paused sandbox runs no process; its files are on disk)
    paused_at: float | None = None
    auto_pause: bool = False  # lifecycle on_timeout "pause": its TTL pauses it instead of killing it
    auto_resume: bool = False  # a preview request resumes it when paused

    def public(self) -> dict[str, Any]:
        """The record without its secret (what the idempotency file keeps)."""
        return {k: v for k, v in asdict(self).items() if k != "secret"}


class Sandbox:
    def __init__(self, record: SandboxRecord, directory: Path):
        self.record = record
        self.directory = directory
        self.agent: AgentClient | None = None
        self.egress: EgressProxy | None = None
        # The preview client (preview.py) and its connection count, closed with the sandbox.
        self.preview: httpx.AsyncClient | None = None
        self.preview_refusals = 0
        self.gone = asyncio.Event()
        self.output_drain: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pidfd: int | None = None
        self.lock = asyncio.Lock()

    @property
    def sandbox_id(self) -> str:
        return self.record.sandbox_id

    @property
    def agent_socket(self) -> Path:
        return self.directory / AGENT_SOCKET

    def new_agent_client(self) -> AgentClient:
        return AgentClient(self.agent_socket, bytes.fromhex(self.record.secret))

    async def close_previews(self) -> None:
        client, self.preview = self.preview, None
        if client is not None:
            await client.aclose()

    def release(self) -> None:
        if self.output_drain is not None:
            self.output_drain.cancel()
            self.output_drain = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def new_sandbox_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(20))


def _write_json(path: Path, data: Any) -> None:
    """Atomically, readable by the host only: records hold access tokens and secrets."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data))
    os.replace(tmp, path)


class SandboxManager:
    def __init__(self, config: HostConfig):
        self.config = config
        self.state_dir = config.state_dir
        # As root every sandbox gets a uid of its own; otherwise it is the host's user.
        self.own_uids = isolation.can_use_own_uids()
        self.uid_base = isolation.uid_block(config.state_dir)
        self.sandboxes: dict[str, Sandbox] = {}  # running ones
        self.paused: dict[str, Sandbox] = {}  # paused ones: a record and files on disk, no process
        self._transitions: dict[str, asyncio.Lock] = {}  # pause / resume / kill of one sandbox, one at a time
        self.egress_root = config.state_dir / EGRESS_DIR
        self.unsafe_root = config.state_dir / UNSAFE_DIR
        self.toolchain_bin = config.state_dir / TOOLCHAIN_DIR / "bin"
        self.toolchain: toolchain.Toolchain | None = None
        self._idempotency: dict[str, dict[str, Any]] = {}
        self._pending_creates: dict[str, asyncio.Future[Sandbox]] = {}
        self._create_lock = asyncio.Lock()
        self._agent_source = b""
        self._passwd = self._group = b""
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ startup / shutdown
    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Traversable but not listable as root: bwrap resolves a sandbox's egress directory as the
        # sandbox's uid, and in unsafe mode the agent reaches its home and tmp as that uid.
        mode = 0o711 if self.own_uids else 0o700
        os.chmod(self.state_dir, mode)
        for root in (self.egress_root, self.unsafe_root):
            root.mkdir(mode=mode, exist_ok=True)
            os.chmod(root, mode)
        self.toolchain = toolchain.Toolchain.detect()
        if not self.config.isolated:
            self.toolchain.write_host_bin(self.toolchain_bin)
            for directory in (self.toolchain_bin.parent, self.toolchain_bin):
                os.chmod(directory, 0o755)
        self._agent_source = isolation.AGENT_SOURCE.read_bytes()
        self._passwd, self._group = isolation.passwd_files()
        self._load_idempotency()
        await self._adopt_or_reap()

    async def shutdown(self) -> None:
        """Stop managing; running sandboxes keep running and are adopted by the next start."""
        for sandbox in self.sandboxes.values():
            await sandbox.close_previews()
            if sandbox.egress is not None:
                await sandbox.egress.close()
            sandbox.release()
        self.sandboxes.clear()
        for task in list(self._tasks):
            task.cancel()

    async def kill_all(self) -> None:
        await asyncio.gather(*(self.kill(sid) for sid in [*self.sandboxes, *self.paused]))

    async def _adopt_or_reap(self) -> None:
        adopted_uids: set[int] = set()
        roots = (self.egress_root, self.unsafe_root)
        not_sandboxes = (*roots, self.toolchain_bin.parent)
        for directory in sorted(p for p in self.state_dir.iterdir() if p.is_dir() and p not in not_sandboxes):
            record = self._read_record(directory)
            unsafe_paused = record is not None and record.mode == isolation.UNSAFE and record.state == PAUSED
            if record is not None and ((directory / FILES_ARCHIVE).exists() or unsafe_paused):
                if record.state != PAUSED:
                    # The host stopped during a pause (after the files were safe) or a resume
                    # (before they were unpacked): it is paused, its files are those of the tar.
                    await asyncio.to_thread(self._kill_processes, record)
                    record.state, record.paused_at = PAUSED, time.time()
                    record.init_pid = record.init_started = record.pid_ns = None
                    await asyncio.to_thread(_write_json, directory / RECORD_FILE, asdict(record))
                self.paused[record.sandbox_id] = Sandbox(record, directory)
                continue
            if record is not None and await self._adopt(record, directory):
                adopted_uids.add(record.uid)
                continue
            if record is not None:
                await asyncio.to_thread(self._kill_processes, record)
                log.info("reaped sandbox %s left by a previous run", record.sandbox_id)
            await asyncio.to_thread(shutil.rmtree, directory, True)
        for root in roots:  # files of sandboxes that are no more
            for leftover in root.iterdir():
                if leftover.name not in self.sandboxes and leftover.name not in self.paused:
                    await asyncio.to_thread(shutil.rmtree, leftover, True)
        if not self.own_uids:
            # No uid block to sweep: a sandbox runs code only once its init is recorded (_launch), and
            # what no record names is not provably a sandbox's.
            return
        # Anything else in this host's uid block is a leftover (e.g. a crash between starting a
        # sandbox and recording it): kill it.
        stray_uids = {
            uid
            for uid in isolation.live_uids()
            if self.uid_base <= uid < self.uid_base + isolation.UID_BLOCK_SIZE and uid not in adopted_uids
        }
        for uid in stray_uids:
            log.warning("killing stray processes of sandbox uid %d", uid)
            await asyncio.to_thread(isolation.kill_uid, uid)

    @staticmethod
    def _read_record(directory: Path) -> SandboxRecord | None:
        try:
            return SandboxRecord(**json.loads((directory / RECORD_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @staticmethod
    def _verified_init_pid(record: SandboxRecord) -> int | None:
        """The recorded pid 1 of the sandbox, if that process is provably still the one recorded: the
        same start time, and the same uid (a sandbox's own) or pid namespace (isolated sandboxes; an
        inode no other live namespace has). A rootless record's uid is not checked: it is the host's
        user as the host saw it, which differs in another user namespace."""
        if record.init_pid is None:
            return None
        try:
            init = psutil.Process(record.init_pid)
            if (
                isolation.same_start(init.create_time(), record.init_started)
                and init.status() != psutil.STATUS_ZOMBIE
                and (not record.own_uid or init.uids().real == record.uid)
                and (record.pid_ns is None or isolation.pid_namespace(record.init_pid) == record.pid_ns)
                and (record.own_uid or record.pid_ns is not None or init.uids().real == record.uid)
            ):
                return record.init_pid
        except psutil.Error:
            pass
        return None

    def _kill_processes(self, record: SandboxRecord) -> None:
        """End every process of a sandbox (blocking: run it in a thread)."""
        init = self._verified_init_pid(record)
        if record.own_uid:
            isolation.kill_uid(record.uid, init)
        elif init is None:
            return  # its init is gone, and with it every process of its namespace (or its agent's)
        elif record.mode == isolation.ROOTLESS:
            isolation.kill_namespace(init, record.init_started)
        else:
            isolation.stop_agent(init, record.init_started)

    async def _adopt(self, record: SandboxRecord, directory: Path) -> bool:
        expired = record.end_at <= time.time()
        if (expired and not record.auto_pause) or self._verified_init_pid(record) is None:
            return False
        assert record.init_pid is not None
        sandbox = Sandbox(record, directory)
        try:
            if not record.secret:
                raise AgentUnavailable("the record has no secret")
            sandbox.agent = sandbox.new_agent_client()
            await asyncio.wait_for(sandbox.agent.verify(), 5)
            await self._start_egress(sandbox)
            self._watch(sandbox, record.init_pid)
        except (AgentUnavailable, OSError, ValueError, TimeoutError) as exc:
            log.warning("not adopting sandbox %s: %s", record.sandbox_id, exc)
            if sandbox.egress is not None:
                await sandbox.egress.close()
            sandbox.release()
            return False
        self.sandboxes[record.sandbox_id] = sandbox
        self._arm_timer(sandbox)
        log.info("adopted sandbox %s", record.sandbox_id)
        return True

    # ------------------------------------------------------------------ idempotency
    def _load_idempotency(self) -> None:
        path = self.state_dir / IDEMPOTENCY_FILE
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        cutoff = time.time() - IDEMPOTENCY_TTL_S
        self._idempotency = {k: v for k, v in entries.items() if v.get("created_at", 0) > cutoff}

    def _save_idempotency(self) -> None:
        cutoff = time.time() - IDEMPOTENCY_TTL_S
        self._idempotency = {k: v for k, v in self._idempotency.items() if v["created_at"] > cutoff}
        _write_json(self.state_dir / IDEMPOTENCY_FILE, self._idempotency)

    # ------------------------------------------------------------------ create
    async def create(
        self,
        *,
        template_id: str,
        timeout_s: int,
        metadata: dict[str, str],
        env_vars: dict[str, str],
        internet_access: bool,
        idempotency_key: str | None,
        auto_pause: bool = False,
        auto_resume: bool = False,
    ) -> SandboxRecord:
        """Create a sandbox, or return the one this idempotency key already created."""
        lifecycle = (auto_pause, auto_resume)
        if idempotency_key is None:
            sandbox = await self._create(template_id, timeout_s, metadata, env_vars, internet_access, lifecycle)
            return sandbox.record
        while True:
            known = self._idempotency.get(idempotency_key)
            if known is not None:
                return SandboxRecord(**known["record"])
            pending = self._pending_creates.get(idempotency_key)
            if pending is None:
                break
            # A concurrent request with this key is creating it: share its outcome.
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        future: asyncio.Future[Sandbox] = asyncio.get_running_loop().create_future()
        self._pending_creates[idempotency_key] = future
        try:
            sandbox = await self._create(template_id, timeout_s, metadata, env_vars, internet_access, lifecycle)
            self._idempotency[idempotency_key] = {"record": sandbox.record.public(), "created_at": time.time()}
            self._save_idempotency()
            future.set_result(sandbox)
            return sandbox.record
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters retry on their own; don't warn about an unretrieved error
            raise
        finally:
            del self._pending_creates[idempotency_key]

    def _free_slot(self) -> int:
        used = {sb.record.slot for sb in self.sandboxes.values()}
        for slot in range(min(self.config.max_sandboxes, isolation.UID_BLOCK_SIZE - 2)):
            if slot not in used:
                return slot
        raise SandboxLimitReached(f"the host runs its maximum of {self.config.max_sandboxes} sandboxes")

    async def _create(
        self,
        template_id: str,
        timeout_s: int,
        metadata: dict[str, str],
        env_vars: dict[str, str],
        internet_access: bool,
        lifecycle: tuple[bool, bool] = (False, False),
    ) -> Sandbox:
        async with self._create_lock:  # slot allocation and registration are one step
            slot = self._free_slot()
            now = time.time()
            record = SandboxRecord(
                sandbox_id=new_sandbox_id(),
                template_id=template_id,
                slot=slot,
                uid=self.uid_base + slot if self.own_uids else os.getuid(),
                mode=self.config.mode,
                own_uid=self.own_uids,
                access_token=secrets.token_urlsafe(24),
                secret=secrets.token_hex(32),
                started_at=now,
                end_at=now + timeout_s,
                metadata=metadata,
                env_vars=env_vars,
                internet_access=internet_access,
                auto_pause=lifecycle[0],
                auto_resume=lifecycle[1],
            )
            sandbox = Sandbox(record, self.state_dir / record.sandbox_id)
            self.sandboxes[record.sandbox_id] = sandbox
        try:
            await self._launch(sandbox)
        except BaseException:
            self.sandboxes.pop(record.sandbox_id, None)
            if sandbox.egress is not None:
                await sandbox.egress.close()
            sandbox.release()
            await asyncio.to_thread(self._kill_processes, record)  # whatever got started
            await asyncio.to_thread(self._remove_files, sandbox)
            raise
        self._arm_timer(sandbox)
        log.info("created sandbox %s (template %s, timeout %ss)", record.sandbox_id, template_id, timeout_s)
        return sandbox

    def _unsafe_dir(self, sandbox: Sandbox) -> Path:
        return self.unsafe_root / sandbox.sandbox_id

    def _prepare_dirs(self, sandbox: Sandbox, resume: bool = False) -> None:
        sandbox.directory.mkdir(mode=0o700, exist_ok=resume)
        os.chmod(sandbox.directory, 0o700)
        _write_json(sandbox.directory / RECORD_FILE, asdict(sandbox.record))
        if self.config.isolated:
            return
        if resume:  # its files stayed where they were; a uid of its own may be another one now
            if sandbox.record.own_uid:
                _chown_tree(self._unsafe_dir(sandbox) / "home", sandbox.record.uid)
                _chown_tree(self._unsafe_dir(sandbox) / "tmp", sandbox.record.uid)
            return
        # Unsafe mode: the agent runs as the sandbox's uid (or the host's user) on the host's filesystem.
        uid, files = sandbox.record.uid, self._unsafe_dir(sandbox)
        files.mkdir(mode=0o711)
        assert self.toolchain is not None
        profile = files / "home" / ".profile"
        for name, mode in (("home", 0o700), ("tmp", 0o1777), ("home/project", 0o755)):
            (files / name).mkdir()
            os.chmod(files / name, mode)
        profile.write_text(self.toolchain.host_profile(str(files / "home"), self.toolchain_bin))
        for path in (files / "home", files / "tmp", files / "home/project", profile):
            os.chown(path, uid, uid)

    async def _start_egress(self, sandbox: Sandbox) -> None:
        if not (self.config.isolated and sandbox.record.internet_access):
            return
        sandbox.egress = EgressProxy(
            sandbox.sandbox_id,
            self.egress_root / sandbox.sandbox_id,
            self.config.max_egress_connections,
            self.config.egress_allowed_networks,
        )
        await sandbox.egress.start(sandbox.record.uid if sandbox.record.own_uid else None)

    def _process_cap(self, record: SandboxRecord) -> int | None:
        """RLIMIT_NPROC for the agent to set on itself and its commands (isolation.py says why there)."""
        if record.mode == isolation.ROOTLESS and not isolation.nproc_per_namespace():
            return None  # counted per user before Linux 5.14: it would cap all of the user's processes
        if record.mode == isolation.UNSAFE and not record.own_uid:
            return None  # no namespace of its own: same
        return self.config.limits.max_processes

    async def _launch(self, sandbox: Sandbox, resume: bool = False) -> None:
        record = sandbox.record
        chain = self.toolchain
        assert chain is not None, "start() first"
        await asyncio.to_thread(self._prepare_dirs, sandbox, resume)
        await self._start_egress(sandbox)
        egress = sandbox.egress is not None
        extra_env = {**(egress_env() if egress else {}), **record.env_vars}
        limits = [isolation.find_tool("prlimit"), *self.config.limits.prlimit_args(), "--"]
        output_r, output_w = os.pipe()
        sandbox.output_drain = asyncio.get_running_loop().create_task(self._drain_output(sandbox, output_r))
        init_r, init_w = os.pipe()
        fds: list[int] = [init_r]  # the child's copies: closed here once it has them
        info_r: int | None = None
        listener = None
        try:
            listener = listen_socket(sandbox.agent_socket)
            agent_fd = listener.fileno()
            if self.config.isolated:
                env = isolation.sandbox_env(extra_env)
                info_r, info_w = os.pipe()
                source_fd = isolation.memfd("agent", self._agent_source)
                passwd_fd = isolation.memfd("passwd", self._passwd)
                group_fd = isolation.memfd("group", self._group)
                tool_fds = {inside: isolation.memfd("toolchain", data) for inside, (data, _) in chain.files.items()}
                fds += [source_fd, passwd_fd, group_fd, info_w, *tool_fds.values()]
                agent_args = isolation.agent_command_args(
                    agent_fd=agent_fd,
                    init_fd=init_r,
                    home_dir=isolation.SANDBOX_HOME,
                    tmp_dir="/tmp",
                    deadline=self._agent_deadline(record),
                    read_anywhere=True,
                    egress_socket=f"{isolation.EGRESS_DIR_INSIDE}/{SOCKET_NAME}" if egress else None,
                    max_processes=self._process_cap(record),
                )
                cmd = limits + isolation.bwrap_args(
                    bwrap=isolation.bwrap_binary(),
                    egress_dir=sandbox.egress.directory if sandbox.egress is not None else None,
                    agent_fd=source_fd,
                    passwd_fd=passwd_fd,
                    group_fd=group_fd,
                    info_fd=info_w,
                    python=isolation.system_python(),
                    agent_args=agent_args,
                    disk_limit_bytes=self.config.limits.disk_bytes,
                    toolchain_args=chain.bwrap_args(tool_fds),
                )
                cwd = "/"
            else:
                files = self._unsafe_dir(sandbox)
                home, tmp = str(files / "home"), str(files / "tmp")
                env = isolation.sandbox_env({**chain.host_env(home, self.toolchain_bin), **extra_env})
                env.update(HOME=home, TMPDIR=tmp)
                agent_args = isolation.agent_command_args(
                    agent_fd=agent_fd,
                    init_fd=init_r,
                    home_dir=home,
                    tmp_dir=tmp,
                    deadline=self._agent_deadline(record),
                    read_anywhere=False,
                    egress_socket=None,  # unisolated sandboxes share the host's network
                    max_processes=self._process_cap(record),
                )
                # The sandbox uid may not reach the repository or the venv: run a copy of the agent.
                agent_copy = files / "agent.py"
                agent_copy.write_bytes(self._agent_source)
                agent_copy.chmod(0o644)
                cmd = limits + [isolation.system_python(), "-I", str(agent_copy), *agent_args]
                cwd = home
            run_as: dict[str, Any] = {}
            if record.own_uid:
                run_as = {"user": record.uid, "group": record.uid, "extra_groups": []}
            process = await asyncio.create_subprocess_exec(
                *cmd,
                pass_fds=(agent_fd, *fds),
                env=isolation.host_process_env(),  # never the host's own: it holds the operator's secrets
                start_new_session=True,  # never part of the host's process group or terminal
                stdin=subprocess.DEVNULL,
                stdout=output_w,
                stderr=output_w,
                cwd=cwd,
                **run_as,
            )
        except BaseException:
            os.close(init_w)
            if info_r is not None:
                os.close(info_r)
            raise
        finally:
            os.close(output_w)
            if listener is not None:
                listener.close()  # the agent holds it now; a dead agent then refuses connections at once
            for fd in fds:
                os.close(fd)
        self._reap_child(process)
        # The init is recorded before the agent gets its secret and environment: if the host dies
        # before handing them over, the agent reads EOF and exits, and its namespace with it. So no
        # sandbox ever runs code that its record does not name (rootless cleanup relies on it).
        try:
            if info_r is not None:
                info = await asyncio.wait_for(asyncio.to_thread(_read_info, info_r), AGENT_READY_TIMEOUT_S)
            else:
                info = {"child-pid": process.pid}  # unsafe: prlimit exec'd the agent itself
            if info is None:
                raise SandboxStartError(f"sandbox failed to start: {await self._agent_log_tail(sandbox)}")
            init_pid = int(info["child-pid"])
            try:
                record.init_started = psutil.Process(init_pid).create_time()
            except psutil.Error:
                raise SandboxStartError(f"sandbox exited at start: {await self._agent_log_tail(sandbox)}") from None
            record.init_pid = init_pid
            record.pid_ns = info.get("pid-namespace")
            await asyncio.to_thread(_write_json, sandbox.directory / RECORD_FILE, asdict(record))
        except BaseException:
            os.close(init_w)  # the agent, if it started, reads EOF and exits
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # our own child (prlimit/bwrap or the unsafe agent)
            raise
        init = json.dumps({"secret": record.secret, "env": env}).encode()
        await asyncio.wait_for(asyncio.to_thread(_write_and_close, init_w, init), AGENT_READY_TIMEOUT_S)
        await self._wait_for_agent(sandbox)
        self._watch(sandbox, init_pid)

    async def _wait_for_agent(self, sandbox: Sandbox) -> None:
        # The socket listens from before the agent started: a connection waits for it to accept,
        # and fails at once if it exits (nothing holds the listening socket any more).
        sandbox.agent = sandbox.new_agent_client()
        try:
            await asyncio.wait_for(sandbox.agent.verify(), AGENT_READY_TIMEOUT_S)
        except (AgentUnavailable, OSError, ValueError, TimeoutError):
            raise SandboxStartError(f"sandbox agent did not start: {await self._agent_log_tail(sandbox)}") from None

    @staticmethod
    async def _drain_output(sandbox: Sandbox, fd: int) -> None:
        """Copy the sandbox's stdout/stderr to agent.log up to AGENT_LOG_MAX_BYTES, discard the rest."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        log_fd = os.open(sandbox.directory / AGENT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        room = AGENT_LOG_MAX_BYTES
        try:
            while chunk := await reader.read(65536):
                if room > 0:
                    room -= os.write(log_fd, chunk[:room])
        finally:
            os.close(log_fd)
            transport.close()

    @staticmethod
    async def _agent_log_tail(sandbox: Sandbox) -> str:
        if sandbox.output_drain is not None:  # everything the failed start wrote
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(sandbox.output_drain), 2)
        try:
            return (sandbox.directory / AGENT_LOG).read_text(errors="replace")[-2000:].strip() or "no output"
        except OSError:
            return "no output"

    def _reap_child(self, process: asyncio.subprocess.Process) -> None:
        task = asyncio.get_running_loop().create_task(process.wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _watch(self, sandbox: Sandbox, pid: int) -> None:
        """Notice the sandbox ending on its own (agent deadline, crash) through a pidfd."""
        pidfd = os.pidfd_open(pid)
        sandbox._pidfd = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, sandbox)

    def _on_exit(self, sandbox: Sandbox) -> None:
        if sandbox._pidfd is not None:
            asyncio.get_running_loop().remove_reader(sandbox._pidfd)
        self._spawn(self._finish(sandbox, "its processes exited"))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ timeouts
    def _arm_timer(self, sandbox: Sandbox) -> None:
        if sandbox._timer is not None:
            sandbox._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, sandbox.record.end_at - time.time())
        sandbox._timer = loop.call_later(delay, lambda: self._spawn(self._expire(sandbox)))

    @staticmethod
    def _agent_deadline(record: SandboxRecord) -> float:
        return record.end_at + AUTO_PAUSE_GRACE_S if record.auto_pause else record.end_at

    async def _expire(self, sandbox: Sandbox) -> None:
        if sandbox.record.auto_pause:
            try:
                await self.pause(sandbox.sandbox_id)
                return
            except SandboxPauseError as exc:
                log.error("sandbox %s: pausing at its timeout failed, so it ends: %s", sandbox.sandbox_id, exc)
        async with self._transition(sandbox.sandbox_id):
            if self.sandboxes.get(sandbox.sandbox_id) is sandbox and sandbox.record.end_at <= time.time() + 0.5:
                await self._finish(sandbox, "its timeout expired")

    async def set_timeout(self, sandbox_id: str, timeout_s: int, *, extend_only: bool = False) -> SandboxRecord | None:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            return None
        async with sandbox.lock:
            end_at = time.time() + timeout_s
            if extend_only and end_at <= sandbox.record.end_at:
                return sandbox.record
            sandbox.record.end_at = end_at
            await asyncio.to_thread(_write_json, sandbox.directory / RECORD_FILE, asdict(sandbox.record))
            assert sandbox.agent is not None
            with contextlib.suppress(AgentUnavailable):
                await sandbox.agent.call("set_deadline", deadline=self._agent_deadline(sandbox.record))
            self._arm_timer(sandbox)
        return sandbox.record

    # ------------------------------------------------------------------ kill / finish
    async def kill(self, sandbox_id: str) -> bool:
        async with self._transition(sandbox_id):
            paused = self.paused.pop(sandbox_id, None)
            if paused is not None:
                await asyncio.to_thread(self._remove_files, paused)
                log.info("sandbox %s ended: it was killed while paused", sandbox_id)
                return True
            sandbox = self.sandboxes.get(sandbox_id)
            if sandbox is None:
                return False
            await self._finish(sandbox, "it was killed")
            return True

    async def _finish(self, sandbox: Sandbox, reason: str) -> None:
        if self.sandboxes.get(sandbox.sandbox_id) is not sandbox:
            await sandbox.gone.wait()
            return
        del self.sandboxes[sandbox.sandbox_id]
        await sandbox.close_previews()
        if sandbox.egress is not None:
            await sandbox.egress.close()
        sandbox.release()
        await asyncio.to_thread(self._kill_processes, sandbox.record)
        await asyncio.to_thread(self._remove_files, sandbox)
        sandbox.gone.set()
        log.info("sandbox %s ended: %s", sandbox.sandbox_id, reason)

    def _remove_files(self, sandbox: Sandbox) -> None:
        for directory in (sandbox.directory, self.egress_root / sandbox.sandbox_id, self._unsafe_dir(sandbox)):
            shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------------ queries
    def get(self, sandbox_id: str) -> Sandbox | None:
        """A running sandbox."""
        return self.sandboxes.get(sandbox_id)

    def lookup(self, sandbox_id: str) -> Sandbox | None:
        """A running or paused sandbox."""
        return self.sandboxes.get(sandbox_id) or self.paused.get(sandbox_id)

    def list(self) -> list[Sandbox]:
        """Running and paused sandboxes, newest first (as E2B lists them)."""
        everything = [*self.sandboxes.values(), *self.paused.values()]
        return sorted(everything, key=lambda sb: (sb.record.started_at, sb.sandbox_id), reverse=True)

    # ------------------------------------------------------------------ pause / resume
    @contextlib.asynccontextmanager
    async def _transition(self, sandbox_id: str):
        lock = self._transitions.setdefault(sandbox_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._transitions.pop(sandbox_id, None)

    async def pause(self, sandbox_id: str) -> bool | None:
        """Pause a running sandbox: its files go to the host's disk, every process ends. True when it
        paused it, False when it was paused already, None when there is no such sandbox."""
        async with self._transition(sandbox_id):
            if sandbox_id in self.paused:
                return False
            sandbox = self.sandboxes.get(sandbox_id)
            if sandbox is None:
                return None
            started = time.monotonic()
            if self.config.isolated:
                try:
                    await asyncio.wait_for(self._archive(sandbox), ARCHIVE_TIMEOUT_S)
                except TimeoutError:
                    raise SandboxPauseError(f"archiving its files took longer than {ARCHIVE_TIMEOUT_S:.0f} s") from None
            if self.sandboxes.get(sandbox_id) is not sandbox:
                return None  # it ended meanwhile (its processes exited)
            # From here on it is paused, in one step (no await between): the control plane always finds
            # it in one of the two; envd and previews get 502, a connect waits for this pause to end.
            running = SandboxRecord(**asdict(sandbox.record))  # its processes, to kill them below
            record = sandbox.record
            record.state, record.paused_at = PAUSED, time.time()
            record.init_pid = record.init_started = record.pid_ns = None
            del self.sandboxes[sandbox_id]
            paused = Sandbox(record, sandbox.directory)
            self.paused[sandbox_id] = paused
            await sandbox.close_previews()
            if sandbox.egress is not None:
                await sandbox.egress.close()
            sandbox.release()
            await asyncio.to_thread(self._kill_processes, running)
            await asyncio.to_thread(self._write_paused, paused)
            sandbox.gone.set()
            log.info("sandbox %s paused in %.0f ms", sandbox_id, (time.monotonic() - started) * 1000)
            return True

    def _write_paused(self, sandbox: Sandbox) -> None:
        _write_json(sandbox.directory / RECORD_FILE, asdict(sandbox.record))
        with contextlib.suppress(FileNotFoundError):
            (sandbox.directory / AGENT_SOCKET).unlink()
        shutil.rmtree(self.egress_root / sandbox.sandbox_id, ignore_errors=True)

    async def _archive(self, sandbox: Sandbox) -> None:
        """The sandbox's /home/user and /tmp as a tar in its host-only directory, made by its agent."""
        assert sandbox.agent is not None
        part = sandbox.directory / (FILES_ARCHIVE + ".part")
        try:
            stream = await sandbox.agent.open("archive")
        except AgentUnavailable as exc:
            raise SandboxPauseError(f"the sandbox agent is unreachable: {exc}") from None
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        room = 2 * self.config.limits.disk_bytes + ARCHIVE_SLACK_BYTES
        done = False
        try:
            await stream.read_message()
            while True:
                size = int.from_bytes(await stream.reader.readexactly(4), "big")
                if size == 0:
                    break
                room -= size
                if room < 0 or size > ARCHIVE_CHUNK_MAX:
                    raise SandboxPauseError("its archive is larger than its disk could hold")
                view = memoryview(await stream.reader.readexactly(size))
                while view:
                    view = view[os.write(fd, view) :]
            outcome = await stream.read_message()
            if outcome is None or not outcome.get("ok"):
                detail = (outcome or {}).get("stderr") or "the agent closed the connection"
                raise SandboxPauseError(f"archiving the sandbox's files failed: {detail}")
            done = True
        except (OSError, ValueError, asyncio.IncompleteReadError, AgentCallError) as exc:
            raise SandboxPauseError(f"archiving the sandbox's files failed: {exc}") from None
        finally:
            os.close(fd)
            await stream.close()
            if not done:
                with contextlib.suppress(OSError):
                    part.unlink()
        os.replace(part, sandbox.directory / FILES_ARCHIVE)

    async def resume(self, sandbox_id: str, timeout_s: int) -> tuple[SandboxRecord, bool] | None:
        """Reach a sandbox, resuming it when paused: (its record, whether it was resumed), or None when
        there is no such sandbox. A running one only ever gets a longer life, as on E2B."""
        async with self._transition(sandbox_id):
            if sandbox_id in self.sandboxes:
                record = await self.set_timeout(sandbox_id, timeout_s, extend_only=True)
                return (record, False) if record is not None else None
            paused = self.paused.get(sandbox_id)
            if paused is None:
                return None
            started = time.monotonic()
            await self._resume(paused, timeout_s)
            log.info("sandbox %s resumed in %.0f ms", sandbox_id, (time.monotonic() - started) * 1000)
            return self.sandboxes[sandbox_id].record, True

    async def _resume(self, paused: Sandbox, timeout_s: int) -> None:
        old = paused.record
        async with self._create_lock:
            slot = self._free_slot()
            record = SandboxRecord(**{**asdict(old), "state": RUNNING, "paused_at": None})
            record.slot = slot
            record.uid = self.uid_base + slot if self.own_uids else os.getuid()
            record.end_at = time.time() + timeout_s
            sandbox = Sandbox(record, paused.directory)
            del self.paused[record.sandbox_id]
            self.sandboxes[record.sandbox_id] = sandbox
        try:
            await self._launch(sandbox, resume=True)
            if self.config.isolated:
                await self._restore(sandbox)
            await asyncio.to_thread(lambda: (sandbox.directory / FILES_ARCHIVE).unlink(missing_ok=True))
        except BaseException:
            self.sandboxes.pop(record.sandbox_id, None)
            self.paused[record.sandbox_id] = paused  # still paused, its files untouched
            if sandbox.egress is not None:
                await sandbox.egress.close()
            sandbox.release()
            await asyncio.to_thread(self._kill_processes, record)
            await asyncio.to_thread(self._write_paused, paused)
            raise
        self._arm_timer(sandbox)

    async def _restore(self, sandbox: Sandbox) -> None:
        assert sandbox.agent is not None
        archive = sandbox.directory / FILES_ARCHIVE
        fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            stream = await sandbox.agent.open("restore", size=size)
            try:
                while chunk := f.read(1024 * 1024):
                    await stream.write(chunk)
                reply = await stream.read_message()
            except AgentCallError as exc:
                raise SandboxStartError(exc.message) from None
            except (OSError, ValueError) as exc:
                raise SandboxStartError(f"restoring the sandbox's files failed: {exc}") from None
            finally:
                await stream.close()
        if reply is None:
            raise SandboxStartError("restoring the sandbox's files failed: the agent closed the connection")


def _chown_tree(root: Path, uid: int) -> None:
    """Give a paused unsafe sandbox's files to the uid it runs as now (never following links)."""
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(directory, name), uid, uid)
    os.lchown(root, uid, uid)


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass  # the agent died before reading: _wait_for_agent reports why
    finally:
        os.close(fd)


def _read_info(info_fd: int) -> dict[str, Any] | None:
    """bwrap writes {"child-pid": N, "pid-namespace": INODE, ...} to --info-fd: the sandbox's pid 1 as
    the host sees it, and its namespaces. None if bwrap ended without writing it."""
    chunks = []
    try:
        while True:
            chunk = os.read(info_fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                info = json.loads(b"".join(chunks))
                int(info["child-pid"])
                return info
    finally:
        os.close(info_fd)
    return None
