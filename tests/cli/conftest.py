"""Fixtures of the CLI tests: a fresh data dir and free ports for a `genloop up` of the test's own."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from sandbox_host.testing import free_port


@pytest.fixture
def stack_env():
    # Sandboxes run as unprivileged uids: the data dir's parents must be traversable (not tmp_path).
    data_dir = Path(tempfile.mkdtemp(prefix="genloop-cli-"))
    os.chmod(data_dir, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "GENLOOP_", "E2B_"))}
    env.update(
        GENLOOP_DATA_DIR=str(data_dir),
        GENLOOP_TEMPORAL_PORT=str(free_port()),
        GENLOOP_TEMPORAL_UI_PORT=str(free_port()),
        GENLOOP_SANDBOX_HOST_PORT=str(free_port()),
        GENLOOP_API_PORT=str(free_port()),
        GENLOOP_WORKER_SWEEP_INTERVAL_S="0",
    )
    yield env
    shutil.rmtree(data_dir, ignore_errors=True)
