"""What every runner is: the `Runner` protocol and what a runner can do.

The protocol is the seed's: `run(state) -> state`, where the returned state carries
`working_files: {path: {path, original_content, new_content, change_type}}`. Runners import this
module, never each other or the factory (`activities.runners`), so the package has no import circle.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar, Protocol

RunnerState = dict[str, Any]


class Capability(str, Enum):
    NEW_APP = "new_app"  # write an app from a goal
    CHANGE = "change"  # apply a free-text change request to existing files
    FIX = "fix"  # repair files from a failing command's output


class Runner(Protocol):
    capabilities: ClassVar[frozenset[Capability]]

    async def run(self, state: RunnerState) -> RunnerState: ...


def working_file(path: str, content: str, change_type: str = "create") -> dict[str, Any]:
    return {"path": path, "original_content": None, "new_content": content, "change_type": change_type}
