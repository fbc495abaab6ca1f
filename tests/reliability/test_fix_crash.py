"""`kill -9` of the worker during a fix attempt: the model (a fake server in this process, over real
HTTP) is asked for the fix and the worker dies while the answer streams. A new worker resumes the
same attempt: the build ends READY once, with one sandbox and each attempt recorded once."""

from __future__ import annotations

import pytest

from tests.helpers.fake_models import FAKE_KEY, FakeOpenAIServer, edit_file, slow, write_files
from tests.reliability.harness import wait_until
from tests.workflows.test_fix_loop import BROKEN_APP, PROCFILE

pytestmark = pytest.mark.reliability

FIX = edit_file("app.py", "raise SystemExit('boom: missing DATABASE_URL')\n", "")


async def test_worker_killed_during_a_fix_attempt(stack):
    async with FakeOpenAIServer(api_key=FAKE_KEY) as model:
        model.script(
            write_files({"app.py": BROKEN_APP, "Procfile": PROCFILE}),
            slow(FIX, stall_s=600),  # the fix attempt: held until the worker is killed
            FIX,  # the retried attempt's call
        )
        llm = {**model.env(), "GENLOOP_RUNNER_KIND": "template", "GENLOOP_RUNNER_FIX_ATTEMPTS": "2"}
        first = await stack.start_worker(**llm)
        handle = await stack.start_build("llm", goal="fixed after a crash")
        await wait_until(lambda: len(model.requests) == 2, "the fix attempt's model call", timeout=120)
        assert await stack.db_status(handle.id) == "code"
        await first.kill9()
        await stack.start_worker(**llm)
        result = await handle.result()

    assert result.status == "ready", result
    assert await stack.sandboxes.find_for_build(handle.id) == [result.sandbox_id]
    job = await stack.repo.get(handle.id)
    assert (job.status, job.attempt, job.build_version) == ("ready", 2, "build_v0_1")
    assert [a.attempt for a in await stack.repo.list_attempts(handle.id)] == [1]
    stages = [t.stage for t in await stack.repo.list_transitions(handle.id)]
    assert stages == ["queued", "starting", "scaffold", "code", "deps", "checks", "code", "deps", "checks", "ready"]
    assert len(model.requests) == 3
