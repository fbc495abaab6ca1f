"""A sandbox host subprocess shared by the sandbox_host tests (tests that restart or reconfigure
a host start their own with `running_host`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from sandbox_host.testing import RunningHost, running_host


@pytest.fixture(scope="session")
async def host(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningHost]:
    async with running_host(tmp_path_factory.mktemp("sandbox-host"), default_timeout_s=120) as running:
        yield running


@pytest.fixture(scope="session")
def sdk(host: RunningHost) -> dict[str, Any]:
    """Keyword arguments that point e2b.AsyncSandbox at the test host."""
    return host.sdk_options()
