"""Determinism: recorded histories (tests/histories/*.json, exported with
`temporal workflow show -w ID --output json`) must replay against the current workflow code.
Change workflow logic behind workflow.patched(...) to keep these green."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.build import BuildWorkflow
from workflows.preview import PreviewWorkflow
from workflows.project import ProjectWorkflow

HISTORIES = sorted((Path(__file__).parent.parent / "histories").glob("*.json"))


def test_recorded_histories_exist():
    names = {p.stem for p in HISTORIES}
    assert {"build_ready", "build_failed", "build_cancelled", "build_fixed", "build_change", "project_changes",
            "preview_lifecycle"} <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path):
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await Replayer(workflows=[BuildWorkflow, ProjectWorkflow, PreviewWorkflow]).replay_workflow(history)
