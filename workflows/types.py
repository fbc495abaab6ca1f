"""Workflow and activity inputs/outputs: one dataclass each, so fields can be added later (with
defaults) without breaking recorded histories. Times travel as ISO-8601 strings."""

from __future__ import annotations

from dataclasses import dataclass, field

WORKFLOW_NAME = "BuildWorkflow"
STATUS_QUERY = "status"
CANCEL_SIGNAL = "cancel"

PROJECT_WORKFLOW_NAME = "ProjectWorkflow"
SUBMIT_UPDATE = "submit"
CANCEL_PENDING_UPDATE = "cancel_pending"
PROJECT_STATUS_QUERY = "status"


def project_workflow_id(project_id: str) -> str:
    return f"project-{project_id}"


@dataclass
class FileEdit:
    """One explicit edit of a change: a file's new content (in the blob store, by digest) or its deletion."""

    path: str
    digest: str | None = None
    delete: bool = False


@dataclass
class BuildRequest:
    build_id: str
    project_id: str
    goal: str  # a new app's goal; for a change, filled in from its base at SCAFFOLD
    runner: str = "template"
    kind: str = "new"  # "new" | "change"
    base_build_id: str | None = None  # change: the build to start from; None: the project's newest READY
    change: str = ""  # change: what the runner is asked to do (empty: edits or a restore only)
    edits: list[FileEdit] = field(default_factory=list)
    stack: str = "python"
    note: str = ""  # why this base (the project workflow explains a fallback)


@dataclass
class ChangeRequest:
    """ProjectWorkflow's `submit` update: one change to build on the project's line."""

    build_id: str
    runner: str = "template"
    change: str = ""
    edits: list[FileEdit] = field(default_factory=list)
    base_build_id: str | None = None  # explicit base; None: the result of the change before it
    stack: str = "python"
    summary: str = ""  # the Web UI's one-liner for the child build


@dataclass
class SubmitResult:
    build_id: str
    position: int  # 0: building now; n: the n-th change waiting


@dataclass
class CancelPendingRequest:
    build_id: str
    reason: str = "cancelled by user"


@dataclass
class PreviousChange:
    build_id: str
    status: str


@dataclass
class ProjectInput:
    project_id: str
    task_queue: str = ""  # where child builds run; empty: the project workflow's own queue
    pending: list[ChangeRequest] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # build ids already accepted (dedup across continue-as-new)
    previous: PreviousChange | None = None


@dataclass
class ProjectStatus:
    project_id: str
    running: str | None
    pending: list[str]


@dataclass
class BuildResult:
    status: str
    sandbox_id: str | None = None
    preview_url: str | None = None  # the sandbox's own URL
    version_url: str | None = None  # the version's stable URL (the gateway's), when there is one
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
    attempt: int = 1
    max_attempts: int = 1
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
    """SCAFFOLD output: the Runner's initial state, and what this worker allows the build."""

    session_id: str  # the build id (field name kept: recorded histories carry it)
    project_path: str
    goal: str
    project_id: str
    runner: str = "template"
    can_fix: bool = False  # the runner can repair failing code
    fix_attempts: int = 0  # how many times it may try (runner.fix_attempts)


@dataclass
class FailureInfo:
    """Why an app failed, for the fix loop (bounded and redacted by the activity)."""

    stage: str
    command: str
    exit_code: int | None
    output: str
    digest: str  # of the normalised output: the same failure twice stops the loop


@dataclass
class CodeRequest:
    """CODE input: what the runner is asked to write."""

    build_id: str
    project_id: str
    goal: str
    runner: str = "template"
    kind: str = "new_app"  # new_app | change | fix
    stack: str = "python"
    files: list[FileManifestEntry] = field(default_factory=list)  # the current files (change, fix)
    change: str = ""
    failure: FailureInfo | None = None
    attempt: int = 1


@dataclass
class PrepareChangeInput:
    build_id: str
    project_id: str
    base_build_id: str | None
    edits: list[FileEdit] = field(default_factory=list)
    note: str = ""


@dataclass
class PreparedChange:
    """SCAFFOLD output of a change: its base, and the base's files with the explicit edits applied."""

    goal: str
    base_build_id: str
    base_version: str | None
    code: CodeResult
    scaffold: ScaffoldState


@dataclass
class AttemptInput:
    build_id: str
    attempt: int  # the attempt that failed (1 = the first try)
    max_attempts: int
    failure: FailureInfo
    at: str = ""


@dataclass
class SyncFilesInput:
    build_id: str
    sandbox_id: str
    workspace_path: str
    old_files: list[FileManifestEntry]
    new_files: list[FileManifestEntry]


@dataclass
class SyncFilesResult:
    written: int
    deleted: int
    dependencies_changed: bool


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
    summary: str = ""  # the runner's account of what it changed
    changed: bool = True  # False: the runner returned no change (a fix that fixes nothing)


@dataclass
class SandboxInput:
    build_id: str
    project_id: str
    workspace_path: str
    files: list[FileManifestEntry] = field(default_factory=list)
    sandbox_id: str | None = None
    reinstall: bool = False  # install again even if this sandbox installed before (a fix changed them)
    serve: int = 0  # 0: the build's own sandbox; n: the n-th time its version is served again


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
class PreviewPolicy:
    """How long a version stays awake and served (settings.preview, decided by the worker)."""

    idle_pause_s: float = 300
    keep_awake: int = 0
    retention_s: float = 0  # 0: served forever
    retry_failed_s: float = 600


@dataclass
class FinishResult:
    build_version: str
    version_url: str = ""  # the version's stable URL; empty where no gateway serves versions
    preview: PreviewPolicy | None = None  # set with version_url: the preview workflow's policy


@dataclass
class KillSandboxInput:
    build_id: str
    sandbox_id: str | None = None


# --- previews: one long-lived workflow per served version ---

PREVIEW_WORKFLOW_NAME = "PreviewWorkflow"
TOUCH_SIGNAL = "touch"
WAKE_UPDATE = "wake"
PAUSE_UPDATE = "pause"
PREVIEW_STATUS_QUERY = "status"


def preview_workflow_id(build_id: str) -> str:
    return f"preview-{build_id}"


class PreviewState:
    LIVE = "live"
    PAUSED = "paused"
    WAKING = "waking"
    REMOVED = "removed"
    FAILED = "failed"  # could not be served again; answers 503 until retry_failed_s passes


@dataclass
class PreviewInput:
    build_id: str
    project_id: str
    policy: PreviewPolicy
    sandbox_id: str | None = None  # None: nothing serves it (the next wake serves it again)
    sandbox_preview_url: str | None = None
    state: str = PreviewState.LIVE
    ready_at: str = ""  # ISO-8601: when the version became READY (retention counts from here)
    serve: int = 0
    failed_at: str = ""
    failure: str = ""
    debug_id: str = ""


@dataclass
class WakeRequest:
    reason: str = "a request arrived"
    unreachable: str | None = None  # the sandbox the gateway could not reach: a live version needs waking too


@dataclass
class WakeResult:
    state: str
    sandbox_preview_url: str | None = None
    message: str = ""  # the friendly reason when it cannot be served
    debug_id: str = ""


@dataclass
class PreviewStatus:
    build_id: str
    state: str
    sandbox_id: str | None
    sandbox_preview_url: str | None
    serve: int
    last_activity: str


@dataclass
class StayAwakeInput:
    build_id: str
    newest: int  # the policy's keep_awake


@dataclass
class PreviewChange:
    """What record_preview writes: the version's state and the sandbox serving it."""

    build_id: str
    state: str
    sandbox_id: str | None = None
    sandbox_preview_url: str | None = None
    woken_at: str = ""
