"""Workflows call activities by name: the options table must name exactly the activities a worker
registers (besides the local ones, which run with the DB-write options), so a renamed activity fails
here, not in a running build."""

from __future__ import annotations

from activities.build import BuildActivities
from activities.preview import PreviewActivities
from workflows.build import ACTIVITY_OPTIONS, HOST_ROUTED, activity_options

LOCAL = {"start_build", "record_transition", "record_attempt", "finish_build", "record_preview"}


def _registered() -> set[str]:
    activities = BuildActivities(repo=None, sandboxes=None, runners={}).all()  # type: ignore[arg-type]
    activities += PreviewActivities(repo=None, sandboxes=None).all()  # type: ignore[arg-type]
    return {fn.__temporal_activity_definition.name for fn in activities}


def test_options_table_names_every_registered_activity():
    assert set(ACTIVITY_OPTIONS) == _registered() - LOCAL
    assert HOST_ROUTED <= set(ACTIVITY_OPTIONS)


def test_sandbox_activities_go_to_the_sandboxs_host():
    routed = activity_options("start_and_check", "genloop-builds@host-a")
    assert routed["task_queue"] == "genloop-builds@host-a" and routed["schedule_to_start_timeout"]
    assert "task_queue" not in activity_options("provision_sandbox", "genloop-builds@host-a")  # any worker's host
    assert "task_queue" not in activity_options("start_and_check", "")  # E2B: every worker reaches it
