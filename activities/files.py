"""Validation of generated files before anything is written anywhere."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from genloop.errors import ErrorKind, GenloopError

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_TOTAL_BYTES = 50 * 1024 * 1024
MAX_FILES = 2000
MAX_PATH_LEN = 255


@dataclass(frozen=True)
class GeneratedFile:
    path: str
    content: bytes
    change_type: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


def _bad(detail: str) -> GenloopError:
    return GenloopError(ErrorKind.BAD_GENERATED_FILES, detail)


def safe_relative_path(path: object) -> str:
    """A normalized path inside the workspace, or BadGeneratedFiles."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_LEN:
        raise _bad(f"invalid file path {path!r}")
    if "\x00" in path or "\\" in path:
        raise _bad(f"file path {path!r} contains a forbidden character")
    if path.startswith("/") or path.startswith("~"):
        raise _bad(f"file path {path!r} is absolute; generated files must be relative to the workspace")
    parts = path.split("/")
    if any(part == ".." for part in parts):
        raise _bad(f"file path {path!r} escapes the workspace")
    normalized = posixpath.normpath(path)
    if normalized in (".", "") or normalized.startswith("../"):
        raise _bad(f"file path {path!r} does not name a file inside the workspace")
    return normalized


def validate_working_files(working_files: object) -> list[GeneratedFile]:
    """Check the Runner's `working_files` mapping; every violation is permanent (non-retryable)."""
    if not isinstance(working_files, Mapping) or not working_files:
        raise _bad("the runner produced no files")
    if len(working_files) > MAX_FILES:
        raise _bad(f"the runner produced {len(working_files)} files (limit {MAX_FILES})")
    files: list[GeneratedFile] = []
    seen: set[str] = set()
    total = 0
    for key, entry in working_files.items():
        if not isinstance(entry, Mapping):
            raise _bad(f"working file {key!r} is not a mapping")
        path = safe_relative_path(entry.get("path", key))
        if path in seen:
            raise _bad(f"file path {path!r} appears twice")
        seen.add(path)
        change_type = str(entry.get("change_type") or "create")
        if change_type == "delete":
            continue
        content: Any = entry.get("new_content")
        if content is None:
            # The origin codebase wrote empty files by reading the wrong key; refuse instead.
            raise _bad(f"file {path!r} has no new_content")
        data = content.encode("utf-8") if isinstance(content, str) else content
        if not isinstance(data, bytes):
            raise _bad(f"file {path!r} content is {type(content).__name__}, not text")
        if len(data) > MAX_FILE_BYTES:
            raise _bad(f"file {path!r} is {len(data)} bytes (limit {MAX_FILE_BYTES})")
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise _bad(f"generated files exceed {MAX_TOTAL_BYTES} bytes in total")
        files.append(GeneratedFile(path=path, content=data, change_type=change_type))
    return sorted(files, key=lambda f: f.path)
