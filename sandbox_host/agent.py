"""The in-sandbox agent: runs commands, touches files and forwards preview ports for one sandbox.

It runs inside the sandbox (as the sandbox's own unprivileged user, in its mount/pid/net namespaces),
so everything it does is confined the same way the sandbox's code is. The host talks to it over a
unix socket the host created in a directory only the host can reach and handed over as a listening
descriptor (--agent-fd): one connection per operation, a JSON request line, then JSON response lines
(and raw bytes for file transfers, or a spliced TCP stream for `forward`).

The agent's environment and its per-sandbox secret arrive through a pipe (--init-fd) read once at
start, never argv, environment or a file. The agent makes itself non-dumpable first, so sandbox code
running as the same uid cannot read its memory or take its descriptors; it proves it holds the secret
by answering `ping`'s nonce with HMAC-SHA256(secret, nonce).

Standard library only: it is executed by the sandbox's system python3, not the host's venv.
The agent also enforces the sandbox deadline itself, so a sandbox never outlives its TTL even when
the host is down.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import errno
import fcntl
import grp
import hashlib
import hmac
import json
import os
import pwd
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time

CHUNK = 64 * 1024
OUTPUT_QUEUE_SIZE = 256
# After a process exits, output still buffered in its pipes is delivered for this long; pipes held
# open by background children (`server &`) must not delay the end event forever.
PIPE_DRAIN_S = 0.2
PR_SET_DUMPABLE = 4
# File metadata lives in extended attributes under this prefix, as in envd (the prefix is stripped).
XATTR_PREFIX = "user.e2b."
# A filesystem of one of these types is a network mount: watching it needs allow_network_mounts.
NETWORK_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse")
MAX_WATCHES = 8192  # inotify watches one recursive watcher may hold

# inotify(7)
IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
WATCH_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
# One inotify event is one or more of envd's event types, in envd's (fsnotify's) order.
EVENT_TYPES = (
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_MOVED_FROM | IN_MOVE_SELF, "rename"),
    (IN_ATTRIB, "chmod"),
    (IN_MODIFY, "write"),
    (IN_DELETE | IN_DELETE_SELF, "remove"),
)


class AgentError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _os_error(exc: OSError, path: str) -> AgentError:
    if exc.errno == errno.ENOENT:
        return AgentError("not_found", f"path {path!r} does not exist")
    if exc.errno == errno.EEXIST:
        return AgentError("already_exists", f"path {path!r} already exists")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AgentError("permission_denied", f"permission denied: {path!r}")
    if exc.errno == errno.ENOTDIR:
        return AgentError("invalid_argument", f"path {path!r} is not a directory")
    if exc.errno == errno.EISDIR:
        return AgentError("invalid_argument", f"path {path!r} is a directory")
    if exc.errno == errno.ENOTEMPTY:
        return AgentError("invalid_argument", f"directory {path!r} is not empty")
    if exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
        return AgentError("resource_exhausted", f"{path!r}: {os.strerror(exc.errno)}")
    return AgentError("internal", f"{path!r}: {os.strerror(exc.errno or 0)}")


class Paths:
    """Maps sandbox paths (/home/user/..., /tmp/...) to the paths this agent sees.

    Inside bubblewrap the mapping is the identity. In unsafe (no isolation) mode the sandbox's home
    and /tmp are directories on the host, and only those two roots are reachable at all.
    """

    HOME = "/home/user"
    TMP = "/tmp"

    def __init__(self, home_dir: str, tmp_dir: str, read_anywhere: bool):
        self.roots = {self.HOME: os.path.realpath(home_dir), self.TMP: os.path.realpath(tmp_dir)}
        self.read_anywhere = read_anywhere

    def to_local(self, path: str, *, write: bool) -> str:
        if not path:
            raise AgentError("invalid_argument", "path is empty")
        if "\0" in path:
            raise AgentError("invalid_argument", "path contains a NUL byte")
        virtual = os.path.normpath(path if path.startswith("/") else os.path.join(self.HOME, path))
        for root, local_root in self.roots.items():
            if virtual == root or virtual.startswith(root + "/"):
                local = local_root + virtual[len(root) :]
                self.check_resolved(local, path)
                return local
        if self.read_anywhere and not write:
            return virtual
        raise AgentError("invalid_argument", f"path {path!r} is outside /home/user and /tmp")

    def check_resolved(self, local: str, original: str) -> None:
        # Symlinks are resolved the way the kernel will resolve them; the result must stay inside
        # an allowed root, or a write through it could land anywhere the sandbox user can write.
        resolved = os.path.realpath(local)
        if not any(resolved == r or resolved.startswith(r + "/") for r in self.roots.values()):
            raise AgentError("invalid_argument", f"path {original!r} resolves outside /home/user and /tmp")

    def to_virtual(self, local: str) -> str:
        for root, local_root in self.roots.items():
            if local == local_root or local.startswith(local_root + "/"):
                return root + local[len(local_root) :]
        return local


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def read_metadata(local: str) -> dict:
    """The file's `user.e2b.*` extended attributes, prefix stripped (envd's EntryInfo.metadata)."""
    try:
        names = os.listxattr(local)
    except OSError:
        return {}
    metadata = {}
    for name in names:
        if name.startswith(XATTR_PREFIX):
            try:
                metadata[name[len(XATTR_PREFIX) :]] = os.getxattr(local, name).decode("utf-8", "replace")
            except OSError:
                continue
    return metadata


def write_metadata(local: str, metadata: dict) -> None:
    for key, value in metadata.items():
        os.setxattr(local, XATTR_PREFIX + str(key), str(value).encode())


def _file_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "unknown"


def entry_info(paths: Paths, local: str) -> dict:
    """What envd reports for a path (GetEntryInfo): a symlink has its target's type and permission
    bits and the resolved target in symlink_target (the link itself when it cannot be resolved,
    with an unknown type); permissions and size are the link's own."""
    st = os.lstat(local)
    symlink_target = None
    if stat.S_ISLNK(st.st_mode):
        try:
            resolved = os.path.realpath(local, strict=True)
            target = os.stat(resolved)
            symlink_target = paths.to_virtual(resolved)
            file_type, mode = _file_type(target.st_mode), target.st_mode & 0o777
        except OSError:
            symlink_target = paths.to_virtual(local)
            file_type, mode = "unknown", 0
    else:
        file_type, mode = _file_type(st.st_mode), st.st_mode & 0o777
    permissions = stat.filemode(st.st_mode)
    if permissions.startswith("l"):
        permissions = "L" + permissions[1:]  # Go's FileMode.String()
    return {
        "name": os.path.basename(local.rstrip("/")) or "/",
        "type": file_type,
        "path": paths.to_virtual(local),
        "size": st.st_size,
        "mode": mode,
        "permissions": permissions,
        "owner": _owner_name(st.st_uid),
        "group": _group_name(st.st_gid),
        "mtime": st.st_mtime,
        "is_symlink": False,
        "symlink_target": symlink_target,
        "metadata": read_metadata(local),
    }


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", max(1, rows), max(1, cols), 0, 0))


def _take_controlling_tty() -> None:
    # Runs in the child after setsid (start_new_session): the pty's slave, its stdin, becomes the
    # session's controlling terminal, so an interactive shell has job control.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process, config: dict, tag: str | None):
        self.proc = proc
        self.pid = proc.pid
        self.config = config
        self.tag = tag
        self.subscribers: set[asyncio.Queue] = set()
        self.end: dict | None = None
        self.ended = asyncio.Event()
        self.deadline_exceeded = False
        self.is_pty = False
        self.pty_master: int | None = None  # the PTY's master side while the session runs

    async def publish(self, event: dict) -> None:
        for queue in list(self.subscribers):
            # Bounded queues give the slowest attached client back-pressure, like a pipe.
            await queue.put(event)

    def expire(self) -> None:
        self.deadline_exceeded = self.end is None
        self.kill()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.end is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


class Agent:
    def __init__(self, args: argparse.Namespace, init: dict):
        self.paths = Paths(args.home_dir, args.tmp_dir, args.read_anywhere)
        self.base_env = {str(k): str(v) for k, v in init["env"].items()}
        self.secret = bytes.fromhex(init["secret"])
        self.deadline: float | None = args.deadline
        self.forward_host = args.forward_host
        self.procs: dict[int, Proc] = {}
        self.sessions: set[int] = set()  # every command is a session leader: its pid is the session id
        self.stopping = asyncio.Event()
        self._deadline_handle: asyncio.TimerHandle | None = None

    # ---------------- lifecycle ----------------
    def arm_deadline(self) -> None:
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        if self.deadline is not None:
            delay = max(0.0, self.deadline - time.time())
            self._deadline_handle = asyncio.get_running_loop().call_later(delay, self.stop)

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()
        # What commands left behind in their sessions (`server &`, double-forked daemons): in an
        # unisolated sandbox without a uid of its own nothing else would end them.
        kill_sessions(self.sessions)
        self.stopping.set()

    # ---------------- connection handling ----------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            try:
                request = json.loads(line)
                op = request["op"]
            except (ValueError, KeyError, TypeError):
                raise AgentError("invalid_argument", "malformed agent request") from None
            handler = getattr(self, "op_" + str(op), None)
            if handler is None:
                raise AgentError("unimplemented", f"unknown operation {op!r}")
            await handler(request, reader, writer)
        except AgentError as exc:
            await self._reply(writer, {"error": {"code": exc.code, "message": exc.message}})
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                await self._reply(writer, {"error": {"code": "internal", "message": str(exc)}})
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, payload: dict) -> None:
        try:
            writer.write(json.dumps(payload).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass

    # ---------------- control ----------------
    async def op_ping(self, req, reader, writer):
        mac = hmac.new(self.secret, str(req.get("nonce") or "").encode(), hashlib.sha256).hexdigest()
        await self._reply(writer, {"ok": True, "mac": mac, "pid": os.getpid(), "deadline": self.deadline})

    async def op_set_deadline(self, req, reader, writer):
        self.deadline = req.get("deadline")
        self.arm_deadline()
        await self._reply(writer, {"ok": True})

    # ---------------- processes ----------------
    def _select(self, req: dict) -> Proc:
        if req.get("pid") is not None:
            proc = self.procs.get(int(req["pid"]))
        else:
            proc = next((p for p in self.procs.values() if p.tag is not None and p.tag == req.get("tag")), None)
        if proc is None or proc.end is not None:
            raise AgentError("not_found", "process not found")
        return proc

    async def op_start(self, req, reader, writer):
        cmd = req.get("cmd") or ""
        args = [str(a) for a in req.get("args") or []]
        cwd_virtual = req.get("cwd") or Paths.HOME
        cwd = self.paths.to_local(cwd_virtual, write=False)
        if not os.path.isdir(cwd):
            raise AgentError("invalid_argument", f"cwd {cwd_virtual!r} does not exist")
        env = dict(self.base_env)
        env.update({str(k): str(v) for k, v in (req.get("envs") or {}).items()})
        pty_size = req.get("pty")
        master = slave = None
        if pty_size is not None:
            master, slave = os.openpty()
            _set_winsize(master, int(pty_size.get("rows") or 24), int(pty_size.get("cols") or 80))
            stdio = {"stdin": slave, "stdout": slave, "stderr": slave, "preexec_fn": _take_controlling_tty}
        else:
            stdio = {
                "stdin": asyncio.subprocess.PIPE if req.get("stdin") else asyncio.subprocess.DEVNULL,
                "stdout": asyncio.subprocess.PIPE,
                "stderr": asyncio.subprocess.PIPE,
            }
        try:
            process = await asyncio.create_subprocess_exec(
                cmd,
                *args,
                cwd=cwd,
                env=env,
                # Its own process group (and session), so a kill takes the command's children with it.
                start_new_session=True,
                **stdio,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            if master is not None:
                os.close(master)
            errno_ = getattr(exc, "errno", None) or 0
            raise AgentError("invalid_argument", f"cannot start {cmd!r}: {os.strerror(errno_)}") from None
        finally:
            if slave is not None:
                os.close(slave)
        proc = Proc(
            process, {"cmd": cmd, "args": args, "envs": req.get("envs") or {}, "cwd": cwd_virtual}, req.get("tag")
        )
        proc.is_pty, proc.pty_master = master is not None, master
        self.procs[proc.pid] = proc
        self.sessions.add(proc.pid)
        queue: asyncio.Queue = asyncio.Queue(OUTPUT_QUEUE_SIZE)
        proc.subscribers.add(queue)
        asyncio.ensure_future(self._supervise(proc))
        timeout_ms = req.get("timeout_ms")
        if timeout_ms:
            # Connect-Timeout-Ms is the process deadline, as in envd: the command dies with it.
            asyncio.get_running_loop().call_later(timeout_ms / 1000, proc.expire)
        await self._stream(proc, queue, reader, writer)

    async def op_connect(self, req, reader, writer):
        proc = self._select(req)
        queue: asyncio.Queue = asyncio.Queue(OUTPUT_QUEUE_SIZE)
        proc.subscribers.add(queue)
        await self._stream(proc, queue, reader, writer)

    async def _stream(
        self, proc: Proc, queue: asyncio.Queue, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The host closing its end is the only sign a quiet stream's client left; without watching
        # for it a stale subscriber would fill up and stall the process's output.
        hangup = asyncio.ensure_future(reader.read())
        try:
            writer.write(json.dumps({"e": "start", "pid": proc.pid}).encode() + b"\n")
            await writer.drain()
            while True:
                next_event = asyncio.ensure_future(queue.get())
                await asyncio.wait({next_event, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if not next_event.done():
                    next_event.cancel()
                    return
                event = next_event.result()
                writer.write(json.dumps(event).encode() + b"\n")
                await writer.drain()
                if event["e"] == "end":
                    return
        except (ConnectionError, OSError):
            pass  # The client went away; the process keeps running (background commands survive it).
        finally:
            hangup.cancel()
            proc.subscribers.discard(queue)
            while not queue.empty():  # unblock a publisher waiting on this queue
                queue.get_nowait()

    async def _pump(self, proc: Proc, stream: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                chunk = await stream.read(CHUNK)
            except OSError:  # a PTY's master reads EIO once no process holds its slave
                return
            if not chunk:
                return
            if proc.end is None:
                await proc.publish({"e": name, "d": base64.b64encode(chunk).decode()})

    async def _supervise(self, proc: Proc) -> None:
        transport = None
        if proc.pty_master is not None:
            pty_reader = asyncio.StreamReader(limit=2**20)
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(pty_reader), os.fdopen(os.dup(proc.pty_master), "rb", buffering=0)
            )
            pumps = [asyncio.ensure_future(self._pump(proc, pty_reader, "pty"))]
        else:
            pumps = [
                asyncio.ensure_future(self._pump(proc, proc.proc.stdout, "stdout")),
                asyncio.ensure_future(self._pump(proc, proc.proc.stderr, "stderr")),
            ]
        code = await proc.proc.wait()
        await asyncio.wait(pumps, timeout=PIPE_DRAIN_S)
        if transport is not None:
            # Forget the master before closing it: its number may be reused at once.
            master, proc.pty_master = proc.pty_master, None
            transport.close()
            os.close(master)
        if code < 0:
            # Go's ProcessState.String(): "signal: killed", "signal: terminated", ...
            described = signal.strsignal(-code) or f"signal {-code}"
            name = described[:1].lower() + described[1:]
            proc.end = {"e": "end", "exit_code": -1, "exited": False, "status": f"signal: {name}"}
        else:
            proc.end = {"e": "end", "exit_code": code, "exited": True, "status": f"exit status {code}"}
        if code != 0:
            # envd reports Go's cmd.Wait() error, which is the status for any unsuccessful end.
            # ("err": an "error" key is how the agent protocol says an operation failed.)
            proc.end["err"] = proc.end["status"]
        proc.end["deadline_exceeded"] = proc.deadline_exceeded
        await proc.publish(proc.end)
        self.procs.pop(proc.pid, None)
        proc.ended.set()

    async def op_list(self, req, reader, writer):
        procs = [{"pid": p.pid, "tag": p.tag, **p.config} for p in self.procs.values() if p.end is None]
        await self._reply(writer, {"ok": True, "processes": procs})

    async def op_signal(self, req, reader, writer):
        proc = self._select(req)
        proc.kill(int(req.get("signal") or signal.SIGKILL))
        await self._reply(writer, {"ok": True})

    async def op_send_input(self, req, reader, writer):
        proc = self._select(req)
        data = base64.b64decode(req.get("data") or "")
        if req.get("pty"):
            if not proc.is_pty:
                raise AgentError(
                    "invalid_argument",
                    "tty not assigned to process — input should be written to the stdin, not the tty",
                )
            await _write_pty(proc, data)
        else:
            if proc.is_pty:
                raise AgentError(
                    "invalid_argument", "tty assigned to process — input should be written to the pty, not the stdin"
                )
            if proc.proc.stdin is None:
                raise AgentError("invalid_argument", "stdin not enabled or closed")
            proc.proc.stdin.write(data)
            await proc.proc.stdin.drain()
        await self._reply(writer, {"ok": True})

    async def op_close_stdin(self, req, reader, writer):
        proc = self._select(req)
        if proc.is_pty:
            raise AgentError("invalid_argument", "cannot close stdin for PTY process — send Ctrl+D (0x04) instead")
        if proc.proc.stdin is not None:
            proc.proc.stdin.close()
        await self._reply(writer, {"ok": True})

    async def op_resize(self, req, reader, writer):
        proc = self._select(req)
        if not proc.is_pty:
            raise AgentError("invalid_argument", "tty not assigned to process")
        if proc.pty_master is None:
            raise AgentError("not_found", "process not found")
        _set_winsize(proc.pty_master, int(req.get("rows") or 0), int(req.get("cols") or 0))
        await self._reply(writer, {"ok": True})

    # ---------------- files ----------------
    async def op_check_writable(self, req, reader, writer):
        """Validate a batch of upload paths before any is written, so a bad one writes nothing."""
        for path in req.get("paths") or []:
            local = self.paths.to_local(path, write=True)
            if os.path.isdir(local):
                raise AgentError("invalid_argument", f"path {path!r} is a directory")
        await self._reply(writer, {"ok": True})

    async def op_write(self, req, reader, writer):
        path = req.get("path", "")
        local = self.paths.to_local(path, write=True)
        size = int(req["size"])
        if os.path.isdir(local):
            raise AgentError("invalid_argument", f"path {path!r} is a directory")
        tmp = f"{local}.e2b-upload-{os.getpid()}-{id(req)}"
        try:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            # The parents may only now exist: check again that nothing on the way is a symlink out.
            self.paths.check_resolved(local, path)
            with open(tmp, "wb") as f:
                remaining = size
                while remaining:
                    chunk = await reader.read(min(CHUNK, remaining))
                    if not chunk:
                        raise AgentError("invalid_argument", "upload ended early")
                    f.write(chunk)
                    remaining -= len(chunk)
            os.replace(tmp, local)
            if req.get("metadata"):
                write_metadata(local, req["metadata"])
        except (OSError, AgentError) as exc:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise _os_error(exc, path) if isinstance(exc, OSError) else exc from None
        await self._reply(writer, {"ok": True, "entry": entry_info(self.paths, local)})

    async def op_read(self, req, reader, writer):
        local = self.paths.to_local(req.get("path", ""), write=False)
        try:
            if os.path.isdir(local):
                raise AgentError("invalid_argument", f"path {req['path']!r} is a directory")
            f = open(local, "rb")
        except OSError as exc:
            raise _os_error(exc, req["path"]) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            writer.write(json.dumps({"ok": True, "size": size}).encode() + b"\n")
            remaining = size
            while remaining:
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:
                    break
                writer.write(chunk)
                remaining -= len(chunk)
                await writer.drain()
            # A file that shrank while being read is padded so the framing stays intact.
            if remaining:
                writer.write(b"\0" * remaining)
            await writer.drain()

    async def op_stat(self, req, reader, writer):
        local = self.paths.to_local(req.get("path", ""), write=False)
        try:
            entry = entry_info(self.paths, local)
        except OSError as exc:
            raise _os_error(exc, req["path"]) from None
        await self._reply(writer, {"ok": True, "entry": entry})

    async def op_list_dir(self, req, reader, writer):
        local = self.paths.to_local(req.get("path", ""), write=False)
        depth = max(1, int(req.get("depth") or 1))
        entries = []
        try:
            if not os.path.isdir(local):
                raise AgentError("invalid_argument", f"path {req['path']!r} is not a directory")
            self._walk(local, depth, entries)
        except OSError as exc:
            raise _os_error(exc, req["path"]) from None
        await self._reply(writer, {"ok": True, "entries": entries})

    def _walk(self, local: str, depth: int, out: list) -> None:
        with os.scandir(local) as it:
            for item in sorted(it, key=lambda e: e.name):
                try:
                    out.append(entry_info(self.paths, item.path))
                except OSError:
                    continue
                if depth > 1 and item.is_dir(follow_symlinks=False):
                    self._walk(item.path, depth - 1, out)

    async def op_make_dir(self, req, reader, writer):
        local = self.paths.to_local(req.get("path", ""), write=True)
        if os.path.isdir(local):
            raise AgentError("already_exists", f"directory {req['path']!r} already exists")
        try:
            os.makedirs(local)
        except OSError as exc:
            raise _os_error(exc, req["path"]) from None
        await self._reply(writer, {"ok": True})

    async def op_remove(self, req, reader, writer):
        local = self.paths.to_local(req.get("path", ""), write=True)
        if local in self.paths.roots.values():
            raise AgentError("invalid_argument", f"refusing to remove {req['path']!r}")
        try:
            if os.path.isdir(local) and not os.path.islink(local):
                await asyncio.get_running_loop().run_in_executor(None, _rmtree, local)
            else:
                os.unlink(local)
        except FileNotFoundError:
            pass  # as envd (os.RemoveAll): removing what does not exist succeeds
        except OSError as exc:
            raise _os_error(exc, req["path"]) from None
        await self._reply(writer, {"ok": True})

    async def op_watch(self, req, reader, writer):
        """Stream filesystem events under a directory until the host hangs up (envd's WatchDir)."""
        path = req.get("path", "")
        root = self.paths.to_local(path, write=False)
        try:
            if not stat.S_ISDIR(os.stat(root).st_mode):
                raise AgentError("invalid_argument", f"path {path} not a directory")
        except FileNotFoundError:
            raise AgentError("not_found", f"path {path} not found") from None
        except OSError as exc:
            raise _os_error(exc, path) from None
        root = os.path.realpath(root)
        if not req.get("allow_network_mounts") and _on_network_mount(root):
            raise AgentError("invalid_argument", f"cannot watch path on network filesystem: {path}")
        watcher = _Inotify()
        try:
            await self._watch(watcher, root, bool(req.get("recursive")), bool(req.get("include_entry")), reader, writer)
        finally:
            watcher.close()

    async def _watch(self, watcher, root, recursive, include_entry, reader, writer) -> None:
        dirs: dict[int, str] = {}

        def add(directory: str, top: bool = False) -> None:
            try:
                dirs[watcher.add(directory)] = directory
            except OSError as exc:
                if top:
                    raise _os_error(exc, self.paths.to_virtual(directory)) from None
                return
            if recursive:
                try:
                    with os.scandir(directory) as it:
                        subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
                except OSError:
                    return
                for sub in subdirs:
                    if len(dirs) < MAX_WATCHES:
                        add(sub)

        add(root, top=True)
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(watcher.fd, ready.set)
        hangup = asyncio.ensure_future(reader.read())
        try:
            writer.write(b'{"e": "start"}\n')
            await writer.drain()
            while True:
                woke = asyncio.ensure_future(ready.wait())
                await asyncio.wait({woke, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if not woke.done():
                    woke.cancel()
                    return
                ready.clear()
                for wd, mask, name in watcher.read():
                    if mask & IN_Q_OVERFLOW:
                        raise AgentError("internal", "watcher error: event queue overflow")
                    directory = dirs.get(wd)
                    if directory is None:
                        continue
                    if mask & IN_IGNORED:
                        dirs.pop(wd, None)
                        continue
                    if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and directory != root:
                        continue  # the parent's watch reports it
                    full = os.path.join(directory, name) if name else directory
                    if recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and len(dirs) < MAX_WATCHES:
                        add(full)
                    for bits, kind in EVENT_TYPES:
                        if not mask & bits:
                            continue
                        event = {"e": "fs", "name": os.path.relpath(full, root), "type": kind, "entry": None}
                        if include_entry:
                            try:
                                event["entry"] = entry_info(self.paths, full)
                            except OSError:
                                pass  # gone again (a remove, a rename away)
                        writer.write(json.dumps(event).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            loop.remove_reader(watcher.fd)
            hangup.cancel()

    async def op_move(self, req, reader, writer):
        source = self.paths.to_local(req.get("source", ""), write=True)
        destination = self.paths.to_local(req.get("destination", ""), write=True)
        try:
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.rename(source, destination)
            entry = entry_info(self.paths, destination)
        except OSError as exc:
            raise _os_error(exc, req["source"]) from None
        await self._reply(writer, {"ok": True, "entry": entry})

    # ---------------- previews ----------------
    async def op_forward(self, req, reader, writer):
        """Splice this connection to 127.0.0.1:port inside the sandbox, after one ok line."""
        try:
            port = int(req["port"])
        except (KeyError, TypeError, ValueError):
            raise AgentError("invalid_argument", "forward needs a port") from None
        if not 1 <= port <= 65535:
            raise AgentError("invalid_argument", f"invalid port {port}")
        try:
            up_reader, up_writer = await asyncio.open_connection(self.forward_host, port)
        except OSError:
            raise AgentError("unavailable", f"nothing listens on port {port}") from None
        writer.write(b'{"ok": true}\n')
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    # ---------------- pause / resume (the host keeps the files on its disk meanwhile) ----------------
    def _tar_roots(self) -> list[str]:
        return [os.path.relpath(root, "/") for root in self.paths.roots.values()]

    async def op_archive(self, req, reader, writer):
        """Pause: end every command, then stream a tar of /home/user and /tmp as length-prefixed
        chunks (4-byte big-endian length; 0 ends them), then a JSON line with tar's outcome."""
        for p in self.procs.values():
            p.kill()
        kill_sessions(self.sessions)
        pending = [asyncio.ensure_future(p.ended.wait()) for p in self.procs.values()]
        if pending:
            await asyncio.wait(pending, timeout=1)
        tar = await asyncio.create_subprocess_exec(
            "tar",
            "--create",
            "--file=-",
            "--directory=/",
            "--sparse",
            "--numeric-owner",
            "--warning=no-file-changed",
            "--warning=no-file-removed",
            "--warning=no-file-ignored",
            "--ignore-failed-read",
            *self._tar_roots(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        errors = asyncio.ensure_future(tar.stderr.read())
        writer.write(b'{"ok": true}\n')
        while chunk := await tar.stdout.read(CHUNK):
            writer.write(len(chunk).to_bytes(4, "big") + chunk)
            await writer.drain()
        code = await tar.wait()
        message = (await errors).decode(errors="replace")[-2000:]
        writer.write(b"\0\0\0\0")
        # GNU tar: 1 = some files changed while read (still a complete archive), 2 = fatal.
        await self._reply(writer, {"ok": code in (0, 1), "exit": code, "stderr": message})

    async def op_restore(self, req, reader, writer):
        """Resume: unpack `size` bytes of an archive made by op_archive into /home/user and /tmp."""
        remaining = int(req["size"])
        tar = await asyncio.create_subprocess_exec(
            "tar",
            "--extract",
            "--file=-",
            "--directory=/",
            "--no-overwrite-dir",
            "--no-same-owner",
            *self._tar_roots(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        errors = asyncio.ensure_future(tar.stderr.read())
        try:
            while remaining:
                chunk = await reader.read(min(CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                tar.stdin.write(chunk)
                await tar.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # tar ended early: its exit code and message say why
        finally:
            tar.stdin.close()
        code = await tar.wait()
        message = (await errors).decode(errors="replace")[-2000:]
        if remaining or code != 0:
            raise AgentError("internal", f"restoring the files failed (tar exit {code}): {message.strip()}")
        await self._reply(writer, {"ok": True})


class _Inotify:
    """inotify(7) through libc, standard library only."""

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise AgentError("resource_exhausted", f"error creating watcher: {os.strerror(err)}")
        self.fd = fd

    def add(self, path: str) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return wd

    def read(self) -> list[tuple[int, int, str]]:
        try:
            data = os.read(self.fd, 256 * 1024)
        except BlockingIOError:
            return []
        events, offset = [], 0
        while offset + 16 <= len(data):
            wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
            events.append((wd, mask, os.fsdecode(name)))
            offset += 16 + length
        return events

    def close(self) -> None:
        os.close(self.fd)


def _on_network_mount(path: str) -> bool:
    """Whether path lies on an NFS/CIFS/SMB/FUSE mount (the mount with the longest matching point)."""
    best, fs_type = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                point = left.split()[4].encode().decode("unicode_escape")
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, fs_type = point, right.split()[0]
    except (OSError, IndexError):
        return False
    return fs_type.split(".")[0] in NETWORK_FS_TYPES


async def _write_pty(proc: Proc, data: bytes) -> None:
    """Write all of data to a PTY's (non-blocking) master, unless the session ends meanwhile."""
    view = memoryview(data)
    while view:
        if proc.end is not None or proc.pty_master is None:
            raise AgentError("not_found", "process not found")
        try:
            view = view[os.write(proc.pty_master, view) :]
        except BlockingIOError:
            await asyncio.sleep(0.01)


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        if reader.at_eof():
            writer.close()


async def _relay_egress(socket_path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The sandbox's HTTP(S)_PROXY: each connection is relayed to the host's egress proxy."""
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


def kill_sessions(sessions: set[int]) -> None:
    """SIGKILL every process in one of `sessions` or descended from this agent."""
    own = os.getpid()
    for _ in range(5):
        parents: dict[int, int] = {}
        doomed: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == own:
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat_line = f.read()
                fields = stat_line[stat_line.rindex(b")") + 2 :].split()  # state ppid pgrp session ...
                parents[int(entry)] = int(fields[1])
                if int(fields[3]) in sessions:
                    doomed.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        frontier = {own} | doomed
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - doomed
            doomed |= frontier
        if not doomed:
            return
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def prctl(option: int, value: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def make_undumpable() -> None:
    """Sandbox code runs as this agent's uid: without this it could ptrace the agent, or read its
    memory and take its descriptors through /proc (the secret, the listening socket)."""
    prctl(PR_SET_DUMPABLE, 0)


def read_init(fd: int) -> dict:
    """The host writes one JSON object ({"secret", "env"}) to this pipe and closes it."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return json.loads(b"".join(chunks))


async def serve(args: argparse.Namespace, init: dict) -> None:
    agent = Agent(args, init)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    if args.egress_socket:
        await asyncio.start_server(lambda r, w: _relay_egress(args.egress_socket, r, w), "127.0.0.1", args.egress_port)
    listener = socket.socket(fileno=args.agent_fd)
    listener.set_inheritable(False)  # commands must never hold the agent's socket
    server = await asyncio.start_unix_server(agent.handle, sock=listener)
    agent.arm_deadline()
    async with server:
        await agent.stopping.wait()
    # Give killed commands a moment to be reaped so the sandbox ends cleanly.
    pending = [p.ended.wait() for p in agent.procs.values()]
    if pending:
        await asyncio.wait([asyncio.ensure_future(w) for w in pending], timeout=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="genloop sandbox agent (runs inside one sandbox)")
    parser.add_argument("--agent-fd", type=int, required=True, help="the listening unix socket the host made")
    parser.add_argument("--init-fd", type=int, required=True, help="a pipe carrying the secret and environment")
    parser.add_argument("--home-dir", required=True)
    parser.add_argument("--tmp-dir", required=True)
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--forward-host", default="127.0.0.1")
    parser.add_argument("--read-anywhere", action="store_true")
    parser.add_argument("--egress-socket", help="relay 127.0.0.1:--egress-port to this proxy socket")
    parser.add_argument("--egress-port", type=int, default=3128)
    parser.add_argument("--max-processes", type=int, help="RLIMIT_NPROC of the agent and its commands")
    args = parser.parse_args(argv)
    make_undumpable()  # before the secret is read
    if args.max_processes is not None:
        # Here rather than on bwrap: inside the sandbox's user namespace it counts this sandbox's
        # processes only (Linux >= 5.14); it cannot be raised again without CAP_SYS_RESOURCE.
        resource.setrlimit(resource.RLIMIT_NPROC, (args.max_processes, args.max_processes))
    init = read_init(args.init_fd)
    os.umask(0o022)
    asyncio.run(serve(args, init))
    sys.exit(0)


if __name__ == "__main__":
    main()
