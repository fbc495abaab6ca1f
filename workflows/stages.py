"""The build stage machine: one table of allowed transitions, used by the workflow and validated on
every persisted transition. Pure: imported by workflow code and by persistence alike."""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    QUEUED = "queued"
    STARTING = "starting"
    SCAFFOLD = "scaffold"
    CODE = "code"
    DEPS = "deps"
    CHECKS = "checks"
    READY = "ready"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def label(self) -> str:
        return LABELS[self]

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Stage.READY, Stage.FAILED, Stage.CANCELLED})

# The forward path, and three backward edges: a fix attempt goes back to CODE when the app's
# dependencies do not install (`deps -> code`) or the app does not start (`checks -> code`); a build
# whose sandbox host was lost goes back to DEPS on another host (`checks -> deps`).
PIPELINE = (Stage.STARTING, Stage.SCAFFOLD, Stage.CODE, Stage.DEPS, Stage.CHECKS, Stage.READY)

_ENDINGS = {Stage.FAILED, Stage.CANCELLED}
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.QUEUED: frozenset({Stage.STARTING, *_ENDINGS}),
    Stage.STARTING: frozenset({Stage.SCAFFOLD, *_ENDINGS}),
    Stage.SCAFFOLD: frozenset({Stage.CODE, *_ENDINGS}),
    Stage.CODE: frozenset({Stage.DEPS, *_ENDINGS}),
    Stage.DEPS: frozenset({Stage.CHECKS, Stage.CODE, *_ENDINGS}),
    Stage.CHECKS: frozenset({Stage.READY, Stage.CODE, Stage.DEPS, *_ENDINGS}),
    Stage.READY: frozenset(),
    Stage.FAILED: frozenset(),
    Stage.CANCELLED: frozenset(),
}

LABELS: dict[Stage, str] = {
    Stage.QUEUED: "Queued...",
    Stage.STARTING: "Starting build...",
    Stage.SCAFFOLD: "Preparing the project...",
    Stage.CODE: "Writing code...",
    Stage.DEPS: "Installing dependencies...",
    Stage.CHECKS: "Checking the app...",
    Stage.READY: "Your app is ready",
    Stage.FAILED: "Build failed",
    Stage.CANCELLED: "Build cancelled",
}


def is_allowed(current: Stage, target: Stage) -> bool:
    return target in TRANSITIONS[current]
