"""`python -m tests.reliability.worker_with_doubles`: exactly `genloop worker` (genloop.cli.worker.run_worker:
settings from the environment, the real repository, sandbox client, Temporal connection, periodic
orphan sweep, SIGTERM handling) with the fault-injection suite's runner doubles registered beside the
production runners. Runner doubles stand in for the LLM only; nothing else is replaced.

GENLOOP_TEST_GATE_DIR: the directory GatedRunnerDouble watches for its per-build gate files.
GENLOOP_TEST_LATE_BINDING_S: seconds the late-binding app sleeps on its first launch in a sandbox (600).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from genloop.cli.worker import run_worker
from genloop.settings import get_settings
from tests.helpers import doubles

GATE_DIR_ENV = "GENLOOP_TEST_GATE_DIR"
LATE_BINDING_ENV = "GENLOOP_TEST_LATE_BINDING_S"  # how long the late-binding app waits on its first launch


def runner_doubles() -> dict[str, Any]:
    return {
        "gated": doubles.GatedRunnerDouble(os.environ.get(GATE_DIR_ENV, "/nonexistent-gate-dir")),
        "slow-install": doubles.SlowInstallRunnerDouble(),
        "late-binding": doubles.LateBindingAppRunnerDouble(int(os.environ.get(LATE_BINDING_ENV, "600"))),
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None  # as `genloop worker --only`
    asyncio.run(run_worker(get_settings(), extra_runners=runner_doubles(), only=only))
    return 0

if __name__ == "__main__":
    sys.exit(main())
