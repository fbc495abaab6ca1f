"""PreviewWorkflow's input, signal, updates and query, and its activities' inputs."""

from dataclasses import dataclass


@dataclass
class PreviewPolicy:
    """How long a version stays awake and served (settings.preview, decided by the worker)."""

    idle_pause_s: float = 300
    keep_awake: int = 0
    retention_s: float = 0  # 0: served forever
    retry_failed_s: float = 600


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
    task_queue: str = ""  # the sandbox host's queue (local hosts); empty: any worker reaches the sandbox


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
