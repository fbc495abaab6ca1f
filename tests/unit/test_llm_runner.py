"""LLMRunner over real HTTP against a fake model endpoint (a named test double for the LLM)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from activities.edits import apply_changes
from activities.runners import Capability, RunnerTask, no_progress
from activities.runners.llm import LLMRunner, parse_files
from genloop.errors import ErrorKind, GenloopError

SECRET = "sk-test-very-secret"

APP_FILES = {
    "files": [
        {"path": "app.py", "content": "print('hi')\n"},
        {"path": "Procfile", "content": "web: python3 app.py\n"},
    ]
}


class FakeModelEndpoint:
    """Test double for the model provider: scripted status codes, then a canned answer."""

    def __init__(self, statuses: list[int], answer: str) -> None:
        self.statuses = list(statuses)
        self.answer = answer
        self.requests: list[dict] = []

    async def messages(self, request: Request) -> JSONResponse:
        self.requests.append({"headers": dict(request.headers), "body": await request.json()})
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return JSONResponse({"type": "error"}, status_code=status)
        return JSONResponse({"content": [{"type": "text", "text": self.answer}]})


@pytest.fixture
async def fake_model():
    endpoints: list[FakeModelEndpoint] = []

    async def start(statuses: list[int], answer: str) -> tuple[FakeModelEndpoint, str]:
        fake = FakeModelEndpoint(statuses, answer)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/messages", fake.messages, methods=["POST"])]),
                                               host="127.0.0.1", port=port, log_level="warning"))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        endpoints.append((server, task))
        return fake, f"http://127.0.0.1:{port}"

    yield start
    for server, task in endpoints:
        server.should_exit = True
        await task


async def test_llm_answer_becomes_valid_working_files(fake_model):
    fake, url = await fake_model([], "```json\n" + json.dumps(APP_FILES) + "\n```")
    runner = LLMRunner(api_key=SECRET, base_url=url, model="m")
    result = await runner.run(RunnerTask(kind=Capability.NEW_APP, goal="a clock"), no_progress)
    assert list(apply_changes({}, result.files)) == ["Procfile", "app.py"]
    sent = fake.requests[0]
    assert sent["headers"]["x-api-key"] == SECRET and "a clock" in sent["body"]["messages"][0]["content"]
    assert SECRET not in repr(runner)


@pytest.mark.parametrize(
    "status,kind", [(429, ErrorKind.RATE_LIMITED), (401, ErrorKind.AUTH_FAILED), (529, ErrorKind.SERVICE_BUSY),
                    (400, ErrorKind.RUNNER_FAILED)],
)
async def test_provider_errors_map_to_the_taxonomy(fake_model, status, kind):
    _, url = await fake_model([status], json.dumps(APP_FILES))
    with pytest.raises(GenloopError) as info:
        await LLMRunner(api_key=SECRET, base_url=url, model="m").run(RunnerTask(kind=Capability.NEW_APP, goal="x"), no_progress)
    assert info.value.kind is kind and SECRET not in str(info.value)


async def test_unreachable_endpoint_is_transient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GenloopError) as info:
        await LLMRunner(api_key=SECRET, base_url=f"http://127.0.0.1:{port}", model="m").run(RunnerTask(kind=Capability.NEW_APP, goal="x"), no_progress)
    assert info.value.kind is ErrorKind.NETWORK and info.value.kind.transient


@pytest.mark.parametrize("text", ["sorry, I cannot", "{}", '{"files": []}', '{"files": [{"path": 1}]}', "{oops"])
def test_malformed_answers_are_permanent(text):
    with pytest.raises(GenloopError) as info:
        parse_files(text)
    assert info.value.kind is ErrorKind.RUNNER_FAILED and not info.value.kind.transient
