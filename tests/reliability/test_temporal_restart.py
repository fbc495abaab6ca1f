"""Temporal dev server restart mid-build: a file-backed dev server of the test's own (the command
`genloop up` runs: genloop.cli.stack.dev_server_command) is SIGKILLed while a build is in CODE and
started again on the same database file. The in-flight build completes; a build started after the
restart completes too."""

from __future__ import annotations

import sys

import pytest
from temporalio.client import Client

from genloop.cli.stack import dev_server_command, port_open
from genloop.settings import load_settings
from sandbox_host.testing import free_port
from tests.reliability.harness import ServiceProcess, Stack, assert_recovered_ready, wait_until

pytestmark = pytest.mark.reliability


@pytest.fixture
async def dev_server(tmp_path):
    port, ui_port = free_port(), free_port()
    settings = load_settings(environ={
        "GENLOOP_DATA_DIR": str(tmp_path / "temporal"),
        "GENLOOP_TEMPORAL_PORT": str(port),
        "GENLOOP_TEMPORAL_UI_PORT": str(ui_port),
        "GENLOOP_TEMPORAL_DB_FILE": str(tmp_path / "temporal.db"),
    })
    server = ServiceProcess("temporal", dev_server_command(settings), {}, tmp_path / "temporal.log")

    async def start() -> None:
        await server.spawn()
        await wait_until(lambda: server.alive and port_open("127.0.0.1", port), "the dev server to listen", timeout=60)

    server.start = start  # type: ignore[attr-defined]
    server.target = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    await start()
    try:
        yield server
    finally:
        await server.kill9()


async def test_dev_server_restart_mid_build(dev_server, sandbox_host, pg_url, tmp_path):
    client = await Client.connect(dev_server.target)
    stack = Stack(client, dev_server.target, pg_url, sandbox_host, tmp_path)
    try:
        await stack.start_worker()
        in_flight = await stack.start_build("gated")
        await stack.wait_activity_started(in_flight, "generate_code")

        await dev_server.kill9()
        assert stack.workers[0].alive
        await dev_server.start()

        await stack.open_gate(in_flight)
        after_restart = await stack.start_build("template")
        for handle in (in_flight, after_restart):
            await assert_recovered_ready(stack, handle, await handle.result())
        assert stack.workers[0].alive  # the worker rode out the restart: no new worker was needed
    except BaseException:
        print(stack.logs(), dev_server.log_tail(), file=sys.stderr)
        raise
    finally:
        await stack.close()
