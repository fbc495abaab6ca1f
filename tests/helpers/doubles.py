"""Named test doubles: Runner doubles (stand-ins for the LLM) and fault-injection sandbox clients.
Everything else in the tests is real: Temporal dev server, databases, sandbox host, HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import zipfile
from dataclasses import replace

import e2b

from activities.runners import Capability, RunnerResult, RunnerTask, TemplateRunner
from activities.sandbox import SandboxClient
from genloop.errors import ErrorKind, GenloopError


class RateLimitedRunnerDouble:
    """Raises the LLM's rate-limit error `failures` times, then behaves like the template runner."""

    capabilities = frozenset({Capability.NEW_APP})

    def __init__(self, failures: int = 1) -> None:
        self.failures = failures
        self.calls = 0

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        self.calls += 1
        if self.calls <= self.failures:
            raise GenloopError(ErrorKind.RATE_LIMITED, "429 from the model provider (test double)")
        return await TemplateRunner().run(task, progress)


class CrashingRunnerDouble:
    """A runner bug: an unexpected exception, which is permanent for the build."""

    capabilities = frozenset({Capability.NEW_APP})

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        self.calls += 1
        raise RuntimeError("model returned malformed output (test double)")


class BrokenAppRunnerDouble:
    """A partial build: the files are valid but the app crashes at start-up."""

    capabilities = frozenset({Capability.NEW_APP})

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(task, progress)
        result.files["app.py"] = "import sys\nprint('boom: missing DATABASE_URL', file=sys.stderr)\nsys.exit(3)\n"
        return result


class TraversalRunnerDouble:
    """Emits a path that escapes the workspace."""

    capabilities = frozenset({Capability.NEW_APP})

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(task, progress)
        result.files["../../etc/evil"] = "pwned"
        return result


class SlowRunnerDouble:
    """Takes `seconds` to write code, so a cancel lands during CODE."""

    capabilities = frozenset({Capability.NEW_APP})

    def __init__(self, seconds: float = 60) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()
        self.cancelled = False

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        self.started.set()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return await TemplateRunner().run(task, progress)


class SlowStartRunnerDouble:
    """An app that takes `seconds` before it binds its port, so a cancel lands during CHECKS."""

    capabilities = frozenset({Capability.NEW_APP})

    def __init__(self, seconds: int = 60) -> None:
        self.seconds = seconds

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(task, progress)
        result.files["app.py"] = f"import time\ntime.sleep({self.seconds})\n" + result.files["app.py"]
        return result


def wheel_bytes(name: str, version: str, module_source: str) -> bytes:
    """A minimal pure-Python wheel, built in memory, so DEPS installs a real package offline."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module_source.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: genloop-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return buf.getvalue()


class DependencyRunnerDouble:
    """The template app plus a declared dependency (a local wheel) that the app imports at start."""

    capabilities = frozenset({Capability.NEW_APP})

    PACKAGE = "genloop_demo_dep"

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(task, progress)
        wheel_name = f"wheels/{self.PACKAGE}-1.0-py3-none-any.whl"
        result.files[wheel_name] = wheel_bytes(self.PACKAGE, "1.0", "GREETING = 'dependency installed'\n")
        result.files["requirements.txt"] = f"./{wheel_name}\n"
        result.files["app.py"] = f"import {self.PACKAGE}\n" + result.files["app.py"]
        return result


class NodeDependencyRunnerDouble:
    """The node template app plus one small dependency from the npm registry, required at start:
    DEPS must install it (`npm install`, through the sandbox's egress proxy)."""

    capabilities = frozenset({Capability.NEW_APP})

    PACKAGE, VERSION = "is-number", "7.0.0"  # no dependencies of its own, a few KB

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(replace(task, stack="node"), progress)
        package = json.loads(result.files["package.json"])
        package["dependencies"] = {self.PACKAGE: self.VERSION}
        result.files["package.json"] = json.dumps(package, indent=2) + "\n"
        server = str(result.files["server.js"])
        result.files["server.js"] = server.replace(
            'const http = require("http");',
            f'const http = require("http");\nconst isNumber = require("{self.PACKAGE}");\nisNumber(42);',
        )
        return result


class CreateLostResponseSandboxClient(SandboxClient):
    """Fault injection: the first create really happens on the host, then the answer is 'lost'
    (the SDK's TimeoutException), as with a network cut after the host acted."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.create_calls = 0

    async def create(self, build_id: str, project_id: str, *, serve: int = 0):
        self.create_calls += 1
        sandbox = await super().create(build_id, project_id)
        if self.create_calls == 1:
            raise e2b.TimeoutException("injected: response lost after the sandbox was created")
        return sandbox


# --- doubles for the fault-injection suite (tests/reliability) --------------------------------------
# These hold a build in one stage until the fault lands. Each is slow (or gated) on its FIRST attempt
# only, so the attempt retried after the fault goes straight through.


def _activity_attempt() -> int:
    from temporalio import activity

    try:
        return activity.info().attempt
    except RuntimeError:  # not inside an activity
        return 1


class GatedRunnerDouble:
    """CODE waits until the file `gate_dir/<build id>` exists (the test opens the gate) on its first
    attempt; a retried attempt (after a worker crash, a DB outage...) does not wait. A new app is the
    template app; a change writes `<change text>.txt` (so a test can see which changes a version has)."""

    capabilities = frozenset({Capability.NEW_APP, Capability.CHANGE})

    def __init__(self, gate_dir: str) -> None:
        self.gate_dir = gate_dir

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        from pathlib import Path

        from temporalio import activity

        gate = Path(self.gate_dir) / activity.info().workflow_id
        while _activity_attempt() == 1 and not gate.exists():
            await asyncio.sleep(0.1)
        if task.kind is Capability.CHANGE:
            return RunnerResult(files={f"{task.change}.txt": f"{task.change}\n"}, summary=f"added {task.change}.txt")
        return await TemplateRunner().run(task, progress)


# A PEP 517 in-tree build backend: building the wheel sleeps on the first build in this sandbox, so
# `pip install -r requirements.txt` holds the build in DEPS (fully offline: no build requirements).
_SLOW_BACKEND = """\
import base64, hashlib, os, time, zipfile

NAME, VERSION = "genloop_slow_dep", "1.0"
MARKER = "/tmp/.genloop-slow-dep-built-once"


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    if not os.path.exists(MARKER):
        open(MARKER, "w").close()
        time.sleep({seconds})
    dist = f"{{NAME}}-{{VERSION}}.dist-info"
    files = {{
        f"{{NAME}}/__init__.py": b"GREETING = 'slow dependency installed'\\n",
        f"{{dist}}/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n".encode(),
        f"{{dist}}/WHEEL": (
            b"Wheel-Version: 1.0\\nGenerator: genloop-tests\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
        ),
    }}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{{path}},sha256={{digest}},{{len(data)}}")
    record.append(f"{{dist}}/RECORD,,")
    files[f"{{dist}}/RECORD"] = ("\\n".join(record) + "\\n").encode()
    name = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return name
"""


class SlowInstallRunnerDouble:
    """The template app plus a local dependency whose build takes `seconds` the first time it is built
    in a sandbox, so a fault lands during DEPS (`pip install`); the app imports it at start-up."""

    capabilities = frozenset({Capability.NEW_APP})

    PACKAGE = "genloop_slow_dep"
    MARKER = "/tmp/.genloop-slow-dep-built-once"  # exists once the slow build has begun

    def __init__(self, seconds: int = 600) -> None:
        self.seconds = seconds

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(task, progress)
        result.files["slowdep/pyproject.toml"] = (
            '[build-system]\nrequires = []\nbuild-backend = "slow_backend"\nbackend-path = ["."]\n\n'
            f'[project]\nname = "{self.PACKAGE}"\nversion = "1.0"\n'
        )
        result.files["slowdep/slow_backend.py"] = _SLOW_BACKEND.format(seconds=self.seconds)
        result.files["requirements.txt"] = "./slowdep\n"
        result.files["app.py"] = f"import {self.PACKAGE}\n" + result.files["app.py"]
        return result


class LateBindingAppRunnerDouble:
    """An app that sleeps `seconds` before binding its port the first time it is launched in a
    sandbox (later launches bind at once), so a fault lands during CHECKS."""

    capabilities = frozenset({Capability.NEW_APP})

    MARKER = "/tmp/.genloop-app-launched-once"  # exists once the app's first launch has begun

    def __init__(self, seconds: int = 600) -> None:
        self.seconds = seconds

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(task, progress)
        prelude = (
            "import os, time\n"
            "if not os.path.exists('/tmp/.genloop-app-launched-once'):\n"
            "    open('/tmp/.genloop-app-launched-once', 'w').close()\n"
            f"    time.sleep({self.seconds})\n"
        )
        result.files["app.py"] = prelude + result.files["app.py"]
        return result


# --- doubles for build logs: apps that print ---------------------------------------------------------

LOG_SECRET = "hunter2-do-not-log"  # what LoggingAppRunnerDouble's app prints as a password


class LoggingAppRunnerDouble:
    """The template app with a local dependency (so DEPS has pip output) that prints as it starts: a
    startup line, a line with a password in it, then `lines` numbered lines; with `ticks`, a line
    every 0.2 s for as long as it runs (output after READY)."""

    capabilities = frozenset({Capability.NEW_APP})

    PACKAGE = "genloop_demo_dep"
    STARTUP = "genloop-test app: starting up"

    def __init__(self, lines: int = 0, *, ticks: bool = False, dependency: bool = True) -> None:
        self.lines = lines
        self.ticks = ticks
        self.dependency = dependency

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(task, progress)
        prelude = [
            "import sys, threading, time",
            f"print({self.STARTUP!r}, flush=True)",
            f"print('connecting with DB_PASSWORD={LOG_SECRET}', file=sys.stderr, flush=True)",
            f"for n in range({self.lines}):",
            "    print(f'line {n:06d} of the app output, padded to look like a real log line', flush=False)",
            "sys.stdout.flush()",
            # Before it binds: its output and the first /health probe travel different paths, and
            # what arrives after READY is only followed, not stored (activities.build DRAIN_*).
            f"time.sleep({0.5 if self.lines else 0})",
        ]
        if self.ticks:
            prelude += [
                "def _tick():",
                "    n = 0",
                "    while True:",
                "        n += 1; print(f'tick {n}', flush=True); time.sleep(0.2)",
                "threading.Thread(target=_tick, daemon=True).start()",
            ]
        if self.dependency:
            wheel_name = f"wheels/{self.PACKAGE}-1.0-py3-none-any.whl"
            result.files[wheel_name] = wheel_bytes(self.PACKAGE, "1.0", "GREETING = 'dependency installed'\n")
            result.files["requirements.txt"] = f"./{wheel_name}\n"
            prelude.insert(0, f"import {self.PACKAGE}")
        result.files["app.py"] = "\n".join(prelude) + "\n" + str(result.files["app.py"])
        return result


class CrashingAppRunnerDouble:
    """An app that raises at start-up (a traceback on stderr), and a FIX that does not help: the
    build uses its fix attempts and fails."""

    capabilities = frozenset({Capability.NEW_APP, Capability.FIX})

    ERROR = "RuntimeError: the app cannot find its config (test double)"

    async def run(self, task: RunnerTask, progress) -> RunnerResult:
        result = await TemplateRunner().run(replace(task, kind=Capability.NEW_APP), progress)
        result.files["app.py"] = (
            "def load_config():\n"
            "    raise RuntimeError('the app cannot find its config (test double)')\n"
            "load_config()\n"
        )
        result.summary = "tried again (test double)" if task.kind is Capability.FIX else "a crashing app (test double)"
        return result
