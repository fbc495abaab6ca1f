"""E2B's own behaviour, point by point, through the unmodified e2b SDK (async, and sync where the SDK
has both: sync calls run in a thread). Each test names the behaviour it proves; the conformance
table in sandbox_host/README.md points here."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    FilesystemEventType,
    FileType,
    PtySize,
    Sandbox,
    WatchHandle,
)
from e2b.exceptions import NotFoundException, SandboxException, SandboxNotRunningException
from packaging.version import Version

from sandbox_host.config import ENVD_VERSION
from sandbox_host.isolation import ROOTLESS
from sandbox_host.testing import RunningHost, running_host, unused_uid
from tests.helpers.sandboxes import sandbox

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def eventually(check: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def sync_sandbox(sdk: dict[str, Any]) -> Sandbox:
    return Sandbox.create(**sdk)


# ------------------------------------------------------------------------------------ envd version
async def test_reports_the_envd_version_whose_gates_it_implements(sdk):
    assert Version(ENVD_VERSION) == Version("0.6.4")
    async with sandbox(sdk) as sb:
        assert sb._envd_version == Version(ENVD_VERSION)
        # allow_network_mounts (0.6.4): accepted, and the sandbox has no network mount to refuse.
        await sb.files.make_dir("/home/user/nm")
        handle = await sb.files.watch_dir("/home/user/nm", lambda e: None, allow_network_mounts=True)
        await handle.stop()


# ------------------------------------------------------------------------------------ PTY
async def test_pty_create_input_resize_connect_kill(sdk):
    async with sandbox(sdk) as sb:
        output = bytearray()
        handle = await sb.pty.create(PtySize(rows=24, cols=80), on_data=output.extend, timeout=0)
        assert handle.pid in {p.pid for p in await sb.commands.list()}
        await sb.pty.send_stdin(handle.pid, b"tty; stty size; echo PTY_$((40+2))\n")
        await eventually(lambda: b"PTY_42" in output and b"24 80" in output, what="PTY output")
        assert b"/dev/pts/" in output
        assert b"no job control" not in output  # the shell has a controlling terminal
        with pytest.raises(SandboxException, match="tty assigned to process"):
            await sb.commands.send_stdin(handle.pid, "stdin is not the terminal\n")
        await sb.pty.resize(handle.pid, PtySize(rows=30, cols=100))
        await sb.pty.send_stdin(handle.pid, b"stty size\n")
        await eventually(lambda: b"30 100" in output, what="the new size")

        # A second client attaches to the running PTY and sees what it prints from now on.
        seen = bytearray()
        attached = await sb.pty.connect(handle.pid, on_data=seen.extend)
        await sb.pty.send_stdin(handle.pid, b"echo BOTH_$((6*7))\n")
        await eventually(lambda: b"BOTH_42" in seen and b"BOTH_42" in output, what="output on both streams")
        await attached.disconnect()

        assert await sb.pty.kill(handle.pid) is True
        with pytest.raises(CommandExitException) as ended:
            await handle.wait()
        assert ended.value.exit_code == -1 and ended.value.error == "signal: killed"
        assert await sb.pty.kill(handle.pid) is False


async def test_pty_sync_and_commands_connect(sdk):
    def scenario() -> tuple[bytes, int | None, str | None]:
        sb = sync_sandbox(sdk)
        try:
            handle = sb.pty.create(PtySize(rows=10, cols=40), timeout=0)
            sb.pty.send_stdin(handle.pid, b"stty size; exit 3\n")
            output = bytearray()
            try:
                handle.wait(on_pty=output.extend)
            except CommandExitException as exc:
                return bytes(output), exc.exit_code, exc.error
            return bytes(output), 0, None
        finally:
            sb.kill()

    output, code, error = await in_thread(scenario)
    assert b"10 40" in output and code == 3 and error == "exit status 3"

    async with sandbox(sdk) as sb:  # commands.connect(pid) attaches to a PTY too
        handle = await sb.pty.create(PtySize(rows=24, cols=80), on_data=lambda d: None, timeout=0)
        attached = await sb.commands.connect(handle.pid)
        await sb.pty.send_stdin(handle.pid, b"exit 5\n")
        with pytest.raises(CommandExitException) as ended:
            await attached.wait()
        assert ended.value.exit_code == 5


async def test_stream_input_to_a_command(sdk):
    async with sandbox(sdk) as sb:
        handle = await sb.commands.run("cat", background=True, stdin=True, timeout=0)
        async with sb.commands.stream_input(handle.pid) as stream:
            for part in ("one ", "two ", "three\n"):
                await stream.send(part)
        await eventually(lambda: handle.stdout == "one two three\n", what="cat echoing the streamed input")
        await handle.kill()


async def test_stdin_and_upload_encodings(sdk):
    async with sandbox(sdk) as sb:
        handle = await sb.commands.run("cat", background=True, stdin=True)
        await sb.commands.send_stdin(handle.pid, "line one\n")
        await handle.send_stdin("line two\n")
        await handle.close_stdin()
        assert (await handle.wait()).stdout == "line one\nline two\n"
        await sb.files.write("/home/user/gz.txt", "gzipped upload", gzip=True)
        await sb.files.write("/home/user/stream.bin", io.BytesIO(b"\0" * 100_000), use_octet_stream=True)
        assert await sb.files.read("/home/user/gz.txt") == "gzipped upload"
        assert (await sb.files.get_info("/home/user/stream.bin")).size == 100_000


async def test_every_command_runs_as_the_sandbox_user(sdk):
    """Documented difference: there is no root in a local sandbox; `user="root"` runs as `user`."""
    async with sandbox(sdk) as sb:
        assert (await sb.commands.run("id -un; id -u", user="root")).stdout == "user\n1000\n"


# ------------------------------------------------------------------------------------ watch
async def test_watch_dir_async_recursive_with_entry_info(sdk):
    async with sandbox(sdk) as sb:
        await sb.files.make_dir("/home/user/w")
        events = []
        exits = []
        handle = await sb.files.watch_dir(
            "/home/user/w", events.append, on_exit=exits.append, recursive=True, include_entry=True, timeout=0
        )
        await sb.files.write("/home/user/w/a.txt", "a")
        await sb.files.make_dir("/home/user/w/sub")
        await asyncio.sleep(0.2)  # the new directory is watched once its create event is seen
        await sb.files.write("/home/user/w/sub/b.txt", "b")
        await sb.commands.run("echo more >> /home/user/w/sub/b.txt && chmod 600 /home/user/w/a.txt")
        await sb.files.rename("/home/user/w/a.txt", "/home/user/w/c.txt")
        await sb.files.remove("/home/user/w/sub/b.txt")

        def seen(name: str, kind: FilesystemEventType) -> bool:
            return any(e.name == name and e.type == kind for e in events)

        await eventually(lambda: seen("sub/b.txt", FilesystemEventType.REMOVE), what="the remove event")
        for name, kind in [
            ("a.txt", FilesystemEventType.CREATE),
            ("sub", FilesystemEventType.CREATE),
            ("sub/b.txt", FilesystemEventType.CREATE),
            ("sub/b.txt", FilesystemEventType.WRITE),
            ("a.txt", FilesystemEventType.CHMOD),
            ("a.txt", FilesystemEventType.RENAME),
            ("c.txt", FilesystemEventType.CREATE),
        ]:
            assert seen(name, kind), (name, kind, events)
        created = next(e for e in events if e.name == "sub" and e.type == FilesystemEventType.CREATE)
        assert created.entry is not None and created.entry.type == FileType.DIR
        assert created.entry.path == "/home/user/w/sub"
        written = next(e for e in events if e.name == "sub/b.txt" and e.type == FilesystemEventType.WRITE)
        assert written.entry is not None and written.entry.type == FileType.FILE
        removed = next(e for e in events if e.type == FilesystemEventType.REMOVE)
        assert removed.entry is None  # gone: nothing to describe
        await handle.stop()
        assert exits == [None]


async def test_watch_dir_sync_polls_and_is_not_recursive_by_default(sdk):
    def scenario() -> tuple[list, list, str]:
        sb = sync_sandbox(sdk)
        try:
            sb.files.make_dir("/home/user/p/deep")
            watcher = sb.files.watch_dir("/home/user/p", include_entry=True)
            sb.files.write("/home/user/p/top.txt", "x")
            sb.files.write("/home/user/p/deep/hidden.txt", "x")
            events: list = []
            deadline = time.monotonic() + 10
            while not any(e.name == "top.txt" for e in events) and time.monotonic() < deadline:
                events += watcher.get_new_events()
                time.sleep(0.1)
            time.sleep(0.3)
            events += watcher.get_new_events()
            again = watcher.get_new_events()  # fetched events are gone
            # Another sandbox's client cannot read this sandbox's watcher, even knowing its id.
            other = sync_sandbox(sdk)
            try:
                files = other.files
                foreign = WatchHandle(files._rpc, watcher._watcher_id, files._connection_config, files._envd_version)
                with pytest.raises(NotFoundException):
                    foreign.get_new_events()
            finally:
                other.kill()
            watcher.stop()
            try:
                watcher.get_new_events()
                stopped = ""
            except SandboxException as exc:
                stopped = str(exc)
            return events, again, stopped
        finally:
            sb.kill()

    events, again, stopped = await in_thread(scenario)
    top = [e for e in events if e.name == "top.txt"]
    assert top and top[0].type == FilesystemEventType.CREATE
    assert top[0].entry is not None and top[0].entry.path == "/home/user/p/top.txt"
    assert not any("hidden" in e.name for e in events)
    assert again == [] and "already stopped" in stopped


async def test_watch_of_a_missing_path_or_a_file_fails_as_envd_does(sdk):
    async with sandbox(sdk) as sb:
        await sb.files.write("/home/user/file.txt", "x")
        with pytest.raises(SandboxException, match="not found"):
            await sb.files.watch_dir("/home/user/nope", lambda e: None)
        with pytest.raises(SandboxException, match="not a directory"):
            await sb.files.watch_dir("/home/user/file.txt", lambda e: None)


# ------------------------------------------------------------------------------------ files
async def test_file_metadata_and_user_e2b_xattrs(sdk):
    async with sandbox(sdk) as sb:
        info = await sb.files.write("/home/user/m.txt", "m", metadata={"Author": "ada", "purpose": "test"})
        assert info.metadata == {"author": "ada", "purpose": "test"}
        assert (await sb.files.get_info("/home/user/m.txt")).metadata == {"author": "ada", "purpose": "test"}
        # Set out of band: user.e2b.* xattrs are surfaced, other user.* ones are not.
        await sb.commands.run(
            "python3 -c \"import os; os.setxattr('/home/user/m.txt', 'user.e2b.origin', b'cmd');"
            " os.setxattr('/home/user/m.txt', 'user.other', b'no')\""
        )
        listed = {e.name: e for e in await sb.files.list("/home/user")}
        assert listed["m.txt"].metadata == {"author": "ada", "purpose": "test", "origin": "cmd"}
        plain = await sb.files.write("/home/user/plain.txt", "p")
        assert plain.metadata is None and (await sb.files.get_info("/home/user/plain.txt")).metadata is None

    def scenario() -> dict | None:
        sb = sync_sandbox(sdk)
        try:
            sb.files.write_files(
                [{"path": "/tmp/s1", "data": "1"}, {"path": "/tmp/s2", "data": "2"}], metadata={"k": "v"}
            )
            return sb.files.get_info("/tmp/s2").metadata
        finally:
            sb.kill()

    assert await in_thread(scenario) == {"k": "v"}


async def test_remove_of_a_missing_path_is_not_an_error(sdk):
    async with sandbox(sdk) as sb:
        await sb.files.remove("/home/user/never-existed")
        await sb.files.remove("/home/user/no/such/dir/file")

    def scenario() -> None:
        sb = sync_sandbox(sdk)
        try:
            sb.files.remove("/tmp/never-existed")
        finally:
            sb.kill()

    await in_thread(scenario)


async def test_symlink_info_has_the_targets_type_and_the_target(sdk):
    async with sandbox(sdk) as sb:
        await sb.files.write("/home/user/target.txt", "t")
        await sb.files.make_dir("/home/user/tdir")
        await sb.commands.run(
            "cd /home/user && ln -s target.txt flink && ln -s tdir dlink && ln -s missing dangling"
            " && chmod 600 target.txt"
        )
        flink = await sb.files.get_info("/home/user/flink")
        assert flink.type == FileType.FILE and flink.symlink_target == "/home/user/target.txt"
        assert flink.mode == 0o600 and flink.permissions.startswith("L")
        dlink = await sb.files.get_info("/home/user/dlink")
        assert dlink.type == FileType.DIR and dlink.symlink_target == "/home/user/tdir"
        plain = await sb.files.get_info("/home/user/target.txt")
        assert plain.type == FileType.FILE and plain.symlink_target is None
        listed = {e.name: e for e in await sb.files.list("/home/user")}
        assert listed["flink"].type == FileType.FILE and listed["dlink"].type == FileType.DIR
        assert "dangling" not in listed  # no type to report: skipped by the SDK, as for E2B

    def scenario():
        sb = sync_sandbox(sdk)
        try:
            sb.commands.run("ln -s /tmp /home/user/tmplink")
            return sb.files.get_info("/home/user/tmplink")
        finally:
            sb.kill()

    info = await in_thread(scenario)
    assert info.type == FileType.DIR and info.symlink_target == "/tmp"


async def test_signed_urls_work_with_an_explicit_sandbox_url(sdk, host: RunningHost):
    async with sandbox(sdk) as sb:
        assert sb.envd_direct_url.rstrip("/") == host.url  # nothing in the URL names the sandbox
        await sb.files.write("/home/user/dl.txt", "download me")
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(sb.download_url("/home/user/dl.txt", use_signature_expiration=60))
            assert response.status_code == 200 and response.text == "download me"
            response = await client.get(sb.download_url("/home/user/dl.txt"))  # no expiration
            assert response.status_code == 200
            upload = sb.upload_url("/home/user/up.txt", use_signature_expiration=60)
            response = await client.post(upload, files={"file": ("up.txt", b"uploaded")})
            assert response.status_code == 200, response.text
            assert await sb.files.read("/home/user/up.txt") == "uploaded"

            expired = sb.download_url("/home/user/dl.txt", use_signature_expiration=-5)
            response = await client.get(expired)
            assert response.status_code == 401 and response.json()["message"] == "signature is already expired"
            # A read signature does not upload, a forged one matches no sandbox.
            response = await client.post(sb.download_url("/home/user/x", use_signature_expiration=60), content=b"x")
            assert response.status_code == 401
            forged = sb.download_url("/home/user/dl.txt").replace("signature=v1_", "signature=v1_A")
            assert (await client.get(forged)).status_code == 401


# ------------------------------------------------------------------------------------ commands
async def test_a_killed_command_ends_as_envd_ends_it(sdk):
    async with sandbox(sdk) as sb:
        handle = await sb.commands.run("echo started; sleep 30", background=True)
        await eventually(lambda: handle.stdout == "started\n", what="the command's output")
        attached = await sb.commands.connect(handle.pid)  # a second stream of the running command
        assert await handle.kill() is True
        with pytest.raises(CommandExitException) as killed:
            await handle.wait()
        assert killed.value.exit_code == -1 and killed.value.error == "signal: killed"
        assert killed.value.stdout == "started\n"
        with pytest.raises(CommandExitException) as seen_by_the_other:
            await attached.wait()
        assert seen_by_the_other.value.exit_code == -1
        assert await sb.commands.kill(handle.pid) is False  # gone
        with pytest.raises(CommandExitException) as failed:
            await sb.commands.run("exit 3")
        assert failed.value.exit_code == 3 and failed.value.error == "exit status 3"

    def scenario() -> tuple[int, str | None]:
        sb = sync_sandbox(sdk)
        try:
            handle = sb.commands.run("sleep 30", background=True)
            sb.commands.kill(handle.pid)
            try:
                handle.wait()
            except CommandExitException as exc:
                return exc.exit_code, exc.error
            return 0, None
        finally:
            sb.kill()

    assert await in_thread(scenario) == (-1, "signal: killed")


async def test_a_command_whose_sandbox_is_killed_ends_with_end_of_life(sdk):
    sb = await AsyncSandbox.create(**sdk)
    handle = await sb.commands.run("sleep 60", background=True, timeout=0)
    await AsyncSandbox.kill(sb.sandbox_id, **sdk)
    with pytest.raises(SandboxNotRunningException, match="end of life"):
        await handle.wait()

    def scenario() -> str:
        sync = sync_sandbox(sdk)
        handle = sync.commands.run("sleep 60", background=True, timeout=0)
        Sandbox.kill(sync.sandbox_id, **sdk)
        try:
            handle.wait()
        except SandboxNotRunningException as exc:
            return str(exc)
        return "no exception"

    assert "end of life" in await in_thread(scenario)


# ------------------------------------------------------------------------------------ cloud only
async def test_cloud_only_features_answer_501_naming_the_feature(sdk, host: RunningHost):
    cases = {
        ("GET", "/templates"): "template builds",
        ("POST", "/v3/templates"): "template builds",
        ("GET", "/v2/templates/t1/builds/b1"): "template builds",
        ("GET", "/volumes"): "volumes",
        ("POST", "/volumes"): "volumes",
        ("GET", "/secrets"): "secrets",
        ("GET", "/sandboxes/metrics"): "sandbox metrics",
        ("GET", "/sandboxes/some-id/metrics"): "sandbox metrics",
        ("GET", "/v2/sandboxes/some-id/logs"): "sandbox logs",
        ("GET", "/sandboxes/some-id/logs"): "sandbox logs",
    }
    async with httpx.AsyncClient(base_url=host.url, headers={"X-API-Key": host.api_key}) as client:
        for (method, path), feature in cases.items():
            response = await client.request(method, path, json={})
            assert response.status_code == 501, (path, response.text)
            assert feature in response.json()["message"], (path, response.text)
        assert (await httpx.AsyncClient(base_url=host.url).get("/volumes")).status_code == 401  # key first
    async with sandbox(sdk) as sb:
        with pytest.raises(SandboxException, match="sandbox metrics"):
            await sb.get_metrics()


# ------------------------------------------------------------------------------------ rootless mode
async def test_pty_watch_and_metadata_in_rootless_mode(tmp_path):
    """The same behaviour where sandboxes have no uid of their own (an unprivileged host)."""
    run_as = unused_uid() if os.geteuid() == 0 else None
    async with running_host(tmp_path, run_as=run_as) as host:
        assert (await host.health())["mode"] == ROOTLESS
        async with sandbox(host.sdk_options()) as sb:
            output = bytearray()
            pty = await sb.pty.create(PtySize(rows=12, cols=34), on_data=output.extend, timeout=0)
            await sb.pty.send_stdin(pty.pid, b"stty size; id -u\n")
            await eventually(lambda: b"12 34" in output and b"1000" in output, what="rootless PTY output")
            events = []
            watch = await sb.files.watch_dir("/home/user", events.append, include_entry=True, timeout=0)
            info = await sb.files.write("/home/user/r.txt", "r", metadata={"mode": "rootless"})
            assert info.metadata == {"mode": "rootless"}
            await eventually(lambda: any(e.name == "r.txt" for e in events), what="a rootless watch event")
            await watch.stop()
            assert (await sb.files.get_info("/home/user/r.txt")).metadata == {"mode": "rootless"}
            assert await sb.pty.kill(pty.pid) is True
