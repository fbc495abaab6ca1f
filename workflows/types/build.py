"""BuildWorkflow's input and result and its activities' inputs and outputs: one dataclass each, so
fields can be added later (with defaults) without breaking recorded histories. Times travel as
ISO-8601 strings."""

from dataclasses import dataclass, field

from workflows.types.preview import PreviewPolicy

WORKFLOW_NAME = "BuildWorkflow"
STATUS_QUERY = "status"
CANCEL_SIGNAL = "cancel"


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
    sandbox_host: str | None = None  # the local sandbox host that has it (None on E2B)
    preview_url: str | None = None
    build_version: str | None = None
    workspace_path: str | None = None
    debug_id: str | None = None
    error_message: str | None = None


@dataclass
class CancelRequest:
    reason: str = "cancelled by user"


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
    then: str = ""  # a stage the build moves on to in the same write (STARTING, then SCAFFOLD)


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
    # The stage's first activity records its transition (CODE, DEPS, CHECKS), instead of a local
    # activity before it. Recorded histories carry False: their builds replay the old way.
    transitions_in_activities: bool = False


@dataclass
class StartInput:
    """The build's first write (STARTING, then SCAFFOLD) and, for a new app, SCAFFOLD's work: the
    runner's initial state from `scaffold` (a change's SCAFFOLD is prepare_change's)."""

    transition: TransitionInput
    scaffold: ScaffoldState | None = None


@dataclass
class FailureInfo:
    """Why an app failed, for the fix loop (bounded and redacted by the activity)."""

    stage: str
    command: str
    exit_code: int | None
    output: str
    digest: str  # of the normalised output: the same failure twice stops the loop


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
    entered: list[TransitionInput] = field(default_factory=list)  # stages to record before the work


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
    entered: list[TransitionInput] = field(default_factory=list)  # stages to record before the work


@dataclass
class SyncFilesResult:
    written: int
    deleted: int
    dependencies_changed: bool


@dataclass
class SandboxInput:
    build_id: str
    project_id: str
    workspace_path: str
    files: list[FileManifestEntry] = field(default_factory=list)
    sandbox_id: str | None = None
    reinstall: bool = False  # install again even if this sandbox installed before (a fix changed them)
    serve: int = 0  # 0: the build's own sandbox; n: the n-th time its version is served again
    entered: list[TransitionInput] = field(default_factory=list)  # stages to record before the work
    attempt: int = 0  # the build's fix attempt (1 = the first try); 0: the activity reads it from the job


@dataclass
class SandboxInfo:
    sandbox_id: str
    workspace_path: str
    task_queue: str = ""  # the queue of the sandbox's host (its workers); empty: any worker reaches it (E2B)
    host: str = ""  # the sandbox host's id (local hosts)


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
    version_url: str = ""  # the version's stable URL; empty where no gateway serves versions
    preview: PreviewPolicy | None = None  # set with version_url: the preview workflow's policy


@dataclass
class KillSandboxInput:
    build_id: str
    sandbox_id: str | None = None
