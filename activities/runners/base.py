"""What every runner is: the `Runner` protocol, the task it is given and what it returns.

A runner turns a task into file edits: a new app from a goal, a change request applied to the
current files, or a fix for a failing app. It never writes anywhere itself: the activity validates
what it returns (paths, sizes, count) like any untrusted input, then stores it. Runners import this
module, never each other or the factory (`activities.runners`), so the package has no import circle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Protocol


class Capability(str, Enum):
    """What a runner can be asked to do; also the kind of a task."""

    NEW_APP = "new_app"  # write an app from a goal
    CHANGE = "change"  # apply a free-text change request to the current files
    FIX = "fix"  # repair the current files from a failing command's output


@dataclass(frozen=True)
class Failure:
    """Why the app failed, as the model is told it (already bounded and redacted)."""

    stage: str  # "deps" or "checks"
    command: str
    exit_code: int | None
    output: str  # the tail of stderr/stdout, at most a few KB


@dataclass(frozen=True)
class RunnerTask:
    kind: Capability
    goal: str  # the goal of the project's line (the first version's goal)
    stack: str = "python"  # "python" or "node": what the sandbox's app is written in
    files: Mapping[str, str] = field(default_factory=dict)  # current text files by path; empty for NEW_APP
    binary_files: Mapping[str, int] = field(default_factory=dict)  # current non-text files: path -> size
    change: str = ""  # CHANGE: what the user asked for
    failure: Failure | None = None  # FIX: what failed
    token_budget: int | None = None  # input + output tokens this task may still spend; None: no limit


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0
    model: str = ""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class RunnerResult:
    files: dict[str, str | bytes]  # path -> full new content, for every file created or changed
    deleted: list[str] = field(default_factory=list)
    summary: str = ""  # one or two sentences on what changed, shown in logs and status
    usage: Usage = field(default_factory=Usage)

    @property
    def empty(self) -> bool:
        return not self.files and not self.deleted


class Progress(Protocol):
    """Called by a runner while it works ("writing code: 3.2k tokens"): the activity turns it into a
    heartbeat, the build's status message and a log line. Cheap to call often."""

    def __call__(self, message: str) -> None: ...


class Runner(Protocol):
    capabilities: ClassVar[frozenset[Capability]]

    async def run(self, task: RunnerTask, progress: Progress) -> RunnerResult:
        """Raise GenloopError with a transient kind (RATE_LIMITED, SERVICE_BUSY, NETWORK) for what a
        retry may fix, a permanent one (AUTH_FAILED, RUNNER_FAILED, BUDGET_REACHED) otherwise."""
        ...


def usage_of(exc: BaseException) -> Usage | None:
    """The tokens a runner spent before it raised (a runner attaches them as `exc.usage`), so a
    failed attempt still counts against the build's budget. None when it made no call."""
    usage = getattr(exc, "usage", None)
    return usage if isinstance(usage, Usage) and usage.calls else None


def no_progress(message: str) -> None:
    """A Progress that drops the messages (unit tests, benchmarks)."""
