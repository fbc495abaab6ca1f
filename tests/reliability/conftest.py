"""Fixtures of the fault-injection suite (run alone with `pytest -m reliability`).

The session's Temporal dev server and sandbox host are shared with the other suites; tests that
damage a host (restart it, attack it) get a host of their own. Builds run on PostgreSQL: worker
processes and the test share it across processes, as in production, and the STARTING/SCAFFOLD gate
is a PostgreSQL trigger. Each test gets a fresh, migrated database.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from migrations.apply import upgrade
from tests.helpers.databases import PostgresDatabases, postgres_databases
from tests.reliability.harness import Stack


@pytest.fixture(scope="session")
async def postgres_dbs() -> AsyncIterator[PostgresDatabases]:
    async with postgres_databases() as factory:
        yield factory


@pytest.fixture
async def pg_url(postgres_dbs: PostgresDatabases) -> str:
    url = await postgres_dbs.create()
    await upgrade(url)
    return url


def temporal_target(env) -> str:
    return env.client.service_client.config.target_host


@contextlib.asynccontextmanager
async def _stack(temporal_env, host, pg_url, tmp_path, request) -> AsyncIterator[Stack]:
    s = Stack(temporal_env.client, temporal_target(temporal_env), pg_url, host, tmp_path)
    try:
        yield s
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(s.logs())
        await s.close()


@pytest.fixture
async def stack(temporal_env, sandbox_host, pg_url, tmp_path, request) -> AsyncIterator[Stack]:
    """Workers (subprocesses) on a task queue of their own, the shared dev server and sandbox host."""
    async with _stack(temporal_env, sandbox_host, pg_url, tmp_path, request) as s:
        yield s


@pytest.fixture
async def private_host(tmp_path):
    """A sandbox host of this test's own (for tests that restart it, attack it or sweep it)."""
    from sandbox_host.testing import running_host

    async with running_host(tmp_path / "private-host") as host:
        yield host


@pytest.fixture
async def private_stack(temporal_env, private_host, pg_url, tmp_path, request) -> AsyncIterator[Stack]:
    async with _stack(temporal_env, private_host, pg_url, tmp_path, request) as s:
        yield s


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.rep_call = report
    return report
