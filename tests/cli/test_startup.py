"""`genloop up` as a new user meets it: each expected start-up failure is one line naming the cause
and the fix (no traceback, non-zero exit); a good start prints a short banner and the build's
progress with no library INFO chatter, uses the bubblewrap wheel when no system bwrap is on PATH,
and says on stop what it stopped and what it left running."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_host.testing import free_port
from tests.cli.test_cli import GENLOOP, REPO

# The one line of an expected failure: "genloop: <cause>: <fix>".
LIBRARY_INFO = re.compile(r"^\S+ \S+ INFO (?!genloop)", re.MULTILINE)


@pytest.fixture
def env(stack_env):
    return stack_env


def up(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*GENLOOP, "up", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    failure = [line for line in result.stderr.splitlines() if line.startswith("genloop: ")]
    assert len(failure) == 1, result.stderr
    for needle in needles:
        assert needle in failure[0], failure[0]


def test_port_in_use(env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(env["GENLOOP_API_PORT"])))
        busy.listen()
        result = up(env)
    assert_one_line(result, f"port {env['GENLOOP_API_PORT']}", "already in use", "GENLOOP_API_PORT")


def test_database_unreachable(env):
    env["GENLOOP_DATABASE_URL"] = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/nothing"
    assert_one_line(up(env), "cannot reach the database", "GENLOOP_DATABASE_URL")


def test_temporal_unreachable(env):
    env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{free_port()}"
    assert_one_line(up(env), "cannot reach Temporal", "TEMPORAL_ADDRESS")


@pytest.mark.parametrize(("variable", "value", "needle"), [
    ("GENLOOP_API_PORT", "not-a-port", "api.port"),
    ("GENLOOP_RUNNER_KIND", "gpt", "runner.kind"),
    ("GENLOOP_SANDBOX_HOST_MEMORY_LIMIT_MB", "1", "sandbox_host.memory_limit_mb"),
])
def test_bad_config_value(env, variable, value, needle):
    env[variable] = value
    result = up(env)
    assert_one_line(result, "configuration error", needle)
    assert result.returncode == 2


def test_sandbox_host_that_cannot_start_says_why(env):
    env["GENLOOP_SANDBOX_HOST_STATE_DIR"] = "/proc/genloop-cannot-be-here"
    assert_one_line(up(env), "the sandbox host stopped at start")


def test_quiet_build_with_the_wheel_bwrap_then_a_stop_report(env):
    """The README's first command, minus the install: no system bwrap on PATH, a build to READY, a
    banner, no INFO line from a library, and on exit what was stopped and what was left running."""
    bin_dir = Path(env["GENLOOP_DATA_DIR"]) / "bin"  # PATH: what the stack needs, but no bwrap
    bin_dir.mkdir()
    for tool in ("prlimit", "kill", "git", "env", "sh", "bash"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env["PATH"] = f"{Path(sys.executable).parent}:{bin_dir}"
    result = up(env, "--build", "a todo list for cats", "--exit-after-build")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    banner = result.stdout
    for label in ("API:", "Web UI:", "Sandboxes:", "Data:"):
        assert label in banner, banner
    assert "Preview:" in banner and "build_v0_1" in banner
    assert not LIBRARY_INFO.search(output), LIBRARY_INFO.findall(output)
    assert "Stopped: API, worker, sandbox host, Temporal dev server." in banner
    assert "Left running: 1 sandbox" in banner and "genloop sweep --all" in banner
    assert not shutil.which("bwrap", path=env["PATH"])  # so the sandboxes ran on the wheel's bwrap
    # The full log, libraries included, is kept in the data dir.
    assert (Path(env["GENLOOP_DATA_DIR"]) / "logs" / "genloop-up.log").read_text().count(" INFO ") > 3
