"""API fuzz: schemathesis generates requests from the OpenAPI document a real API process serves
(`python -m api`, backed by the session's dev server and a PostgreSQL database), valid and invalid
(positive and negative generation modes), at least 1000 of them. No answer is a 5xx, and every error
is JSON `{"error": {"code", "message"}}`."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections import Counter

import httpx
import pytest

from sandbox_host.testing import free_port
from tests.reliability.harness import ServiceProcess, wait_until

pytestmark = pytest.mark.reliability

MIN_CASES = 1000
EXAMPLES_PER_OPERATION_AND_MODE = 120


@pytest.fixture
async def api_url(temporal_env, pg_url, tmp_path):
    from tests.reliability.conftest import temporal_target

    port = free_port()
    env = {
        **__import__("os").environ,
        "TEMPORAL_ADDRESS": temporal_target(temporal_env),
        "GENLOOP_DATABASE_URL": pg_url,
        "GENLOOP_TEMPORAL_TASK_QUEUE": f"fuzz-{uuid.uuid4().hex}",  # nothing runs these builds
        "GENLOOP_DATA_DIR": str(tmp_path / "data"),
    }
    api = ServiceProcess("api", [sys.executable, "-m", "api", "--port", str(port), "--log-level", "warning"], env,
                         tmp_path / "api.log")
    await api.spawn()
    url = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        if not api.alive:
            raise AssertionError(f"the API exited:\n{api.log_tail()}")
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(f"{url}/healthz")).status_code == 200

    await wait_until(healthy, "the API to be healthy", timeout=60)
    try:
        yield url
    finally:
        await api.stop()
        if api.log_tail():
            print(api.log_tail(), file=sys.stderr)


def _fuzz(base_url: str) -> tuple[Counter, list[str]]:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()
    counts: Counter = Counter()
    problems: list[str] = []

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not (operation.path_parameters or operation.query
                                                       or operation.headers or operation.body):
                continue  # nothing to make invalid

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES_PER_OPERATION_AND_MODE, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                response = case.call(base_url=base_url, session=session, timeout=30)
                # check() runs below, in this same iteration: the loop variables are the current ones.
                counts[f"{operation.label} [{mode.value}] {response.status_code}"] += 1  # noqa: B023
                where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]!r}"
                assert response.status_code < 500, where
                if response.status_code >= 400:
                    content_type = response.headers.get("content-type") or [""]  # header -> list of values
                    assert content_type[0].startswith("application/json"), where
                    body = response.json()
                    error = body.get("error") if isinstance(body, dict) else None
                    assert isinstance(error, dict), where
                    assert isinstance(error.get("code"), str) and error["code"], where
                    assert isinstance(error.get("message"), str) and error["message"], where

            try:
                check()
            except AssertionError as exc:
                problems.append(f"{operation.label} [{mode.value}]: {exc}")
    return counts, problems


async def test_api_fuzz_no_5xx_and_json_errors(api_url):
    counts, problems = await asyncio.to_thread(_fuzz, api_url)
    total = sum(counts.values())
    by_status = Counter()
    for key, n in counts.items():
        by_status[key.rsplit(" ", 1)[1]] += n
    print(f"{total} generated requests; by status: {dict(sorted(by_status.items()))}")
    assert not problems, "\n".join(problems)
    assert total >= MIN_CASES, counts
