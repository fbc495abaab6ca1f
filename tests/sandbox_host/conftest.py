"""A sandbox host subprocess shared by the sandbox_host tests (tests that restart or reconfigure
a host start their own with `running_host`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from sandbox_host.testing import RunningHost, package_index_exceptions, running_host


@pytest.fixture(scope="session")
async def host(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningHost]:
    # pip in a sandbox reaches PyPI through egress, which denies non-global addresses: allow the
    # index's own address where this machine resolves it to a mirror at one.
    async with running_host(
        tmp_path_factory.mktemp("sandbox-host"),
        default_timeout_s=120,
        egress_allowed_networks=package_index_exceptions(),
    ) as running:
        yield running


@pytest.fixture(scope="session")
def sdk(host: RunningHost) -> dict[str, Any]:
    """Keyword arguments that point e2b.AsyncSandbox at the test host."""
    return host.sdk_options()
