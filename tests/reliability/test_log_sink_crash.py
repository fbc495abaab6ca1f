"""Build logs across a worker crash: `kill -9` the worker while DEPS runs `pip install` (after some of
its output is stored), start a new one. The retried install replays its output; the log keeps each
line once (activities/logs.py keys lines by source and line number), and the build reaches READY."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.reliability.harness import assert_recovered_ready, wait_until

pytestmark = pytest.mark.reliability


async def test_worker_killed_mid_deps_leaves_no_duplicate_log_lines(stack):
    first = await stack.start_worker()
    handle = await stack.start_build("slow-install")
    await stack.wait_activity_started(handle, "install_dependencies")
    await stack.wait_in_stage(handle.id, "deps")

    async def slow_build_stored():
        rows = await stack.repo.list_logs(handle.id, stage="deps")
        return rows if any("Preparing metadata" in r.text for r in rows) else None

    # The sink writes every 200 ms: the lines up to the slow build (pip asks the backend for the
    # wheel to read its metadata) are stored before the kill.
    before = await wait_until(slow_build_stored, "the install's first lines in build_logs", timeout=60)
    await first.kill9()

    await stack.start_worker()
    result = await handle.result()
    await assert_recovered_ready(stack, handle, result)

    rows = await stack.repo.list_logs(handle.id, stage="deps", limit=5000)
    keys = [(r.source, r.line_no) for r in rows]
    assert len(set(keys)) == len(keys)
    repeated = [text for text, n in Counter(r.text for r in rows).items() if n > 1]
    assert not repeated, "\n".join(r.text for r in rows)
    # What was stored before the kill stays first and once; the retry said so and finished the install.
    assert [r.text for r in rows[: len(before)]] == [r.text for r in before]
    assert any("this step is running again (try 2)" in r.text for r in rows)
    assert any("Successfully installed genloop_slow_dep" in r.text for r in rows)
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
