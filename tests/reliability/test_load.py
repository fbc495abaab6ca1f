"""Load: 50 concurrent builds of one project on one worker process (`genloop worker`, the template
runner): all reach READY, their versions are build_v0_1..50 with no duplicate, and the worker's
memory stays bounded (RSS sampled with psutil throughout; the bound is generous: this is a leak
and runaway check, not a benchmark)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from genloop.http import preview_client
from tests.reliability.harness import PIPELINE

pytestmark = pytest.mark.reliability

BUILDS = 50
RSS_BOUND = 1024**3


async def test_fifty_concurrent_builds(private_stack):
    stack = private_stack
    worker = await stack.start_worker(doubles=False)
    samples: list[int] = [worker.rss_bytes()]

    async def sample_rss() -> None:
        while True:
            with contextlib.suppress(Exception):
                samples.append(worker.rss_bytes())
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample_rss())
    project = f"p-load-{uuid.uuid4().hex[:8]}"
    try:
        handles = await asyncio.gather(
            *(stack.start_build("template", project_id=project, goal=f"app number {i}") for i in range(BUILDS))
        )
        results = await asyncio.gather(*(h.result() for h in handles))
    finally:
        sampler.cancel()

    assert [r.status for r in results] == ["ready"] * BUILDS
    versions = [r.build_version for r in results]
    assert sorted(versions) == sorted(f"build_v0_{n}" for n in range(1, BUILDS + 1))
    assert len({r.sandbox_id for r in results}) == BUILDS
    jobs = await stack.repo.list_jobs(project, limit=BUILDS)
    assert sorted(j.build_version for j in jobs) == sorted(versions) and {j.status for j in jobs} == {"ready"}
    for h in handles[:5]:  # full ordered transitions (spot check) and a live preview
        assert [t.stage for t in await stack.repo.list_transitions(h.id)] == PIPELINE
    async with preview_client(timeout=10) as http:
        r = results[-1]
        assert (await http.get(r.preview_url)).status_code == 200

    peak = max(samples)
    print(f"{BUILDS} builds READY; worker RSS start {samples[0] / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, "
          f"end {samples[-1] / 2**20:.0f} MiB ({len(samples)} samples)")
    assert worker.alive and peak < RSS_BOUND
