"""ProjectWorkflow's input, updates and query."""

from dataclasses import dataclass, field

from workflows.types.build import FileEdit

PROJECT_WORKFLOW_NAME = "ProjectWorkflow"
SUBMIT_UPDATE = "submit"
CANCEL_PENDING_UPDATE = "cancel_pending"
PROJECT_STATUS_QUERY = "status"


def project_workflow_id(project_id: str) -> str:
    return f"project-{project_id}"


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
