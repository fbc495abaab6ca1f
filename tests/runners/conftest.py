"""Fixtures for the runner tests: a fake model server for each provider, streaming or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers.fake_models import FAKE_KEY, SERVERS, FakeModelServer


@pytest.fixture(params=sorted(SERVERS))
def provider(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[True, False], ids=["stream", "plain"])
def stream(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture(scope="session")
async def fake_model_servers() -> AsyncIterator[dict[str, FakeModelServer]]:
    """One server per provider for the session (stopping uvicorn takes ~0.2 s: not once per test)."""
    servers = {name: cls(api_key=FAKE_KEY) for name, cls in SERVERS.items()}
    for fake in servers.values():
        await fake.start()
    try:
        yield servers
    finally:
        for fake in servers.values():
            await fake.stop()


@pytest.fixture
def server(provider: str, fake_model_servers: dict[str, FakeModelServer]) -> FakeModelServer:
    """The fake model server of `provider`, with an empty script; it accepts only FAKE_KEY."""
    fake = fake_model_servers[provider]
    fake.reset()
    return fake
