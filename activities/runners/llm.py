"""LLMRunner: asks a model (Anthropic Messages API) for the app's files.

Offered only when runner.llm_api_key is set. The model's answer is untrusted input: it is parsed
into `working_files` and then goes through the same validation as any runner's output.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

import httpx

from activities.runners.base import Capability, Progress, RunnerResult, RunnerTask
from genloop.errors import ErrorKind, GenloopError
from genloop.settings import Settings

API_VERSION = "2023-06-01"
MAX_TOKENS = 16000

SYSTEM_PROMPT = """You write small, complete web apps that run in a Linux sandbox with Python 3.11.
Answer with ONE JSON object and nothing else: {"files": [{"path": "relative/path", "content": "..."}]}.
Rules: paths are relative to the project root; include a `Procfile` with a `web:` line that starts the
app; the app binds 0.0.0.0 on the port in $PORT (default 8080), serves the user's goal at `/` and
answers 200 on `/health`; declare Python dependencies in requirements.txt (or none: the standard
library is preferred); include README.md and .env.example."""

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


class LLMRunner:
    capabilities: ClassVar[frozenset[Capability]] = frozenset(Capability)

    def __init__(self, *, api_key: str, base_url: str, model: str, timeout_s: float = 300,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._model = model
        self._timeout_s = timeout_s
        self._transport = transport

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMRunner:
        key = settings.runner.llm_api_key.get_secret_value()
        if not key:
            raise GenloopError(ErrorKind.INVALID_INPUT, "runner 'llm' needs runner.llm_api_key (GENLOOP_LLM_API_KEY)")
        return cls(api_key=key, base_url=settings.runner.llm_base_url, model=settings.runner.llm_model,
                   timeout_s=settings.runner.llm_timeout_s)

    def __repr__(self) -> str:  # never show the key
        return f"LLMRunner(base_url={self._base_url!r}, model={self._model!r})"

    async def run(self, task: RunnerTask, progress: Progress) -> RunnerResult:
        text = await self._complete(f"Build this app: {task.goal}")
        files = parse_files(text)
        return RunnerResult(files={f["path"]: f["content"] for f in files})

    async def _complete(self, prompt: str) -> str:
        body = {
            "model": self._model,
            "max_tokens": MAX_TOKENS,
            "system": SYSTEM_PROMPT,
            "messages": [{"role": "user", "content": prompt}],
        }
        headers = {"x-api-key": self._api_key, "anthropic-version": API_VERSION}
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s, transport=self._transport) as http:
                response = await http.post(f"{self._base_url}/v1/messages", json=body, headers=headers)
        except httpx.TransportError as exc:
            raise GenloopError(ErrorKind.NETWORK, f"model endpoint unreachable: {type(exc).__name__}") from None
        status = response.status_code
        if status == 429:
            raise GenloopError(ErrorKind.RATE_LIMITED, "model provider rate limit (429)")
        if status in (401, 403):
            raise GenloopError(ErrorKind.AUTH_FAILED, f"model provider refused the API key ({status})")
        if status in (408, 409) or status >= 500:
            raise GenloopError(ErrorKind.SERVICE_BUSY, f"model provider unavailable ({status})")
        if status >= 400:
            raise GenloopError(ErrorKind.RUNNER_FAILED, f"model request rejected ({status}): {response.text[:500]}")
        try:
            blocks = response.json()["content"]
            return "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise GenloopError(ErrorKind.RUNNER_FAILED, "model response is not a Messages API reply") from None


def parse_files(text: str) -> list[dict[str, Any]]:
    """The model's JSON answer → [{path, content}]; anything else is a permanent runner failure."""
    cleaned = _FENCE.sub("", text.strip())
    start, end = cleaned.find("{"), cleaned.rfind("}")
    try:
        doc = json.loads(cleaned[start : end + 1]) if start != -1 else None
    except json.JSONDecodeError as exc:
        raise GenloopError(ErrorKind.RUNNER_FAILED, f"model answer is not valid JSON: {exc}") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not files:
        raise GenloopError(ErrorKind.RUNNER_FAILED, "model answer has no `files` list")
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("content"), str)):
            raise GenloopError(ErrorKind.RUNNER_FAILED, "model answer has a file without a string path and content")
    return files
