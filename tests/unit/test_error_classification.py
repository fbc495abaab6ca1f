"""What an exception inside an activity becomes: one ErrorKind, retried or not by the workflow's
retry policies. The SDK's and the network's failures keep their meaning; anything else is a bug in
genloop and says so (retried, so a worker with the fix picks the build up)."""

from __future__ import annotations

import e2b
import httpx
import pytest
from temporalio.exceptions import ApplicationError

from activities.build import failures_as_application_errors
from activities.sandbox import classify_sandbox_error
from genloop.errors import PERMANENT_ERROR_TYPES, ErrorKind, GenloopError


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (e2b.RateLimitException("slow down"), ErrorKind.RATE_LIMITED),
        (e2b.AuthenticationException("bad key"), ErrorKind.AUTH_FAILED),
        (e2b.SandboxNotFoundException("gone"), ErrorKind.SANDBOX_GONE),
        (e2b.TimeoutException("late"), ErrorKind.SANDBOX_UNREACHABLE),
        (e2b.SandboxException("something else from the SDK"), ErrorKind.SANDBOX_UNREACHABLE),
        (httpx.ConnectError("refused"), ErrorKind.SANDBOX_UNREACHABLE),
        (httpx.DecodingError("garbled"), ErrorKind.SANDBOX_UNREACHABLE),
        (ConnectionResetError("reset"), ErrorKind.SANDBOX_UNREACHABLE),
        (AttributeError("'NoneType' object has no attribute 'sandbox_id'"), ErrorKind.INTERNAL_ERROR),
        (KeyError("path"), ErrorKind.INTERNAL_ERROR),
    ],
)
def test_each_failure_gets_its_kind(exc, kind):
    assert classify_sandbox_error(exc).kind is kind


async def test_a_bug_leaves_the_activity_as_a_retried_internal_error():
    @failures_as_application_errors
    async def buggy() -> None:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    with pytest.raises(ApplicationError) as raised:
        await buggy()
    assert raised.value.type == ErrorKind.INTERNAL_ERROR.value and not raised.value.non_retryable
    assert ErrorKind.INTERNAL_ERROR.value not in PERMANENT_ERROR_TYPES
    assert isinstance(raised.value.__cause__, TypeError)  # the traceback the worker logs is the bug's


async def test_a_genloop_error_keeps_its_kind():
    @failures_as_application_errors
    async def invalid() -> None:
        raise GenloopError(ErrorKind.INVALID_INPUT, "empty goal")

    with pytest.raises(ApplicationError) as raised:
        await invalid()
    assert raised.value.type == ErrorKind.INVALID_INPUT.value and raised.value.non_retryable
