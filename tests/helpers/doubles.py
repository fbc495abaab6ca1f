"""Named test doubles: Runner doubles (stand-ins for the LLM) and fault-injection sandbox clients.
Everything else in the tests is real: Temporal dev server, databases, sandbox host, HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import zipfile

import e2b

from activities.runner import TemplateRunner, working_file
from activities.sandbox import SandboxClient
from genloop.errors import ErrorKind, GenloopError


class RateLimitedRunnerDouble:
    """Raises the LLM's rate-limit error `failures` times, then behaves like the template runner."""

    def __init__(self, failures: int = 1) -> None:
        self.failures = failures
        self.calls = 0

    async def run(self, state):
        self.calls += 1
        if self.calls <= self.failures:
            raise GenloopError(ErrorKind.RATE_LIMITED, "429 from the model provider (test double)")
        return await TemplateRunner().run(state)


class CrashingRunnerDouble:
    """A runner bug: an unexpected exception, which is permanent for the build."""

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, state):
        self.calls += 1
        raise RuntimeError("model returned malformed output (test double)")


class BrokenAppRunnerDouble:
    """A partial build: the files are valid but the app crashes at start-up."""

    async def run(self, state):
        state = await TemplateRunner().run(state)
        state["working_files"]["app.py"] = working_file(
            "app.py", "import sys\nprint('boom: missing DATABASE_URL', file=sys.stderr)\nsys.exit(3)\n"
        )
        return state


class TraversalRunnerDouble:
    """Emits a path that escapes the workspace."""

    async def run(self, state):
        state = await TemplateRunner().run(state)
        state["working_files"]["../../etc/evil"] = working_file("../../etc/evil", "pwned")
        return state


class SlowRunnerDouble:
    """Takes `seconds` to write code, so a cancel lands during CODE."""

    def __init__(self, seconds: float = 60) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()
        self.cancelled = False

    async def run(self, state):
        self.started.set()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return await TemplateRunner().run(state)


class SlowStartRunnerDouble:
    """An app that takes `seconds` before it binds its port, so a cancel lands during CHECKS."""

    def __init__(self, seconds: int = 60) -> None:
        self.seconds = seconds

    async def run(self, state):
        state = await TemplateRunner().run(state)
        app = state["working_files"]["app.py"]["new_content"]
        state["working_files"]["app.py"] = working_file("app.py", f"import time\ntime.sleep({self.seconds})\n" + app)
        return state


def _wheel(name: str, version: str, module_source: str) -> bytes:
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

    PACKAGE = "genloop_demo_dep"

    async def run(self, state):
        state = await TemplateRunner().run(state)
        wheel_name = f"wheels/{self.PACKAGE}-1.0-py3-none-any.whl"
        wf = state["working_files"]
        wf[wheel_name] = {"path": wheel_name, "original_content": None, "change_type": "create",
                          "new_content": _wheel(self.PACKAGE, "1.0", "GREETING = 'dependency installed'\n")}
        wf["requirements.txt"] = working_file("requirements.txt", f"./{wheel_name}\n")
        app = wf["app.py"]["new_content"]
        wf["app.py"] = working_file("app.py", f"import {self.PACKAGE}\n" + app)
        return state


class CreateLostResponseSandboxClient(SandboxClient):
    """Fault injection: the first create really happens on the host, then the answer is 'lost'
    (the SDK's TimeoutException), as with a network cut after the host acted."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.create_calls = 0

    async def create(self, build_id: str, project_id: str):
        self.create_calls += 1
        sandbox = await super().create(build_id, project_id)
        if self.create_calls == 1:
            raise e2b.TimeoutException("injected: response lost after the sandbox was created")
        return sandbox
