"""Database unavailable ~20 s mid-build: a TCP proxy in front of PostgreSQL resets every connection
and refuses new ones. Activities and local activities fail with DatabaseUnavailable (transient) and
are retried; both builds in flight complete, with every transition recorded once, in order."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy.engine import make_url
from temporalio.api.enums.v1 import PendingActivityState

from tests.reliability.harness import Stack, assert_recovered_ready, wait_until
from tests.reliability.tcp_proxy import TcpProxy

pytestmark = pytest.mark.reliability

OUTAGE_S = 20.0


async def _retrying_after(handle, activity: str, error_type: str) -> bool:
    desc = await handle.describe()
    for a in desc.raw_description.pending_activities:
        if (
            a.activity_type.name == activity
            and a.attempt >= 2
            and a.last_failure.application_failure_info.type == error_type
            and a.state != PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        ):
            return True
    return False


async def test_database_outage_mid_build(temporal_env, sandbox_host, pg_url, tmp_path):
    from tests.reliability.conftest import temporal_target

    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    # The worker reaches PostgreSQL through the proxy; the test observes it directly.
    stack = Stack(temporal_env.client, temporal_target(temporal_env), pg_url, sandbox_host, tmp_path)
    try:
        await stack.start_worker(GENLOOP_DATABASE_URL=proxied_url)
        in_code = await stack.start_build("gated")
        await stack.wait_activity_started(in_code, "generate_code")

        proxy.cut()
        outage_started = time.monotonic()
        await stack.open_gate(in_code)  # the runner finishes; storing its files needs the database
        started_in_outage = await stack.start_build("template")  # its first write needs it too

        await wait_until(
            lambda: _retrying_after(in_code, "generate_code", "DatabaseUnavailable"),
            "generate_code to be retried after DatabaseUnavailable",
            timeout=OUTAGE_S,
        )
        assert await stack.repo.get(started_in_outage.id) is None  # STARTING could not be written yet
        # The outage lasts OUTAGE_S whatever happens meanwhile: this wait is the fault, not a poll.
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
        assert proxy.refused > 0 and proxy.down
        proxy.restore()

        for handle in (in_code, started_in_outage):
            await assert_recovered_ready(stack, handle, await handle.result())
        print(f"outage {OUTAGE_S:.0f}s: connections reset {proxy.dropped}, refused {proxy.refused}")
    except BaseException:
        print(stack.logs())
        raise
    finally:
        await stack.close()
        await proxy.close()
