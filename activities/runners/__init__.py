"""Runners turn a goal into files. This module is the one factory: the only place that knows every
runner. The protocol lives in `base`, each runner in a module of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from activities.runners.base import (
    Capability,
    Failure,
    Progress,
    Runner,
    RunnerResult,
    RunnerTask,
    Usage,
    no_progress,
    usage_of,
)
from activities.runners.template import TemplateRunner
from genloop.errors import ErrorKind, GenloopError

if TYPE_CHECKING:
    from genloop.settings import Settings

__all__ = [
    "Capability", "Failure", "Progress", "Runner", "RunnerResult", "RunnerTask", "TemplateRunner", "Usage",
    "build_runner", "capabilities_of", "no_progress", "usage_of",
]

# What each runner kind can do, known without building one (the API checks requests against it).
# Each runner class declares the same set; tests/unit checks they agree.
CAPABILITIES: dict[str, frozenset[Capability]] = {
    "template": TemplateRunner.capabilities,
    "llm": frozenset(Capability),
}


def capabilities_of(kind: str) -> frozenset[Capability]:
    return CAPABILITIES.get(kind, frozenset())


def build_runner(kind: str, settings: Settings) -> Runner:
    if kind == "template":
        return TemplateRunner()
    if kind == "llm":
        from activities.runners.llm import LLMRunner  # only deployments with a model key need it

        return LLMRunner.from_settings(settings)
    raise GenloopError(ErrorKind.INVALID_INPUT, f"unknown runner {kind!r}")
