"""The worker writes its workflow modules' bytecode when the interpreter would not (the workflow
sandbox re-imports them for every workflow run), and goes without where it cannot write."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

from genloop.cli.worker import write_workflow_bytecode


@pytest.fixture
def workflow_module(tmp_path, monkeypatch):
    (tmp_path / "bytecode_probe_wf.py").write_text("class ProbeWorkflow:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    module = importlib.import_module("bytecode_probe_wf")
    yield module
    sys.modules.pop("bytecode_probe_wf", None)


def test_bytecode_is_written_when_the_interpreter_would_not(workflow_module):
    cached = importlib.util.cache_from_source(workflow_module.__file__)
    assert not os.path.exists(cached)  # PYTHONDONTWRITEBYTECODE: the import wrote none

    write_workflow_bytecode([workflow_module.ProbeWorkflow])

    assert os.path.exists(cached)
    spec = importlib.util.spec_from_file_location("probe_again", workflow_module.__file__)
    assert spec.loader.get_code("probe_again") is not None  # the loader accepts it


def test_where_it_cannot_be_written_the_worker_goes_without(workflow_module, tmp_path):
    (tmp_path / "__pycache__").write_text("a file where the directory would go")  # fails even for root

    write_workflow_bytecode([workflow_module.ProbeWorkflow])  # no error

    assert (tmp_path / "__pycache__").is_file()
