"""The sandbox host's defences (issue 9, docs/security.md), each attacked for real: through the e2b SDK
and raw HTTP against a host subprocess, with the attacker's code running inside sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
from e2b import AsyncSandbox
from e2b.exceptions import AuthenticationException

from genloop.http import preview_client
from genloop.settings import load_settings
from sandbox_host.egress import host_networks
from sandbox_host.sandboxes import AGENT_LOG_MAX_BYTES
from sandbox_host.testing import free_port, running_host, unused_uid
from tests.helpers.sandboxes import pid_namespace_of, processes_in, run, sandbox, serve

pytestmark = pytest.mark.asyncio(loop_scope="session")

MiB = 1024 * 1024


async def wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------------ 1. secrets
HOST_SECRETS = {
    "GENLOOP_API_TOKEN": "marker-api-token-" + secrets.token_hex(8),
    "GENLOOP_LLM_API_KEY": "marker-llm-key-" + secrets.token_hex(8),
    "TEMPORAL_API_KEY": "marker-temporal-key-" + secrets.token_hex(8),
    "AWS_SECRET_ACCESS_KEY": "marker-aws-secret-" + secrets.token_hex(8),
}
READ_ENVIRONMENTS = (
    "for f in /proc/[0-9]*/environ; do echo \"== $f\"; tr '\\0' '\\n' < $f; done 2>/dev/null; "
    "echo '== env'; env; echo '== cmdline'; tr '\\0' ' ' < /proc/1/cmdline"
)


@pytest.mark.parametrize(
    "unsafe, rootless",
    [(False, False), (False, True), (True, False)],
    ids=["isolated", "rootless", "unsafe-no-isolation"],
)
async def test_host_environment_never_reaches_sandbox_code(tmp_path, unsafe, rootless):
    if unsafe and os.geteuid() != 0:
        pytest.skip("per-uid specific: unsafe mode keeps the host's /proc/PID/environ out of reach only through a uid "
                    "of the sandbox's own; as an ordinary user it runs sandbox code as that user (out of scope)")
    # "rootless": a host run by an unprivileged uid (the test's own user is one already when not root).
    run_as = unused_uid() if rootless and os.geteuid() == 0 else None
    async with running_host(tmp_path, env=HOST_SECRETS, unsafe_no_isolation=unsafe, run_as=run_as) as host:
        assert psutil.Process(host.pid).environ()["AWS_SECRET_ACCESS_KEY"] == HOST_SECRETS["AWS_SECRET_ACCESS_KEY"]
        async with sandbox(host.sdk_options(), envs={"MINE": "from-create"}) as sb:
            _, out = await run(sb, READ_ENVIRONMENTS)
    assert "MINE=from-create" in out and "== env" in out  # the probe did read environments
    if not unsafe:
        assert out.count("PATH=") >= 3  # bwrap's pid 1, the shell and env: every one of them readable
    leaked = [name for name, value in HOST_SECRETS.items() if value in out]
    assert leaked == [], out


# ------------------------------------------------------------------------------------ 2. host-only paths
# A fake agent, as sandbox code can write one: sockets named like the agent's, symlinks and absolute
# names pointing at a host socket, in every directory the sandbox can write.
FAKE_AGENT = r"""
import json, os, selectors, socket, sys, threading
TRAP = sys.argv[1]

def answer(conn):
    with conn:
        request = json.loads(conn.makefile("rb").readline() or b"{}")
        op = request.get("op")
        if op == "forward":
            conn.sendall(b'{"ok": true}\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfake')
            return
        reply = {"ok": True, "pid": 1, "deadline": None, "mac": "0" * 64}
        if op == "expose":
            reply["socket"] = TRAP  # an absolute name: the host must never connect there
        conn.sendall(json.dumps(reply).encode() + b"\n")

selector, planted = selectors.DefaultSelector(), []
for directory in ("/run/e2b", "/run", "/home/user", "/tmp", "/var/tmp", "/dev/shm"):
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        continue
    for name in ("agent.sock", "proxy.sock"):
        path = os.path.join(directory, name)
        try:
            if os.path.lexists(path):
                os.unlink(path)
            server = socket.socket(socket.AF_UNIX)
            server.bind(path)
            server.listen(64)
            selector.register(server, selectors.EVENT_READ)
            planted.append(path)
        except OSError:
            pass
    for name in ("port-8080.sock", "port-9090.sock", "agent.sock.lnk"):
        path = os.path.join(directory, name)
        try:
            if os.path.lexists(path):
                os.unlink(path)
            os.symlink(TRAP, path)
            planted.append(path)
        except OSError:
            pass
print("planted", len(planted), flush=True)
open("/tmp/fake-agent-ready", "w").close()
while True:
    for key, _ in selector.select():
        conn, _ = key.fileobj.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()
"""


@contextlib.asynccontextmanager
async def root_only_trap():
    """A unix socket server in a 0700 directory of the test's user (root's in CI): records every
    connection it gets."""
    directory = Path(tempfile.mkdtemp(prefix="trap-"))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    path = directory / "root-only.sock"
    connections: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            connections.append(await asyncio.wait_for(reader.read(200), 1))
        writer.close()

    server = await asyncio.start_unix_server(record, path=str(path))
    try:
        yield path, connections
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


async def test_fake_agent_cannot_redirect_the_host_after_a_restart(tmp_path):
    async with root_only_trap() as (trap, connections), running_host(tmp_path) as host:
        sdk = host.sdk_options()
        async with sandbox(sdk) as sb:
            url = await serve(sb, "the real app")
            await sb.files.write("/tmp/fake_agent.py", FAKE_AGENT)
            await sb.commands.run(f"python3 /tmp/fake_agent.py {trap} > /tmp/fake.out 2>&1", background=True, timeout=0)

            async def planted() -> bool:
                return (await run(sb, "test -f /tmp/fake-agent-ready"))[0] == 0

            await wait_for(planted, "the fake agent to plant its sockets and links")
            await host.restart()

            async with preview_client(timeout=10) as client:
                page = await client.get(url)
                missing = await client.get(f"http://{sb.get_host(9090)}/")
            assert connections == []  # the host never connected outside the sandbox
            assert page.text == "the real app" and missing.status_code == 502
            assert await run(sb, "echo still the real agent") == (0, "still the real agent\n")
            assert await sb.files.read("/home/user/project/content.txt") == "the real app"
            assert "planted" in await sb.files.read("/tmp/fake.out")
        assert connections == []


async def test_agent_that_cannot_prove_the_secret_is_not_adopted(tmp_path):
    async with running_host(tmp_path) as host:
        sdk = host.sdk_options()
        sb = await AsyncSandbox.create(**sdk)
        pid_ns = pid_namespace_of(host, sb.sandbox_id)
        await host.stop()
        # An impostor on the agent's socket (only the host's user can put one there): it answers every ping.
        socket_path = host.state_dir / sb.sandbox_id / "agent.sock"
        socket_path.unlink(missing_ok=True)

        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b'{"ok": true, "pid": 2, "deadline": null, "mac": "' + b"0" * 64 + b'"}\n')
            writer.close()

        server = await asyncio.start_unix_server(impostor, path=str(socket_path))
        try:
            await host.start()
            listed = await AsyncSandbox.list(**sdk).next_items()
            assert sb.sandbox_id not in {s.sandbox_id for s in listed}

            async def reaped() -> bool:
                return not processes_in(pid_ns)

            await wait_for(reaped, "the unverified sandbox to be reaped")
            assert "failed the secret handshake" in host.log_path.read_text()
        finally:
            server.close()


# ------------------------------------------------------------------------------------ 3. keys
async def test_generated_key_is_the_only_key_and_reaches_the_sdk_through_settings(tmp_path):
    async with running_host(tmp_path, generate_key=True) as host:
        key_file = host.data_dir / "sandbox-host.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        # What the worker and the CLI do: no key configured, the local host in use.
        settings = load_settings(
            environ={"GENLOOP_DATA_DIR": str(host.data_dir), "GENLOOP_SANDBOX_HOST_PORT": str(host.port)}
        )
        assert settings.sandbox_api_url == host.url
        key = settings.sandbox_api_key
        opts = {"api_key": key, "api_url": host.url, "sandbox_url": host.url}
        async with sandbox(opts) as sb:
            assert (await sb.commands.run("echo keyed")).stdout == "keyed\n"
        for wrong in ("genloop-local", secrets.token_urlsafe(32)):
            with pytest.raises(AuthenticationException):
                await AsyncSandbox.create(**{**opts, "api_key": wrong})
            with pytest.raises(AuthenticationException):
                await AsyncSandbox.list(**{**opts, "api_key": wrong}).next_items()
        async with httpx.AsyncClient(base_url=host.url) as client:
            assert (await client.get("/v2/sandboxes")).status_code == 401
            assert (await client.get("/v2/sandboxes", headers={"X-API-Key": ""})).status_code == 401

        await host.restart()  # the same key, reused from the file
        assert key_file.read_text().strip() == key
        async with sandbox(opts) as sb:
            assert (await sb.commands.run("echo still keyed")).stdout == "still keyed\n"


async def test_envd_access_token_only_from_create_and_connect(host, sdk):
    async with sandbox(sdk) as sb:
        token = sb._envd_access_token
        assert token
        async with httpx.AsyncClient(base_url=host.url, headers={"X-API-Key": host.api_key}) as client:
            for path in (f"/sandboxes/{sb.sandbox_id}", "/sandboxes", "/v2/sandboxes"):
                response = await client.get(path)
                assert response.status_code == 200 and sb.sandbox_id in response.text
                assert token not in response.text and "envdAccessToken" not in response.text, path
            connected = await client.post(f"/sandboxes/{sb.sandbox_id}/connect", json={"timeout": 60})
            assert connected.json()["envdAccessToken"] == token
        assert (await sb.get_info()).sandbox_id == sb.sandbox_id
        again = await AsyncSandbox.connect(sb.sandbox_id, **sdk)
        assert (await again.commands.run("echo connected")).stdout == "connected\n"


async def test_network_bind_without_a_configured_key_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_SANDBOX_HOST_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbox_host", "--host", "0.0.0.0", "--port", str(free_port()),
        "--state-dir", str(tmp_path / "state"),
        env={**env, "GENLOOP_DATA_DIR": str(tmp_path / "data")},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    lines = stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert "not a loopback address" in lines[0] and "GENLOOP_SANDBOX_HOST_API_KEY" in lines[0]
    assert not (tmp_path / "data" / "sandbox-host.key").exists()


# ------------------------------------------------------------------------------------ 4. DNS rebinding
async def test_foreign_host_header_gets_421_and_nothing_is_forwarded(host, sdk):
    async with sandbox(sdk) as sb:
        url = await serve(sb, "the target app")
        before = {s.sandbox_id for s in await AsyncSandbox.list(**sdk).next_items()}
        port = host.port
        foreign = [
            "evil.example",
            f"evil.example:{port}",
            f"127.0.0.1.nip.io:{port}",
            f"localhost.evil.example:{port}",
            f"8080-{sb.sandbox_id}.evil.example:{port}",
            f"8080-{sb.sandbox_id}.localhost.evil.example",
        ]
        key = {"X-API-Key": host.api_key}
        envd = {"E2b-Sandbox-Id": sb.sandbox_id, "X-Access-Token": sb._envd_access_token}
        async with httpx.AsyncClient(base_url=host.url) as client:
            for name in foreign:
                h = {"Host": name}
                answers = [
                    await client.get("/health", headers=h),
                    await client.get("/", headers=h),
                    await client.get("/v2/sandboxes", headers={**h, **key}),
                    await client.post("/v2/sandboxes", headers={**h, **key}, json={"templateID": "base"}),
                    await client.get("/files", params={"path": "/home/user/project/x"}, headers={**h, **envd}),
                ]
                for answer in answers:
                    assert answer.status_code == 421 and answer.json()["code"] == 421, (name, answer.text)
                    assert "target app" not in answer.text
            for name in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", f"[::1]:{port}"):
                assert (await client.get("/health", headers={"Host": name})).status_code == 200, name
        # An HTTP/1.0 request without any Host header is refused too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.0\r\n\r\n")
        status_line = (await reader.readline()).decode()
        writer.close()
        assert " 421 " in status_line
        after = {s.sandbox_id for s in await AsyncSandbox.list(**sdk).next_items()}
        assert after == before  # the create with a foreign Host created nothing
        async with preview_client(timeout=10) as client:
            assert (await client.get(url)).text == "the target app"


async def test_public_host_names_are_served(tmp_path):
    async with running_host(tmp_path, public_hosts=["genloop.example", "*.apps.example"]) as host:
        async with httpx.AsyncClient(base_url=host.url) as client:
            for name, status in [
                ("genloop.example", 200),
                (f"GENLOOP.example:{host.port}", 200),
                (f"x.apps.example:{host.port}", 200),
                ("apps.example", 421),
                ("genloop.example.evil", 421),
                ("evilgenloop.example", 421),
            ]:
                assert (await client.get("/health", headers={"Host": name})).status_code == status, name


# ------------------------------------------------------------------------------------ 6. egress
TUNNEL = r"""
import socket, sys
for target in sys.argv[1:]:
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    print(target, s.recv(200).split(b"\r\n")[0].decode(), flush=True)
    s.close()
"""


async def test_egress_proxy_refuses_every_address_may_dial_denies(host, sdk):
    gateways = [
        f"{net[1]}:80" if net.version == 4 else f"[{net[1]}]:80"
        for net in host_networks()
        if net.prefixlen < net.max_prefixlen and not net.is_loopback
    ]
    # Each would be dialled by a proxy that let it through; refused, none is.
    targets = [
        "198.18.0.1:9", "240.0.0.1:9", "100.64.0.1:9", "169.254.169.254:80", "192.0.2.1:9",
        "[64:ff9b::7f00:1]:80", "[::ffff:127.0.0.1]:80", "[2002:7f00:1::1]:80", "[::7f00:1]:80", "[fec0::1]:80",
        f"127.0.0.1:{host.port}", "localhost:22", *gateways,
    ]  # fmt: skip
    log_before = host.log_path.stat().st_size
    async with sandbox(sdk) as sb:
        await sb.files.write("/tmp/tunnel.py", TUNNEL)
        out = (await sb.commands.run("python3 /tmp/tunnel.py " + " ".join(targets), timeout=60)).stdout
        sandbox_id = sb.sandbox_id
    answers = dict(line.split(" ", 1) for line in out.splitlines())
    assert set(answers) == set(targets)
    assert all(status.startswith("HTTP/1.1 403") for status in answers.values()), answers
    log = host.log_path.read_bytes()[log_before:].decode(errors="replace")
    assert log.count(f"sandbox {sandbox_id}: egress to") == 1  # once per sandbox, then counted
    assert f"sandbox {sandbox_id}: 0 egress connections refused at the cap, {len(targets)} to denied" in log


# ------------------------------------------------------------------------------------ 5. resource caps
FILL = r"""
import errno, os, sys
target, limit = sys.argv[1], int(sys.argv[2])
chunk, written, error = b"\0" * (4 << 20), 0, "none"
try:
    if target == "pid1-stdout":  # pid 1 (bwrap) is dumpable: its stdout can be taken from it
        import ctypes
        fd = ctypes.CDLL(None, use_errno=True).syscall(438, os.pidfd_open(1), 1, 0)  # pidfd_getfd
        while written < limit:
            written += os.write(fd, chunk)
    else:
        i = 0
        while written < limit:  # files of 100 MB: under RLIMIT_FSIZE
            with open(os.path.join(target, f"fill{i}"), "wb", buffering=0) as f:
                for _ in range(25):
                    if written >= limit:
                        break
                    written += f.write(chunk)
            i += 1
except OSError as exc:
    error = errno.errorcode.get(exc.errno, str(exc.errno))
print(target, written, error)
"""
WRITABLE_MOUNTS = r"""
import os
for line in open("/proc/self/mounts"):
    _, mountpoint, fstype = line.split()[:3]
    pseudo = fstype in ("proc", "devpts", "devtmpfs", "sysfs")
    if not pseudo and os.path.isdir(mountpoint) and os.access(mountpoint, os.W_OK):
        print(mountpoint)
"""


async def test_sandbox_writable_storage_is_capped_and_never_the_hosts_disk(host, sdk):
    disk_mb = host.config().limits.disk_mb
    small_mb = 64  # /run, /var, /dev/shm
    async with sandbox(sdk) as sb:
        await sb.files.write_files(
            [{"path": "/home/user/writer.py", "data": FILL}, {"path": "/tmp/mounts.py", "data": WRITABLE_MOUNTS}]
        )
        writable = set((await sb.commands.run("python3 /tmp/mounts.py")).stdout.split())
        assert writable <= {"/home/user", "/tmp", "/run", "/var", "/dev/shm"}, writable
        targets = {"/home/user": disk_mb, "/tmp": disk_mb, "/run": small_mb, "/var/tmp": small_mb, "/dev/shm": small_mb}
        if (await run(sb, "test -d /run/e2b"))[0] == 0:
            targets["/run/e2b"] = small_mb
        for read_only in ("/", "/home", "/dev", "/etc", "/usr"):
            targets[read_only] = 0
        limit = int(1.4 * 1000 * MiB)
        report = {}
        for target, cap_mb in targets.items():
            before = shutil.disk_usage(host.state_dir).used
            _, out = await run(sb, f"python3 /home/user/writer.py {target} {limit}", timeout=180)
            grew = shutil.disk_usage(host.state_dir).used - before
            await run(sb, f"rm -f {target.rstrip('/')}/fill*")
            assert out.split()[-1:] and out.split()[-1].isupper(), (target, out)
            _, written, error = out.split()[-3:]
            report[target] = (int(written) // MiB, error, grew // MiB)
            assert error in ("ENOSPC", "EROFS", "EACCES"), (target, out)
            assert int(written) <= cap_mb * MiB, (target, out)
            assert grew < 64 * MiB, (target, grew)
        # bwrap's pid 1 holds the sandbox's stdout/stderr: a pipe the host drains, keeping a bounded log.
        before = shutil.disk_usage(host.state_dir).used
        _, out = await run(sb, f"python3 /home/user/writer.py pid1-stdout {limit}", timeout=180)
        grew = shutil.disk_usage(host.state_dir).used - before
        report["pid 1's stdout"] = (int(out.split()[-2]) // MiB, out.split()[-1], grew // MiB)
        assert grew < 64 * MiB, (out, grew)
        assert (host.state_dir / sb.sandbox_id / "agent.log").stat().st_size <= AGENT_LOG_MAX_BYTES
    print("MB written, error, MB of host disk used:", report)


async def test_nested_user_namespaces_fail(sdk):
    async with sandbox(sdk) as sb:
        code, out = await run(sb, "unshare -Ur true")
        assert code != 0, out
        code, out = await run(sb, "unshare -Urm sh -c 'mount -t tmpfs none /tmp && echo mounted'")
        assert code != 0 and "mounted" not in out, out


HOG = r"""
import os, resource, select, socket, sys, time
count, settle, hold = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
sockets, failed = [], 0
for _ in range(count):
    try:
        sockets.append(socket.create_connection(("127.0.0.1", 3128), timeout=10))
    except OSError:
        failed += 1
open("/tmp/hog-connected", "w").close()
poller = select.poll()
for s in sockets:
    poller.register(s, select.POLLIN)
# Readable: the proxy's 503 and close; held ones stay silent. The kernel completes a connect before
# the agent accepts it, so wait for the count to settle.
counts = []
while len(counts) < 4 or len(set(counts[-4:])) > 1:
    time.sleep(settle)
    ready = poller.poll(0)
    counts.append(len(ready))
by_fd = {s.fileno(): s for s in sockets}
readable = {by_fd[fd] for fd, _ in ready}
# A refused connection got the proxy's 503; a held one is silent, or closed without a word once the
# proxy's head timeout passed (a slow machine takes that long to open them all).
answers = {s: s.recv(16) for s in readable}
refused = sum(1 for a in answers.values() if a.startswith(b"HTTP/1.1 503"))
timed_out = len(answers) - refused
print(f"connected={len(sockets)} failed={failed} refused={refused} held={len(sockets) - len(answers)} "
      f"timed_out={timed_out}", flush=True)
open("/tmp/hog-counted", "w").close()
time.sleep(hold)
"""


async def test_connection_flood_is_capped_per_sandbox_and_other_previews_still_answer(tmp_path):
    async with running_host(tmp_path) as host:
        cap = host.config().max_egress_connections
        sdk = host.sdk_options()
        log_before = host.log_path.stat().st_size
        async with sandbox(sdk) as victim, sandbox(sdk) as hog:
            url = await serve(victim, "the victim still answers")
            await hog.files.write("/tmp/hog.py", HOG)
            await hog.commands.run("python3 /tmp/hog.py 6000 0.5 60 > /tmp/hog.out 2>&1", background=True, timeout=0)

            async def hog_file(name: str) -> bool:
                return (await run(hog, f"test -f /tmp/{name}"))[0] == 0

            await wait_for(lambda: hog_file("hog-connected"), "the flood's connections", timeout=120)
            async with preview_client(timeout=30) as client:
                started = time.monotonic()
                page = await client.get(url)
                latency = time.monotonic() - started
            assert page.status_code == 200 and page.text == "the victim still answers"
            print(f"victim's preview under the flood: {page.status_code} in {latency * 1000:.0f} ms")
            await wait_for(lambda: hog_file("hog-counted"), "the flood's count", timeout=60)
            counts = dict(item.split("=") for item in (await hog.files.read("/tmp/hog.out")).split())
            print("flood:", counts)
            connected, refused, held = int(counts["connected"]), int(counts["refused"]), int(counts["held"])
            timed_out = int(counts["timed_out"])  # held, then closed by the head timeout, freeing a slot
            assert connected + int(counts["failed"]) == 6000 and connected > cap
            assert 0 < held + timed_out and held <= cap and refused >= connected - cap - timed_out, counts
        log = host.log_path.read_bytes()[log_before:].decode(errors="replace")
        assert log.count("egress refused") == 1, log[-3000:]
        assert "Traceback" not in log and len(log) < 64 * 1024, log[-3000:]


SLOW_SERVER = r"""
import http.server, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(2)
        self.send_response(200); self.send_header("Content-Length", "4"); self.end_headers(); self.wfile.write(b"slow")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


async def test_preview_connections_are_capped_per_sandbox(tmp_path):
    cap = 4
    async with running_host(tmp_path, max_preview_connections=cap) as host:
        async with sandbox(host.sdk_options()) as sb:
            await sb.files.write("/home/user/slow.py", SLOW_SERVER)
            await sb.commands.run("python3 /home/user/slow.py", background=True, timeout=0)
            url = f"http://{sb.get_host(8080)}/"
            async with preview_client(timeout=30) as client:

                async def serving() -> bool:
                    with contextlib.suppress(httpx.HTTPError):
                        return (await client.get(url)).status_code == 200
                    return False

                await wait_for(serving, "the slow server")
                answers = await asyncio.gather(*(client.get(url) for _ in range(3 * cap)))
            statuses = sorted(a.status_code for a in answers)
            assert statuses.count(200) >= 1 and statuses.count(503) >= 2 * cap - 1, statuses
            assert statuses.count(200) <= cap, statuses
        log = host.log_path.read_text()
        assert log.count("preview refused") == 1
