"""The one error taxonomy. Pure (no I/O imports): the workflow, activities, API and CLI share it.

Each kind says whether a retry can help and what the user is told. Activities raise
`GenloopError(kind, detail)`; `to_application_error` turns it into the Temporal failure whose `type`
is the kind's name, so retry policies list permanent kinds in `non_retryable_error_types`.
"""

from __future__ import annotations

import re
from enum import Enum

FRIENDLY_DEFAULT = "The preview environment could not be started. Please try again."


class ErrorKind(str, Enum):
    # transient: a retry may succeed
    RATE_LIMITED = "RateLimited"
    SERVICE_BUSY = "ServiceBusy"
    SANDBOX_UNREACHABLE = "SandboxUnreachable"
    DATABASE_UNAVAILABLE = "DatabaseUnavailable"
    NETWORK = "NetworkError"
    # A bug in genloop (an exception no layer below raised on purpose): retried, so a worker with the
    # fix picks the build up, and named as what it is.
    INTERNAL_ERROR = "InternalError"
    # permanent: retrying repeats the failure
    AUTH_FAILED = "AuthFailed"
    INVALID_INPUT = "InvalidInput"
    BAD_GENERATED_FILES = "BadGeneratedFiles"
    APP_CHECK_FAILED = "AppCheckFailed"
    DEPENDENCY_INSTALL_FAILED = "DependencyInstallFailed"
    SANDBOX_GONE = "SandboxGone"
    RUNNER_FAILED = "RunnerFailed"
    BUDGET_REACHED = "BudgetReached"  # the build's model-token budget is spent
    ILLEGAL_TRANSITION = "IllegalTransition"
    NOT_FOUND = "NotFound"
    CONFLICT = "Conflict"

    @property
    def transient(self) -> bool:
        return self in _TRANSIENT

    @property
    def friendly(self) -> str:
        return _FRIENDLY.get(self, FRIENDLY_DEFAULT)


_TRANSIENT = frozenset(
    {
        ErrorKind.RATE_LIMITED,
        ErrorKind.SERVICE_BUSY,
        ErrorKind.SANDBOX_UNREACHABLE,
        ErrorKind.DATABASE_UNAVAILABLE,
        ErrorKind.NETWORK,
        ErrorKind.INTERNAL_ERROR,
    }
)

_FRIENDLY = {
    ErrorKind.BAD_GENERATED_FILES: "The generated app could not be prepared safely. Please try again.",
    ErrorKind.APP_CHECK_FAILED: "The generated app did not start correctly. Please try again.",
    ErrorKind.DEPENDENCY_INSTALL_FAILED: "The app's dependencies could not be installed. Please try again.",
    ErrorKind.RUNNER_FAILED: "We could not generate code for this request. Please try again.",
    ErrorKind.BUDGET_REACHED: "This build reached its token budget before the app was finished.",
    ErrorKind.INVALID_INPUT: "The request could not be processed. Please check it and try again.",
    ErrorKind.NOT_FOUND: "The version this build starts from no longer exists.",
    ErrorKind.CONFLICT: "This change could not be built on the version it names.",
}

_URL_CREDENTIALS = re.compile(r"(?P<prefix>[a-zA-Z][\w+.-]*://[^:/@\s]*):[^@\s]*@")
_URL_QUERY = re.compile(r"(?P<url>[a-zA-Z][\w+.-]*://[^\s?#]*)\?[^\s#]*")
# NAME=value / name: value where the name says it holds a secret (DB_PASSWORD=, api_key:, GITHUB_TOKEN=).
_KEYWORD_PASSWORD = re.compile(
    r"(?i)(?P<prefix>\b[\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)[\w.-]*[\"']?\s*[=:]\s*)"
    r"(?!\*\*\*)[^\s,;]+"
)
_BEARER = re.compile(r"(?i)(?P<prefix>\bbearer\s+)[\w.~+/=-]+")
# Provider-style keys printed bare (sk-..., sk-ant-...): long enough not to hit ordinary words.
_BARE_KEY = re.compile(r"\b(?P<prefix>sk-(?:ant-)?)[A-Za-z0-9_-]{16,}")


# Everything below needs one of these; a line without any (most build output) is returned at once.
_SUSPECT = re.compile(r"://|sk-|(?i:password|passwd|secret|token|api[_-]?key|access[_-]?key|bearer)")


def redact_secrets(text: str) -> str:
    """Strip what may carry a secret from a message bound for logs, errors or users: URL passwords,
    URL query strings (tokens, signed parameters), `password=...`-like pairs, bearer tokens and
    provider keys. Build logs go through it line by line, so it must stay cheap."""
    if not _SUSPECT.search(text):
        return text
    text = _URL_CREDENTIALS.sub(r"\g<prefix>:***@", text)
    text = _URL_QUERY.sub(r"\g<url>", text)
    text = _KEYWORD_PASSWORD.sub(r"\g<prefix>***", text)
    text = _BEARER.sub(r"\g<prefix>***", text)
    return _BARE_KEY.sub(r"\g<prefix>***", text)


PERMANENT_ERROR_TYPES = tuple(k.value for k in ErrorKind if not k.transient)


class GenloopError(Exception):
    """An error of a known kind. `detail` is internal (support and logs), never shown to users.
    `retry_after_s`: for transient kinds, how long the other side asked us to wait (Retry-After).
    `failure`: for the app's own failures (a failed install, an app that does not start), what the
    fix loop tells the runner: {"stage", "command", "exit_code", "output"} (bounded, redacted)."""

    def __init__(
        self, kind: ErrorKind, detail: str = "", *, retry_after_s: float | None = None, failure: dict | None = None
    ) -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.failure = failure

    def __repr__(self) -> str:
        return f"GenloopError({self.kind.value}, {self.detail!r})"

    @property
    def friendly(self) -> str:
        return self.kind.friendly


def to_application_error(err: GenloopError):
    # Imported lazily so this module stays importable where temporalio is not wanted.
    from datetime import timedelta

    from temporalio.exceptions import ApplicationError

    # A provider's Retry-After overrides the retry policy's backoff for this one retry.
    delay = timedelta(seconds=err.retry_after_s) if err.retry_after_s and err.kind.transient else None
    details: dict = {"kind": err.kind.value, "friendly": err.friendly}
    if err.failure is not None:
        details["failure"] = err.failure
    return ApplicationError(
        err.detail or err.kind.value,
        details,
        type=err.kind.value,
        non_retryable=not err.kind.transient,
        next_retry_delay=delay,
    )
