"""Hostile generated code inside a sandbox (run through the e2b SDK on a local host of the test's own):
reading the host's home or the repository, a fork bomb, filling the disk, a 10 GB allocation,
binding a port another sandbox uses, signalling its parent and everything it can see. Each attack
runs in a fresh sandbox and is contained: after each one the host answers, another sandbox's preview
still serves its own page, and at the end the worker is alive and a new build reaches READY."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import e2b
import httpx
import pytest
from e2b import AsyncSandbox

from genloop.http import preview_client
from sandbox_host.testing import running_host
from tests.helpers.sandboxes import pid_namespace_of, processes_in
from tests.reliability.harness import REPO_ROOT, Stack, wait_until

pytestmark = pytest.mark.reliability

MAX_PROCESSES = 64
DISK_LIMIT_MB = 256
MEMORY_LIMIT_MB = 1024


@pytest.fixture
async def hostile_stack(temporal_env, pg_url, tmp_path):
    from tests.reliability.conftest import temporal_target

    async with running_host(
        tmp_path / "host", max_processes=MAX_PROCESSES, disk_limit_mb=DISK_LIMIT_MB, memory_limit_mb=MEMORY_LIMIT_MB
    ) as host:
        stack = Stack(temporal_env.client, temporal_target(temporal_env), pg_url, host, tmp_path)
        try:
            yield stack
        finally:
            await stack.close()


async def _run(sandbox: AsyncSandbox, cmd: str, timeout: int = 60) -> tuple[int, str]:
    """Run a command; (exit code, stdout+stderr), whether it exits 0 or not."""
    try:
        result = await sandbox.commands.run(cmd, timeout=timeout)
        return result.exit_code, result.stdout + result.stderr
    except e2b.CommandExitException as exc:
        return exc.exit_code, (exc.stdout or "") + (exc.stderr or "")


async def test_hostile_code_is_contained(hostile_stack):
    stack = hostile_stack
    host = stack.host
    worker = await stack.start_worker()
    victim = await (await stack.start_build("template", goal="the victim app")).result()
    assert victim.status == "ready"
    opts = host.sdk_options()
    outcomes: dict[str, str] = {}

    async def others_fine() -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{host.url}/health")).status_code == 200
        async with preview_client(timeout=10) as http:
            page = await http.get(victim.preview_url)
        assert page.status_code == 200 and "the victim app" in page.text
        assert worker.alive

    async def attacker() -> AsyncSandbox:
        return await AsyncSandbox.create(timeout=600, metadata={"role": "attacker"}, **opts)

    # 1. Read the host's home and the repository.
    sb = await attacker()
    home = Path.home()
    code, out = await _run(sb, f"cat {REPO_ROOT}/pyproject.toml; ls -A {home}; cat /etc/shadow; ls {host.state_dir}")
    # The file's own contents, not a word that may also be in a path (a checkout named genloop).
    marker = next(line for line in (REPO_ROOT / "pyproject.toml").read_text().splitlines() if "description" in line)
    assert code != 0 and marker not in out, out
    for path in (f"{REPO_ROOT}/pyproject.toml", f"{host.state_dir}/{sb.sandbox_id}/record.json"):
        with pytest.raises(e2b.NotFoundException):
            await sb.files.read(path)
    assert not await sb.files.exists(str(REPO_ROOT))
    outcomes["read host files"] = "not visible (not mounted)"
    await others_fine()

    # 2. Fork bomb: RLIMIT_NPROC counts the sandbox's user namespace only (per-uid and rootless
    # alike); the command deadline and the kill end it. Its processes are those of its pid namespace.
    sb = await attacker()
    pid_ns = pid_namespace_of(host, sb.sandbox_id)
    bomb = asyncio.ensure_future(_run(sb, "bomb() { bomb | bomb & }; bomb; sleep 30", timeout=20))
    peak = 0

    async def bomb_at_limit() -> bool:
        nonlocal peak
        peak = max(peak, len(processes_in(pid_ns)))
        return peak >= MAX_PROCESSES * 0.8

    await wait_until(bomb_at_limit, "the fork bomb to reach the process limit", timeout=30, interval=0.05)
    await others_fine()  # while the bomb runs
    for _ in range(20):
        peak = max(peak, len(processes_in(pid_ns)))
        await asyncio.sleep(0.05)
    assert peak <= MAX_PROCESSES, peak
    await sb.kill()
    bomb.cancel()
    await wait_until(lambda: not processes_in(pid_ns), "the fork bomb's processes to be gone", timeout=30)
    outcomes["fork bomb"] = f"peak {peak} processes (limit {MAX_PROCESSES}); all gone after kill"
    await others_fine()

    # 3. Fill the disk: many files, each below RLIMIT_FSIZE, up to twice the sandbox's disk limit.
    sb = await attacker()
    before = shutil.disk_usage(host.state_dir).used
    chunks = 2 * DISK_LIMIT_MB // 32
    fill = "; ".join(
        f"i=0; while [ $i -lt {chunks} ]; do head -c 32M /dev/zero > {d}/fill$i || break; i=$((i+1)); done"
        for d in ("/home/user", "/tmp")
    )
    code, out = await _run(sb, f"{fill}; du -sm /home/user /tmp", timeout=120)
    assert "No space left on device" in out, out
    used = {
        line.split()[1]: int(line.split()[0])
        for line in out.splitlines()
        if line.split()[-1:] in (["/home/user"], ["/tmp"])
    }
    assert used and all(mb <= DISK_LIMIT_MB for mb in used.values()), out
    grew_mb = (shutil.disk_usage(host.state_dir).used - before) / 2**20
    assert grew_mb < DISK_LIMIT_MB / 2, grew_mb  # nothing landed on the host's disk
    # The sandbox itself still works after hitting its limit.
    assert (await sb.commands.run("rm -f /home/user/fill* /tmp/fill*; echo ok")).stdout.strip() == "ok"
    await sb.kill()
    outcomes["fill the disk"] = f"ENOSPC at {used} MB (limit {DISK_LIMIT_MB} MB each); host disk +{grew_mb:.0f} MB"
    await others_fine()

    # 4. A 10 GB allocation.
    sb = await attacker()
    code, out = await _run(sb, "python3 -c 'b = bytearray(10 * 1024**3); print(len(b))'")
    assert code != 0 and "MemoryError" in out, out
    await sb.kill()
    outcomes["10 GB allocation"] = f"MemoryError (RLIMIT_DATA {MEMORY_LIMIT_MB} MB)"
    await others_fine()

    # 5. Bind the port another sandbox's app uses, and reach for the host's services.
    sb = await attacker()
    server = (
        'python3 -c "import http.server as h\n'
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'attacker')\n"
        "h.HTTPServer(('0.0.0.0', 8080), H).serve_forever()\""
    )
    await sb.commands.run(server, background=True, timeout=0)
    attacker_url = f"http://{sb.get_host(8080)}"

    async def serving() -> bool:
        async with preview_client(timeout=5) as http:
            return (await http.get(attacker_url)).text == "attacker"

    await wait_until(serving, "the attacker's server on 8080")
    code, out = await _run(
        sb, f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {host.port}), timeout=3)\""
    )
    assert code != 0 and ("refused" in out or "unreachable" in out.lower()), out
    await others_fine()  # the victim's 8080 still serves the victim
    await sb.kill()
    outcomes["bind another sandbox's port"] = "own network namespace: both serve 8080; host ports unreachable"

    # 6. Signal its parent, a host process, and everything it can see.
    sb = await attacker()
    pid_ns = pid_namespace_of(host, sb.sandbox_id)
    code, out = await _run(sb, f"kill -9 {os.getpid()} {worker.pid} {host.pid}; echo rc=$?")
    assert "rc=1" in out or "No such process" in out, out  # host pids do not exist in its pid namespace
    assert worker.alive and host.running
    with pytest.raises(Exception):  # noqa: B017 - the SDK's error for a dead command varies; it must fail
        await sb.commands.run("kill -9 $PPID; kill -9 -1; sleep 5", timeout=30)

    async def attacker_gone() -> bool:
        listed = {s.sandbox_id for s in await stack.sandboxes.list()}
        return sb.sandbox_id not in listed and not processes_in(pid_ns)

    await wait_until(attacker_gone, "the self-destroyed sandbox to be reaped", timeout=30)
    outcomes["signal its parent"] = "host pids invisible; killing its agent ends only its own sandbox"
    await others_fine()

    # Afterwards: the worker still builds.
    after = await (await stack.start_build("template", goal="built after the attacks")).result()
    assert after.status == "ready"
    async with preview_client(timeout=10) as http:
        assert "built after the attacks" in (await http.get(after.preview_url)).text
    await others_fine()
    for attack, outcome in outcomes.items():
        print(f"{attack}: {outcome}")
