"""The `genloop` CLI as a user runs it: real subprocesses against a real stack."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from e2b import AsyncSandbox

from genloop.http import preview_client
from genloop.settings import load_settings
from tests.workflows.conftest import make_stack

GENLOOP = [sys.executable, "-m", "genloop.cli"]
REPO = Path(__file__).resolve().parents[2]


def _genloop(env, *args, timeout=180, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*GENLOOP, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


class RunningUp:
    def __init__(self, env):
        self.env = env
        self.proc = subprocess.Popen([*GENLOOP, "up"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if "Press Ctrl-C" in line:
                self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
                return
        self.proc.kill()
        raise AssertionError("genloop up did not come up:\n" + "".join(self.output))

    def stop(self) -> list[psutil.Process]:
        """SIGINT like Ctrl-C; returns the descendants still alive afterwards."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=60) == 0, "".join(self.output) + self.proc.stdout.read()
        # Children are recorded at start-up plus whatever they spawned since.
        return [p for p in self.descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _no_stack_process_survives(survivors: list[psutil.Process]) -> None:
    # Sandboxes outlive the stack by design (re-adopted on the next start); they run as
    # unprivileged uids. Nothing of the stack itself (root: server, host, worker, API) may remain.
    assert [p.cmdline() for p in survivors if p.uids().real == 0] == []


async def test_up_build_status_list_and_clean_stop(stack_env):
    up = RunningUp(stack_env)
    try:
        out = "".join(up.output)
        assert "API:" in out and "Web UI:" in out

        built = _genloop(stack_env, "build", "a kanban board for otters", "--project", "cli-proj", "--wait")
        assert built.returncode == 0, built.stdout + built.stderr
        preview = re.search(r"Preview:\s+(\S+)", built.stdout).group(1)
        assert preview == f"http://v1--cli-proj.localhost:{stack_env['GENLOOP_API_PORT']}", preview  # the version's URL
        assert re.search(r"Web UI:\s+http://127\.0\.0\.1:\d+/namespaces/default/workflows/", built.stdout)
        for label in ("Writing code...", "Installing dependencies...", "Checking the app..."):
            assert label in built.stdout
        build_id = re.search(r"build (\S+) started", built.stdout).group(1)
        async with preview_client(timeout=10) as http:
            assert "a kanban board for otters" in (await http.get(preview)).text

        status = _genloop(stack_env, "status", build_id)
        assert status.returncode == 0 and '"stage": "ready"' in status.stdout
        listed = _genloop(stack_env, "list", "--project", "cli-proj")
        assert build_id in listed.stdout and "build_v0_1" in listed.stdout
        missing = _genloop(stack_env, "status", "no-such-build")
        assert missing.returncode == 1 and "404" in missing.stderr
        too_late = _genloop(stack_env, "cancel", build_id)
        assert too_late.returncode == 1 and "409" in too_late.stderr  # a ready build can't be cancelled
    finally:
        survivors = up.stop()
    _no_stack_process_survives(survivors)

    # Started again on the same data dir: the file-backed server, the database and the
    # re-adopted sandbox are all still there.
    up = RunningUp(stack_env)
    try:
        async with preview_client(timeout=10) as http:
            assert "a kanban board for otters" in (await http.get(preview)).text
        again = _genloop(stack_env, "build", "second", "--project", "cli-proj", "--wait")
        assert again.returncode == 0 and "build_v0_2" in again.stdout
        host = f"http://127.0.0.1:{stack_env['GENLOOP_SANDBOX_HOST_PORT']}"
        # The key the host generated into the data dir, found the way the worker finds it.
        opts = dict(api_key=load_settings(environ=stack_env).sandbox_api_key, api_url=host, sandbox_url=host)
        # v1's sandbox killed behind genloop's back: its URL serves it again from the stored files.
        paginator = AsyncSandbox.list(**opts)
        while paginator.has_next:
            for info in await paginator.next_items():
                if info.metadata.get("genloop_build_id") == build_id:
                    await AsyncSandbox.kill(info.sandbox_id, **opts)
        async with preview_client(timeout=60) as http:
            assert "a kanban board for otters" in (await http.get(preview)).text
        versions = _genloop(stack_env, "versions", "cli-proj")
        assert versions.returncode == 0 and "build_v0_1" in versions.stdout and "live" in versions.stdout
        paginator = AsyncSandbox.list(**opts)
        while paginator.has_next:
            for info in await paginator.next_items():
                await AsyncSandbox.kill(info.sandbox_id, **opts)
    finally:
        survivors = up.stop()
    assert survivors == []


def test_build_without_stack_fails_clearly(stack_env):
    result = _genloop(stack_env, "build", "x", "--project", "p")
    assert result.returncode == 1
    assert "cannot reach the genloop API" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_is_a_usage_error(stack_env):
    result = _genloop({**stack_env, "GENLOOP_API_PORT": "not-a-port"}, "list", "--project", "p")
    assert result.returncode == 2
    assert "api.port" in result.stderr and "Traceback" not in result.stderr


def test_replay_passes_on_recorded_history_and_fails_on_changed_workflow(tmp_path):
    history = REPO / "tests" / "histories" / "build_ready.json"
    ok = _genloop(dict(os.environ), "replay", str(history))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "replay OK" in ok.stdout

    # A deliberately changed workflow (SCAFFOLD's write skipped on the path this history took, the
    # one before ONE_START_WRITE_PATCH) shadows the real package.
    changed = tmp_path / "workflows"
    shutil.copytree(REPO / "workflows", changed)
    source = (changed / "build.py").read_text()
    edited = source.replace('            await self._enter(Stage.SCAFFOLD)\n', '            pass\n')
    assert edited != source
    (changed / "build.py").write_text(edited)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    bad = _genloop(env, "replay", str(history), cwd=tmp_path)  # `-m` puts the cwd first on sys.path
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "replay FAILED" in bad.stdout and "nondetermin" in bad.stdout.lower()


async def test_debug_finds_failed_build(temporal_client, sandbox_host, repo, migrated_db_url):
    from temporalio.client import WorkflowFailureError

    async with make_stack(temporal_client, sandbox_host, repo) as stack:
        handle = await stack.start(runner="crashing")
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
    debug_id = info.value.cause.details[0]["debug_id"]
    env = dict(os.environ, GENLOOP_DATABASE_URL=migrated_db_url)
    result = _genloop(env, "debug", debug_id)
    assert result.returncode == 0, result.stderr
    assert handle.id in result.stdout
    assert "model returned malformed output" in result.stdout  # the internal detail, for support
    assert f"temporal workflow show -w {handle.id}" in result.stdout
    unknown = _genloop(env, "debug", "00000000-0000-0000-0000-000000000000")
    assert unknown.returncode == 1 and "no build has debug_id" in unknown.stderr
