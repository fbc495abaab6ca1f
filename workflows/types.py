"""Workflow and activity inputs/outputs: one dataclass each, so fields can be added later (with
defaults) without breaking recorded histories. Times travel as ISO-8601 strings."""

from __future__ import annotations

from dataclasses import dataclass, field

WORKFLOW_NAME = "BuildWorkflow"
STATUS_QUERY = "status"
CANCEL_SIGNAL = "cancel"


@dataclass
class BuildRequest:
    build_id: str
    project_id: str
    goal: str
    runner: str = "template"


@dataclass
class BuildResult:
    status: str
    sandbox_id: str | None = None
    preview_url: str | None = None
    build_version: str | None = None
    workspace_path: str | None = None
    debug_id: str | None = None
    message: str = ""


@dataclass
class Transition:
    stage: str
    at: str  # ISO-8601, from workflow.now()
    message: str = ""


@dataclass
class BuildStatus:
    """What the `status` query answers."""

    build_id: str
    project_id: str
    stage: str
    label: str
    message: str = ""
    transitions: list[Transition] = field(default_factory=list)
    sandbox_id: str | None = None
    preview_url: str | None = None
    build_version: str | None = None
    workspace_path: str | None = None
    debug_id: str | None = None
    error_message: str | None = None


@dataclass
class CancelRequest:
    reason: str = "cancelled by user"


# --- activity inputs / outputs ---


@dataclass
class TransitionInput:
    build_id: str
    stage: str
    message: str = ""
    at: str = ""
    project_id: str = ""
    goal: str = ""
    workflow_id: str = ""
    run_id: str = ""
    error_message: str | None = None
    error_detail: str | None = None
    debug_id: str | None = None


@dataclass
class ScaffoldState:
    """SCAFFOLD output: the Runner's initial state."""

    session_id: str
    project_path: str
    goal: str
    project_id: str
    runner: str = "template"


@dataclass
class FileManifestEntry:
    path: str
    digest: str  # sha256 of the content, the claim-check key
    size: int
    change_type: str = "create"


@dataclass
class CodeResult:
    """CODE output: the manifest only. Contents live in the blob store, keyed by digest."""

    files: list[FileManifestEntry]
    manifest_digest: str
    total_bytes: int


@dataclass
class SandboxInput:
    build_id: str
    project_id: str
    workspace_path: str
    files: list[FileManifestEntry] = field(default_factory=list)
    sandbox_id: str | None = None


@dataclass
class SandboxInfo:
    sandbox_id: str
    workspace_path: str


@dataclass
class ChecksResult:
    preview_url: str
    port: int


@dataclass
class FinishInput:
    build_id: str
    project_id: str
    sandbox_id: str
    preview_url: str
    workspace_path: str
    at: str = ""


@dataclass
class FinishResult:
    build_version: str


@dataclass
class KillSandboxInput:
    build_id: str
    sandbox_id: str | None = None
