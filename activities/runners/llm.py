"""LLMRunner: a model writes the app's files through tools, whatever the provider.

The loop is provider-neutral: it builds the prompt (`prompts`), asks the model through an adapter
(`providers`) that forces a tool call, and applies the `write_files` / `edit_file` calls to a working
copy of the files. The model's output is untrusted input: every change goes through `apply_changes`
(paths, sizes, counts), and only a complete answer is returned, never a half-written file.
Mistakes a model can correct get one more chance each (a text answer, a cut-off answer, a failed tool
call); anything else ends the task with a GenloopError of the taxonomy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from activities.edits import EditMiss, FileSet, apply_changes, replace_once, safe_relative_path
from activities.runners import prompts
from activities.runners.base import Capability, Progress, RunnerResult, RunnerTask, Usage, usage_of  # noqa: F401
from activities.runners.providers import model_client
from activities.runners.providers.base import (
    AssistantMessage,
    Message,
    ModelClient,
    ModelReply,
    ModelRequest,
    ToolCall,
    ToolResult,
    ToolResults,
    ToolSpec,
    UserMessage,
)
from genloop.errors import ErrorKind, GenloopError, redact_secrets

if TYPE_CHECKING:
    from genloop.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODELS = {"openai": "gpt-5.4-mini", "anthropic": "claude-sonnet-4-6"}
PLACEHOLDER_KEY = "not-needed"  # local OpenAI-compatible servers ignore the key, but the SDKs want one
MIN_OUTPUT_TOKENS = 256  # a call the budget allows fewer output tokens than this is not worth making
PROGRESS_INTERVAL_S = 0.5
INPUT_CHARS_PER_TOKEN = 3  # deliberately low: overestimating the input keeps the output cap within budget
OUTPUT_CHARS_PER_TOKEN = 4  # streamed characters -> tokens, for progress and providers that report no usage


class LLMRunner:
    """Writes, changes and fixes apps with a model. `client` is the provider adapter (see
    `activities.runners.providers`); the runner never sees the API key itself."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset(Capability)

    def __init__(self, client: ModelClient, *, max_output_tokens: int = 16000) -> None:
        self.client = client
        self.max_output_tokens = max_output_tokens

    @classmethod
    def for_endpoint(
        cls, *, provider: str = "openai", base_url: str = "", model: str = "", api_key: str = "",
        timeout_s: float = 300, max_output_tokens: int = 16000, stream: bool = True,
    ) -> LLMRunner:
        """A runner for one endpoint. An empty key works with a base URL (a keyless local server);
        `stream=False` is for servers that cannot stream tool calls."""
        if not api_key and not base_url:
            raise GenloopError(ErrorKind.INVALID_INPUT, "the llm runner needs an API key or a base URL")
        client = model_client(
            provider, api_key=api_key or PLACEHOLDER_KEY, base_url=base_url,
            model=model or DEFAULT_MODELS.get(provider, ""), timeout_s=timeout_s, stream=stream,
        )
        return cls(client, max_output_tokens=max_output_tokens)

    @classmethod
    def from_settings(cls, settings: Settings, *, stream: bool = True) -> LLMRunner:
        r = settings.runner
        if not r.llm_configured:
            raise GenloopError(
                ErrorKind.INVALID_INPUT,
                "runner 'llm' needs GENLOOP_RUNNER_LLM_API_KEY (or GENLOOP_RUNNER_LLM_BASE_URL for a local server)",
            )
        return cls.for_endpoint(
            provider=r.llm_provider, base_url=r.llm_base_url, model=r.llm_model,
            api_key=r.llm_api_key.get_secret_value(), timeout_s=r.llm_timeout_s,
            max_output_tokens=r.llm_max_output_tokens, stream=stream,
        )

    def __repr__(self) -> str:  # never the key; a base URL may carry credentials too
        c = self.client
        base_url = redact_secrets(c.base_url) if c.base_url else None
        return f"LLMRunner(provider={c.provider!r}, model={c.model!r}, base_url={base_url!r})"

    async def run(self, task: RunnerTask, progress: Progress) -> RunnerResult:
        if task.kind not in self.capabilities:
            raise GenloopError(ErrorKind.INVALID_INPUT, f"the llm runner cannot do {task.kind.value}")
        session = _Session(self, task, progress)
        try:
            return await session.run()
        except GenloopError as exc:
            # What failed attempts spent still counts against the build's budget: the caller reads it here.
            exc.usage = replace(session.usage)  # type: ignore[attr-defined]
            raise


class _CallError(Exception):
    """A tool call the model can correct (an edit that missed, malformed arguments): told back once."""


@dataclass
class _Session:
    """One `run`: the conversation, the working copy of the files and what has been spent."""

    runner: LLMRunner
    task: RunnerTask
    progress: Progress
    usage: Usage = field(init=False)
    base: FileSet = field(init=False)
    working: FileSet = field(init=False)
    deleted_binaries: set[str] = field(default_factory=set)
    summaries: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)
    _streamed_chars: int = 0
    _last_progress: float = float("-inf")

    def __post_init__(self) -> None:
        self.usage = Usage(model=self.runner.client.model)
        self.base = {path: content.encode("utf-8") for path, content in self.task.files.items()}
        self._reset()

    def _reset(self) -> None:
        self.working = dict(self.base)
        self.deleted_binaries.clear()
        self.summaries.clear()
        self.edited.clear()

    async def run(self) -> RunnerResult:
        task = self.task
        tools = prompts.tools_for(task.kind)
        choice = prompts.tool_choice_for(task.kind)
        prompt = prompts.task_prompt(task)
        messages: list[Message] = [UserMessage(prompt)]
        reasked_for_tool = cut_off = corrected = False
        self._report("writing code: waiting for the model", force=True)
        while True:
            reply, capped = await self._call(messages, tools, choice)
            if reply.stop == "length":
                if capped:
                    raise GenloopError(
                        ErrorKind.BUDGET_REACHED,
                        f"the answer was cut off at the token budget ({self.usage.total_tokens} tokens spent)",
                    )
                if cut_off:
                    raise GenloopError(ErrorKind.RUNNER_FAILED, "the model's answers were cut off at the output "
                                       f"limit ({self.runner.max_output_tokens} tokens) twice")
                cut_off = True
                # The cut answer is discarded whole (its last file is half-written): start over, asking
                # for a shorter answer.
                self._reset()
                messages = [UserMessage(f"{prompt}\n\n{prompts.ANSWER_TOO_LONG}")]
                continue
            if not reply.tool_calls:
                if reasked_for_tool:
                    raise GenloopError(ErrorKind.RUNNER_FAILED, "the model answered in text twice instead of "
                                       f"calling write_files: {redact_secrets(reply.text[:200])!r}")
                reasked_for_tool = True
                messages += [AssistantMessage(text=reply.text or "(no answer)"), UserMessage(prompts.USE_THE_TOOL)]
                continue
            results, failed = self._apply(reply.tool_calls, tools)
            if not failed:
                return self._result()
            if corrected:
                errors = "; ".join(r.content.split("\n", 1)[0] for r in results if r.is_error)
                raise GenloopError(ErrorKind.RUNNER_FAILED, f"the model's tool calls failed twice: {errors[:500]}")
            corrected = True
            messages += [
                AssistantMessage(text=reply.text, tool_calls=tuple(reply.tool_calls)),
                ToolResults(tuple(results), note=prompts.CALLS_FAILED),
            ]

    # --- one model call ---

    async def _call(self, messages: list[Message], tools: Iterable[ToolSpec], choice: str) -> tuple[ModelReply, bool]:
        tools = tuple(tools)
        estimate = _estimate_input_tokens(prompts.SYSTEM, messages, tools)
        max_tokens, capped = self.runner.max_output_tokens, False
        budget = self.task.token_budget
        if budget is not None:
            room = budget - self.usage.total_tokens - estimate
            if room < MIN_OUTPUT_TOKENS:
                raise GenloopError(
                    ErrorKind.BUDGET_REACHED,
                    f"token budget reached: {self.usage.total_tokens} of {budget} spent, the next call needs "
                    f"about {estimate} input tokens",
                )
            if room < max_tokens:
                max_tokens, capped = room, True
        client = self.runner.client
        log.info("model call %d: %s %s, prompts v%s, max_tokens %d, ~%d input tokens", self.usage.calls + 1,
                 client.provider, client.model, prompts.PROMPT_VERSION, max_tokens, estimate)
        self._streamed_chars = 0
        request = ModelRequest(system=prompts.SYSTEM, messages=tuple(messages), tools=tools, tool_choice=choice,
                               max_tokens=max_tokens)
        reply = await client.complete(request, self._on_delta)
        self.usage.calls += 1
        self.usage.input_tokens += reply.input_tokens if reply.input_tokens is not None else estimate
        self.usage.output_tokens += (
            reply.output_tokens if reply.output_tokens is not None else _output_estimate(reply, self._streamed_chars)
        )
        self._streamed_chars = 0
        self._report(force=False)
        return reply, capped

    def _on_delta(self, chars: int) -> None:
        self._streamed_chars += chars
        self._report(force=False)

    def _report(self, message: str | None = None, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        if message is None:
            tokens = self.usage.output_tokens + self._streamed_chars / OUTPUT_CHARS_PER_TOKEN
            message = f"writing code: {tokens / 1000:.1f}k tokens"
        self.progress(message)

    # --- tool calls ---

    def _apply(self, calls: list[ToolCall], tools: tuple[ToolSpec, ...]) -> tuple[list[ToolResult], bool]:
        """Apply the calls in order to the working copy. The first correctable failure stops the rest
        (they may depend on it); a path escape or an oversized file raises BAD_GENERATED_FILES."""
        offered = {t.name for t in tools}
        results: list[ToolResult] = []
        failed = False
        for call in calls:
            if failed:
                results.append(ToolResult(call.id, prompts.NOT_APPLIED, is_error=True))
                continue
            try:
                if call.name not in offered:
                    raise _CallError(f"unknown tool {call.name!r}; use {' or '.join(sorted(offered))}")
                if call.arguments is None:
                    raise _CallError(f"the arguments of {call.name} are not a JSON object")
                if call.name == prompts.WRITE_FILES.name:
                    outcome = self._write_files(call.arguments)
                else:
                    outcome = self._edit_file(call.arguments)
                results.append(ToolResult(call.id, outcome))
            except _CallError as exc:
                results.append(ToolResult(call.id, str(exc), is_error=True))
                failed = True
        return results, failed

    def _write_files(self, args: Mapping[str, Any]) -> str:
        files, deletes, summary = args.get("files", []), args.get("delete") or [], args.get("summary") or ""
        if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("content"), str) for f in files
        ):
            raise _CallError("write_files: `files` must be a list of {path, content} objects with string values")
        if not isinstance(deletes, list) or not all(isinstance(d, str) for d in deletes):
            raise _CallError("write_files: `delete` must be a list of paths")
        if not isinstance(summary, str):
            raise _CallError("write_files: `summary` must be a string")
        if not files and not deletes and not self.working:
            raise _CallError("write_files: no files written; write every file of the app")
        writes: dict[str, str] = {}
        for f in files:
            path = safe_relative_path(f["path"])  # an escape is BAD_GENERATED_FILES, not a second chance
            if path in writes:
                raise GenloopError(ErrorKind.BAD_GENERATED_FILES, f"file path {path!r} appears twice")
            writes[path] = f["content"]
        removed = [safe_relative_path(d) for d in deletes]
        self.working = apply_changes(self.working, writes, removed)
        self.deleted_binaries.update(p for p in removed if p in self.task.binary_files and p not in writes)
        if summary.strip():
            self.summaries.append(summary.strip())
        return f"applied: wrote {len(writes)} files, deleted {len(removed)}"

    def _edit_file(self, args: Mapping[str, Any]) -> str:
        path, old, new = args.get("path"), args.get("old"), args.get("new")
        if not (isinstance(path, str) and isinstance(old, str) and isinstance(new, str)):
            raise _CallError("edit_file: `path`, `old` and `new` must be strings")
        path = safe_relative_path(path)
        current = self.working.get(path)
        if current is None:
            what = "is a binary file" if path in self.task.binary_files else "does not exist"
            raise _CallError(f"edit_file: {path} {what}; use write_files to create or replace it")
        try:
            text = current.decode("utf-8")
        except UnicodeDecodeError:
            raise _CallError(f"edit_file: {path} is not a text file; use write_files") from None
        try:
            edited = replace_once(text, old, new, path)
        except EditMiss as miss:
            raise _CallError(prompts.edit_miss(str(miss), path, text)) from None
        self.working = apply_changes(self.working, {path: edited})
        if path not in self.edited:
            self.edited.append(path)
        return f"applied: edited {path}"

    def _result(self) -> RunnerResult:
        changed = {p: c.decode("utf-8") for p, c in self.working.items() if self.base.get(p) != c}
        deleted = sorted({p for p in self.base if p not in self.working} | self.deleted_binaries)
        summary = " ".join(self.summaries) or (f"Edited {', '.join(self.edited)}." if self.edited else "")
        if not changed and not deleted:
            summary = summary or "No change."
        return RunnerResult(files=dict(changed), deleted=deleted, summary=summary[:1000], usage=replace(self.usage))


def _estimate_input_tokens(system: str, messages: Iterable[Message], tools: Iterable[ToolSpec]) -> int:
    chars = len(system) + sum(len(t.description) + len(str(t.parameters)) for t in tools)
    for m in messages:
        if isinstance(m, UserMessage):
            chars += len(m.text)
        elif isinstance(m, AssistantMessage):
            chars += len(m.text) + sum(len(c.raw_arguments) + len(c.name) for c in m.tool_calls)
        elif isinstance(m, ToolResults):
            chars += len(m.note) + sum(len(r.content) for r in m.results)
    return chars // INPUT_CHARS_PER_TOKEN + 1


def _output_estimate(reply: ModelReply, streamed_chars: int) -> int:
    chars = streamed_chars or len(reply.text) + sum(len(c.raw_arguments) for c in reply.tool_calls)
    return chars // OUTPUT_CHARS_PER_TOKEN + 1
