"""The LLM runner's decisions without a network: error mapping, Retry-After, prompt bounds, budget caps.
The loop over real HTTP (both SDKs against fake servers) is tested in tests/runners/."""

from __future__ import annotations

import email.utils
import time

import pytest

from activities.runners import prompts
from activities.runners.base import Capability, Failure, RunnerTask, no_progress
from activities.runners.llm import DEFAULT_MODELS, PLACEHOLDER_KEY, LLMRunner
from activities.runners.providers.base import (
    KeyScrubber,
    ModelReply,
    ModelRequest,
    ToolCall,
    retry_after_s,
    status_error,
    stream_error,
)
from genloop.errors import ErrorKind, GenloopError

KEY = "sk-unit-0123456789abcdef"


class ScriptedModel:
    """A ModelClient double that answers from a list and records each request (no HTTP)."""

    provider = "scripted"
    model = "scripted-model"

    def __init__(self, *replies: ModelReply) -> None:
        self.replies = list(replies)
        self.requests: list[ModelRequest] = []

    async def complete(self, request: ModelRequest, on_delta) -> ModelReply:
        self.requests.append(request)
        return self.replies.pop(0)


def write_call(files: dict[str, str]) -> ToolCall:
    import json

    args = {"files": [{"path": p, "content": c} for p, c in files.items()], "summary": "s"}
    return ToolCall(id="c1", name="write_files", raw_arguments=json.dumps(args), arguments=args)


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_seconds(headers, expected):
    assert retry_after_s(headers) == expected


def test_retry_after_http_date():
    now = time.time()
    when = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= retry_after_s({"retry-after": when}, now=now) <= 31
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert retry_after_s({"retry-after": past}, now=now) == 0


@pytest.mark.parametrize(
    "status,kind",
    [
        (429, ErrorKind.RATE_LIMITED), (500, ErrorKind.SERVICE_BUSY), (502, ErrorKind.SERVICE_BUSY),
        (503, ErrorKind.SERVICE_BUSY), (529, ErrorKind.SERVICE_BUSY), (408, ErrorKind.SERVICE_BUSY),
        (409, ErrorKind.SERVICE_BUSY), (401, ErrorKind.AUTH_FAILED), (403, ErrorKind.AUTH_FAILED),
        (400, ErrorKind.RUNNER_FAILED), (404, ErrorKind.RUNNER_FAILED), (422, ErrorKind.RUNNER_FAILED),
    ],
)
def test_status_errors_map_to_the_taxonomy(status, kind):
    err = status_error("openai", status, {"retry-after": "3"}, f"Incorrect API key provided: {KEY}", KeyScrubber(KEY))
    assert err.kind is kind
    assert KEY not in str(err) and KEY not in repr(err)
    assert err.retry_after_s == (3.0 if kind.transient else None)


def test_auth_errors_drop_the_providers_text():
    # OpenAI quotes a masked key ("sk-unit-****cdef"): stripping the literal key would not catch it.
    err = status_error("openai", 401, {}, "Incorrect API key provided: sk-unit-****cdef", KeyScrubber(KEY))
    assert "cdef" not in str(err) and "refused the API key" in err.detail


@pytest.mark.parametrize(
    "error_type,kind",
    [("overloaded_error", ErrorKind.SERVICE_BUSY), ("api_error", ErrorKind.SERVICE_BUSY),
     ("rate_limit_error", ErrorKind.RATE_LIMITED), ("invalid_request_error", ErrorKind.RUNNER_FAILED),
     ("authentication_error", ErrorKind.AUTH_FAILED)],
)
def test_mid_stream_errors(error_type, kind):
    assert stream_error("anthropic", error_type, "x", KeyScrubber(KEY)).kind is kind


def test_scrubber_removes_the_key_and_url_secrets():
    scrub = KeyScrubber(KEY)
    out = scrub(f"POST https://u:pw@host/v1?key={KEY} with {KEY}")
    assert KEY not in out and "pw" not in out
    assert KEY not in repr(scrub)


def test_render_files_is_bounded():
    files = {
        "Procfile": "web: python3 app.py\n",
        "app.py": "a" * 1000,
        "big.py": "b" * 5000,
        "package-lock.json": "{}" * 100,
        "node_modules/x/index.js": "x",
        "web/.venv/lib/y.py": "y",
    }
    out = prompts.render_files(files, {"logo.png": 99}, budget=2000)
    assert '<file path="Procfile">' in out and '<file path="app.py">' in out
    assert "big.py (5000 bytes, not shown" in out and "b" * 100 not in out
    assert "package-lock.json (200 bytes, lock file" in out and "{}{}" not in out
    assert "logo.png (99 bytes, binary)" in out
    assert "node_modules" not in out.split("(")[0] and "index.js" not in out and "2 files under" in out


def test_files_the_failure_mentions_come_first():
    files = {"a.py": "a" * 900, "z.py": "z" * 900}
    out = prompts.render_files(files, hints='File "z.py", line 3', budget=1000)
    assert '<file path="z.py">' in out and '<file path="a.py">' not in out


def test_prompts_per_task_kind():
    new = prompts.task_prompt(RunnerTask(kind=Capability.NEW_APP, goal="a todo list", stack="node"))
    assert "a todo list" in new and "Stack: node" in new and "package.json" in new
    assert "0.0.0.0" in prompts.SYSTEM and "/health" in prompts.SYSTEM and "Procfile" in prompts.SYSTEM
    change = prompts.task_prompt(RunnerTask(kind=Capability.CHANGE, goal="g", files={"a.py": "A"}, change="add B"))
    assert '<file path="a.py">\nA\n</file>' in change and "add B" in change
    failure = Failure("deps", "pip install -r requirements.txt", None, "x" * 50_000)
    fix = prompts.task_prompt(RunnerTask(kind=Capability.FIX, goal="g", files={"a.py": "A"}, failure=failure))
    assert "stage deps" in fix and "did not finish" in fix and "x" * prompts.FAILURE_TAIL_CHARS in fix
    assert "x" * (prompts.FAILURE_TAIL_CHARS + 1) not in fix
    assert [t.name for t in prompts.tools_for(Capability.NEW_APP)] == ["write_files"]
    assert prompts.tool_choice_for(Capability.FIX) == "required"
    assert prompts.PROMPT_VERSION


async def test_max_tokens_is_capped_by_the_remaining_budget():
    model = ScriptedModel(ModelReply(tool_calls=[write_call({"a.py": "1"})], stop="tool_use",
                                     input_tokens=10, output_tokens=10))
    runner = LLMRunner(model, max_output_tokens=16000)
    await runner.run(RunnerTask(kind=Capability.NEW_APP, goal="x", token_budget=5000), no_progress)
    cap = model.requests[0].max_tokens
    assert 256 <= cap < 5000


async def test_unknown_usage_is_estimated():
    model = ScriptedModel(ModelReply(tool_calls=[write_call({"a.py": "1" * 400})], stop="tool_use"))
    result = await LLMRunner(model).run(RunnerTask(kind=Capability.NEW_APP, goal="x"), no_progress)
    assert result.usage.input_tokens > 100 and result.usage.output_tokens > 100 and result.usage.calls == 1


def test_an_endpoint_needs_a_key_or_url_and_a_known_provider():
    with pytest.raises(GenloopError) as info:
        LLMRunner.for_endpoint(provider="openai")
    assert info.value.kind is ErrorKind.INVALID_INPUT
    with pytest.raises(GenloopError):
        LLMRunner.for_endpoint(provider="gemini", api_key="k")


def test_endpoint_defaults():
    local = LLMRunner.for_endpoint(provider="openai", base_url="http://127.0.0.1:11434/v1")
    assert local.client.model == DEFAULT_MODELS["openai"]
    assert local.client._api_key == PLACEHOLDER_KEY  # the SDK wants a key; a local server ignores it
    cloud = LLMRunner.for_endpoint(provider="anthropic", api_key=KEY, model="claude-x")
    assert cloud.client.model == "claude-x" and KEY not in repr(cloud)
