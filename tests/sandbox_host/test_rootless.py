"""Rootless mode: a real host run by an unprivileged user (an unused uid when the tests run as root,
as in CI; the test's own user otherwise), driven through the e2b SDK. Its sandboxes run as that user
in namespaces of their own; cleanup and adoption work without uid blocks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator

import psutil
import pytest
from e2b import AsyncSandbox, SandboxNotFoundException

from activities.runners import Capability, RunnerTask, TemplateRunner, no_progress
from genloop.http import preview_client
from sandbox_host.isolation import ROOTLESS
from sandbox_host.testing import RunningHost, running_host, unused_uid
from tests.helpers.sandboxes import (
    assert_isolated_from_each_other,
    pid_namespace_of,
    processes_in,
    record_of,
    sandbox,
    serve,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_PROCESSES = 48
RUN_AS = unused_uid() if os.geteuid() == 0 else None
HOST_UID = RUN_AS if RUN_AS is not None else os.getuid()


@pytest.fixture(scope="module")
async def rootless(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningHost]:
    async with running_host(
        tmp_path_factory.mktemp("rootless"), run_as=RUN_AS, default_timeout_s=120, max_processes=MAX_PROCESSES
    ) as host:
        yield host


def _write_record(host: RunningHost, sandbox_id: str, record: dict) -> None:
    """A record as the host writes one (its own 0700 directory, 0600 file)."""
    directory = host.state_dir / sandbox_id
    directory.mkdir(mode=0o700)
    path = directory / "record.json"
    path.write_text(json.dumps(record))
    path.chmod(0o600)
    for owned in (directory, path):
        os.chown(owned, HOST_UID, HOST_UID)


async def test_the_host_runs_rootless_and_says_so(rootless):
    health = await rootless.health()
    assert health.pop("host_id").startswith("h-")
    assert health == {"status": "ok", "isolated": True, "mode": ROOTLESS}
    assert psutil.Process(rootless.pid).uids().real == HOST_UID
    assert "(mode rootless: sandboxes run as this user, in namespaces of their own" in rootless.log_path.read_text()


async def test_create_upload_run_and_preview_a_node_app(rootless):
    sdk = rootless.sdk_options()
    app = await TemplateRunner().run(
        RunnerTask(kind=Capability.NEW_APP, goal="a rootless <app>", stack="node"), no_progress
    )
    async with sandbox(sdk, metadata={"flow": "rootless"}) as sb:
        await sb.files.write_files([{"path": f"/home/user/project/{p}", "data": c} for p, c in app.files.items()])
        assert sorted(e.name for e in await sb.files.list("/home/user/project")) == sorted(app.files)
        handle = await sb.commands.run(
            "node server.js", cwd="/home/user/project", envs={"PORT": "8080"}, background=True, timeout=0
        )
        url = f"http://{sb.get_host(8080)}"
        async with preview_client(timeout=5) as client:
            for _ in range(200):
                try:
                    if (await client.get(f"{url}/health")).status_code == 200:
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                await asyncio.sleep(0.05)
            page = await client.get(url)
        assert page.status_code == 200 and "a rootless &lt;app&gt;" in page.text
        assert any(p.pid == handle.pid for p in await sb.commands.list())
        pid_ns = pid_namespace_of(rootless, sb.sandbox_id)
        # From the host, every process of the sandbox is the host's user (uid 1000 only inside).
        assert {psutil.Process(pid).uids().real for pid in processes_in(pid_ns)} == {HOST_UID}
        assert (await sb.commands.run("id -u")).stdout == "1000\n"
    # Killing it killed its pid namespace's init, and with it every process of the namespace.
    assert processes_in(pid_ns) == []
    assert not (rootless.state_dir / sb.sandbox_id).exists()


async def test_isolation_holds(rootless):
    sdk = rootless.sdk_options()
    async with sandbox(sdk) as a, sandbox(sdk) as b:
        await assert_isolated_from_each_other(rootless, a, b)
        assert rootless.running
        tunnel = (
            "import socket; s = socket.create_connection(('127.0.0.1', 3128), 5); "
            f"s.sendall(b'CONNECT 127.0.0.1:{rootless.port} HTTP/1.1\\r\\n\\r\\n'); print(s.recv(12).decode())"
        )
        assert (await b.commands.run(f'python3 -c "{tunnel}"')).stdout == "HTTP/1.1 403\n"


FORKS = r"""
import os, sys, time
count = 0
for _ in range(int(sys.argv[1])):
    try:
        if os.fork() == 0:
            time.sleep(float(sys.argv[2]))
            os._exit(0)
        count += 1
    except OSError as exc:
        print("fork failed:", exc.strerror, flush=True)
        break
print("forked", count, flush=True)
open(sys.argv[3], "w").close()
time.sleep(float(sys.argv[2]))
"""


async def test_the_process_cap_holds_per_sandbox(rootless):
    """RLIMIT_NPROC counts each sandbox's user namespace (Linux >= 5.14): one sandbox at its cap
    leaves the others theirs, although together they run more processes as the user than the cap."""
    sdk = rootless.sdk_options()
    async with sandbox(sdk) as bomb, sandbox(sdk) as other:
        assert (await bomb.commands.run("ulimit -u")).stdout == f"{MAX_PROCESSES}\n"
        await bomb.files.write("/tmp/forks.py", FORKS)
        await other.files.write("/tmp/forks.py", FORKS)
        await bomb.commands.run("python3 /tmp/forks.py 500 60 /tmp/done > /tmp/out 2>&1", background=True, timeout=0)
        for _ in range(300):  # (no command can start in it now: file operations run in its agent)
            if await bomb.files.exists("/tmp/done"):
                break
            await asyncio.sleep(0.1)
        bomb_out = await bomb.files.read("/tmp/out")
        assert "fork failed: Resource temporarily unavailable" in bomb_out, bomb_out
        at_cap = len(processes_in(pid_namespace_of(rootless, bomb.sandbox_id)))
        assert MAX_PROCESSES * 0.8 <= at_cap <= MAX_PROCESSES, at_cap

        await other.commands.run("python3 /tmp/forks.py 30 30 /tmp/done > /tmp/out 2>&1", background=True, timeout=0)
        for _ in range(300):
            if await other.files.exists("/tmp/done"):
                break
            await asyncio.sleep(0.1)
        out = await other.files.read("/tmp/out")
        assert "forked 30" in out and "fork failed" not in out, out
        users = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == HOST_UID)
        print(f"sandbox at its cap: {at_cap} processes; the user runs {users} in all")
        assert users > MAX_PROCESSES  # so the cap is not the user's


async def test_restart_adopts_and_reaps_only_what_records_prove(rootless):
    sdk = rootless.sdk_options()
    kept = await AsyncSandbox.create(**sdk)
    url = await serve(kept, "adopted without uid blocks")
    expiring = await AsyncSandbox.create(**sdk)
    await expiring.commands.run("sleep 600", background=True, timeout=0)
    expiring_ns = pid_namespace_of(rootless, expiring.sandbox_id)
    await expiring.set_timeout(2)

    # Processes of the host's user that are no sandbox's, named by records that do not prove it: the
    # right pid and start time in another pid namespace, and the right namespace with another start.
    run_as = {"user": HOST_UID, "group": HOST_UID} if RUN_AS is not None else {}
    decoys = [subprocess.Popen(["sleep", "300"], **run_as) for _ in range(2)]
    template = {k: v for k, v in record_of(rootless, kept.sandbox_id).items()}
    own_ns = os.stat("/proc/self/ns/pid").st_ino
    forged = {
        "decoyotherns0000000": {"init_pid": decoys[0].pid, "pid_ns": expiring_ns},
        "decoyotherstart0000": {"init_pid": decoys[1].pid, "pid_ns": own_ns, "init_started": 1.0},
    }
    try:
        await rootless.kill()  # a crash
        for sandbox_id, fields in forged.items():
            started = psutil.Process(fields["init_pid"]).create_time()
            record = {**template, "init_started": started, **fields, "sandbox_id": sandbox_id}
            _write_record(rootless, sandbox_id, record)
        await asyncio.sleep(3)
        assert processes_in(expiring_ns) == []  # its own agent enforced its deadline meanwhile
        await rootless.start()

        async with preview_client() as client:
            assert (await client.get(url)).text == "adopted without uid blocks"
        assert (await kept.commands.run("echo adopted")).stdout == "adopted\n"
        with pytest.raises(SandboxNotFoundException):
            await expiring.get_info()
        listed = {s.sandbox_id for s in await AsyncSandbox.list(**sdk).next_items()}
        assert kept.sandbox_id in listed and not listed & set(forged)
        assert all(decoy.poll() is None for decoy in decoys)  # not provably a sandbox's: left alone
        assert not any((rootless.state_dir / sandbox_id).exists() for sandbox_id in forged)
    finally:
        for decoy in decoys:
            decoy.kill()
            decoy.wait()
        await kept.kill()
