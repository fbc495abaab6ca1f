"""The auto-fix loop through the real stack: a model (a fake server speaking each provider's wire
protocol over real HTTP) writes a broken app, is shown the failure, and fixes it; the loop is
bounded, stops on a repeated failure, and never sends infrastructure errors to the model."""

from __future__ import annotations

import uuid

import pytest
from temporalio.client import WorkflowFailureError

from activities.runners.llm import LLMRunner
from genloop.http import preview_client
from tests.helpers.fake_models import FAKE_KEY, SERVERS, edit_file, error, slow, text, write_files
from tests.reliability.harness import wait_until
from tests.workflows.conftest import make_stack
from workflows.types import CancelRequest

PROCFILE = "web: python3 app.py\n"
GOOD_APP = """import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"fixed by the model" if self.path == "/" else b"ok"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"""
BROKEN_APP = "import os\nraise SystemExit('boom: missing DATABASE_URL')\n" + GOOD_APP


@pytest.fixture(params=sorted(SERVERS))
async def model(request):
    async with SERVERS[request.param](api_key=FAKE_KEY) as server:
        yield server


def llm_runner(server) -> LLMRunner:
    return LLMRunner.for_endpoint(provider=server.provider, base_url=server.base_url, api_key=FAKE_KEY,
                                  model="fake-model")


async def test_broken_app_is_fixed_on_attempt_two(temporal_client, sandbox_host, repo, model):
    model.script(
        write_files({"app.py": BROKEN_APP, "Procfile": PROCFILE}, summary="the app"),
        edit_file("app.py", "raise SystemExit('boom: missing DATABASE_URL')\n", ""),
    )
    async with make_stack(temporal_client, sandbox_host, repo, extra_runners={"llm": llm_runner(model)},
                          fix_attempts=2) as stack:
        handle = await stack.start("a page that says fixed", runner="llm")
        result = await handle.result()
    assert result.status == "ready", result
    async with preview_client(timeout=10) as http:
        assert (await http.get(result.preview_url)).text == "fixed by the model"
    job = await repo.get(handle.id)
    assert job.attempt == 2 and job.max_attempts == 3 and job.llm_calls == 2
    [attempt] = await repo.list_attempts(handle.id)
    assert attempt.stage == "checks" and "boom: missing DATABASE_URL" in attempt.output
    stages = [t.stage for t in await repo.list_transitions(handle.id)]
    assert stages == ["queued", "starting", "scaffold", "code", "deps", "checks", "code", "deps", "checks", "ready"]
    # The model was shown the failure and the current files.
    fix_prompt = " ".join(model.requests[1].texts())
    assert "boom: missing DATABASE_URL" in fix_prompt and "raise SystemExit" in fix_prompt
    assert len(await stack.sandboxes.find_for_build(handle.id)) == 1


async def test_a_model_that_never_fixes_stops_after_the_attempts(temporal_client, sandbox_host, repo, model):
    broken = write_files({"app.py": BROKEN_APP, "Procfile": PROCFILE})
    still_broken = edit_file("app.py", "boom: missing DATABASE_URL", "boom: still missing DATABASE_URL")
    again = edit_file("app.py", "boom: still missing DATABASE_URL", "boom: still, still missing DATABASE_URL")
    model.script(broken, still_broken, again, write_files({"app.py": GOOD_APP}))  # the last is never asked for
    async with make_stack(temporal_client, sandbox_host, repo, extra_runners={"llm": llm_runner(model)},
                          fix_attempts=2) as stack:
        handle = await stack.start("never fixed", runner="llm")
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    job = await repo.get(handle.id)
    assert job.status == "failed" and job.debug_id and job.error_message
    assert len(model.requests) == 3  # 1 + fix_attempts calls, no more
    assert "3 attempts used" in job.error_detail
    assert len(await repo.list_attempts(handle.id)) == 2


async def test_the_same_failure_twice_stops_early(temporal_client, sandbox_host, repo, model):
    # The "fix" changes an unrelated file: the app fails exactly as before, so the loop stops.
    model.script(
        write_files({"app.py": BROKEN_APP, "Procfile": PROCFILE}),
        write_files({"README.md": "tried"}),
        write_files({"app.py": GOOD_APP}),
    )
    async with make_stack(temporal_client, sandbox_host, repo, extra_runners={"llm": llm_runner(model)},
                          fix_attempts=2) as stack:
        handle = await stack.start("same failure", runner="llm")
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    job = await repo.get(handle.id)
    assert "the same failure repeated" in job.error_detail and len(model.requests) == 2


async def test_a_failing_requirement_is_fixed(temporal_client, sandbox_host, repo, model):
    bad = "definitely-not-a-real-package-genloop==0.0.1\n"
    model.script(
        write_files({"app.py": GOOD_APP, "Procfile": PROCFILE, "requirements.txt": f"--no-index\n{bad}"}),
        write_files({"requirements.txt": "# the standard library is enough\n"}),
    )
    async with make_stack(temporal_client, sandbox_host, repo, extra_runners={"llm": llm_runner(model)},
                          fix_attempts=1) as stack:
        handle = await stack.start("needs no packages", runner="llm")
        result = await handle.result()
    assert result.status == "ready"
    [attempt] = await repo.list_attempts(handle.id)
    assert attempt.stage == "deps" and "definitely-not-a-real-package" in attempt.output
    stages = [t.stage for t in await repo.list_transitions(handle.id)]
    assert stages[-5:] == ["deps", "code", "deps", "checks", "ready"]


async def test_rate_limit_then_ready_and_bad_key_fails_friendly(temporal_client, sandbox_host, repo, model):
    model.script(error(429, retry_after=1), write_files({"app.py": GOOD_APP, "Procfile": PROCFILE}))
    async with make_stack(temporal_client, sandbox_host, repo, extra_runners={"llm": llm_runner(model)}) as stack:
        ok = await (await stack.start("retried after a 429", runner="llm")).result()
        assert ok.status == "ready"
        model.script(error(401))
        handle = await stack.start("wrong key", runner="llm")
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    job = await repo.get(handle.id)
    assert job.status == "failed" and job.error_message and FAKE_KEY not in (job.error_detail or "")
    assert "AuthFailed" in job.error_detail


async def test_text_answer_is_reasked_and_template_runner_never_fixes(temporal_client, sandbox_host, repo, model):
    model.script(text("Sure! Here is your app: ..."), write_files({"app.py": GOOD_APP, "Procfile": PROCFILE}))
    async with make_stack(temporal_client, sandbox_host, repo, extra_runners={"llm": llm_runner(model)},
                          fix_attempts=2) as stack:
        assert (await (await stack.start("re-asked", runner="llm")).result()).status == "ready"
        # A runner that cannot fix code fails at the first broken start, as before the loop existed.
        handle = await stack.start("broken", runner="broken-app", project_id=f"p-{uuid.uuid4().hex[:8]}")
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    assert (await repo.get(handle.id)).attempt == 0 and await repo.list_attempts(handle.id) == []


async def test_cancel_during_the_model_stream_stops_it(temporal_client, sandbox_host, repo, model):
    model.script(slow(write_files({"app.py": GOOD_APP, "Procfile": PROCFILE}), stall_s=60))
    async with make_stack(temporal_client, sandbox_host, repo, extra_runners={"llm": llm_runner(model)}) as stack:
        handle = await stack.start("cancelled while writing", runner="llm")
        await wait_until(lambda: len(model.requests) == 1, "the model call to start")
        await handle.signal("cancel", CancelRequest(reason="changed my mind"))
        result = await handle.result()
        assert result.status == "cancelled"
        await model.wait_closed_early()  # the runner hung up: no tokens keep streaming for nothing
    assert (await repo.get(handle.id)).status == "cancelled"
