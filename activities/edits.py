"""The one place file changes are applied: a runner's output, a user's edits, a fix. Every path and
size is validated here before anything is stored or written, and a rejected change writes nothing.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Mapping

from genloop.errors import ErrorKind, GenloopError

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_TOTAL_BYTES = 50 * 1024 * 1024
MAX_FILES = 2000
MAX_PATH_LEN = 255

FileSet = dict[str, bytes]  # path (normalized, relative to the workspace) -> content


def digest_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def safe_relative_path(path: object, kind: ErrorKind = ErrorKind.BAD_GENERATED_FILES) -> str:
    """A normalized path inside the workspace, or GenloopError(kind)."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_LEN:
        raise GenloopError(kind, f"invalid file path {path!r}")
    if "\x00" in path or "\\" in path:
        raise GenloopError(kind, f"file path {path!r} contains a forbidden character")
    if path.startswith("/") or path.startswith("~"):
        raise GenloopError(kind, f"file path {path!r} is absolute; files must be relative to the workspace")
    if any(part == ".." for part in path.split("/")):
        raise GenloopError(kind, f"file path {path!r} escapes the workspace")
    normalized = posixpath.normpath(path)
    if normalized in (".", "") or normalized.startswith("../"):
        raise GenloopError(kind, f"file path {path!r} does not name a file inside the workspace")
    return normalized


class EditMiss(ValueError):
    """A string edit whose old text is not in the file exactly once (told back to the model)."""


def replace_once(text: str, old: str, new: str, path: str) -> str:
    count = text.count(old) if old else 0
    if count != 1:
        where = "does not occur" if count == 0 else f"occurs {count} times"
        raise EditMiss(f"in {path}: the text to replace {where}; it must occur exactly once")
    return text.replace(old, new, 1)


def apply_changes(
    base: Mapping[str, bytes],
    writes: Mapping[str, str | bytes],
    deletes: Iterable[str] = (),
    *,
    kind: ErrorKind = ErrorKind.BAD_GENERATED_FILES,
    strict_deletes: bool = False,
) -> FileSet:
    """`base` with `writes` (full contents) and `deletes` applied, validated as a whole: every path
    safe, every file and the total within limits, not too many files, never empty. `kind` is the
    error for a violation (BAD_GENERATED_FILES for runner output, INVALID_INPUT for a user's
    edits). A delete of a path that does not exist is an error only with `strict_deletes`."""
    result: FileSet = dict(base)
    written: set[str] = set()
    for raw_path, content in writes.items():
        path = safe_relative_path(raw_path, kind)
        if path in written:
            raise GenloopError(kind, f"file path {path!r} appears twice")
        written.add(path)
        data = content.encode("utf-8") if isinstance(content, str) else content
        if not isinstance(data, bytes):
            raise GenloopError(kind, f"file {path!r} content is {type(content).__name__}, not text")
        if len(data) > MAX_FILE_BYTES:
            raise GenloopError(kind, f"file {path!r} is {len(data)} bytes (limit {MAX_FILE_BYTES})")
        result[path] = data
    for raw_path in deletes:
        path = safe_relative_path(raw_path, kind)
        if path in written:
            raise GenloopError(kind, f"file {path!r} is both written and deleted")
        if result.pop(path, None) is None and strict_deletes:
            raise GenloopError(kind, f"cannot delete {path!r}: no such file")
    if not result:
        raise GenloopError(kind, "the change leaves no files")
    if len(result) > MAX_FILES:
        raise GenloopError(kind, f"{len(result)} files (limit {MAX_FILES})")
    total = sum(len(c) for c in result.values())
    if total > MAX_TOTAL_BYTES:
        raise GenloopError(kind, f"files exceed {MAX_TOTAL_BYTES} bytes in total")
    return dict(sorted(result.items()))


def text_files(files: Mapping[str, bytes]) -> tuple[dict[str, str], dict[str, int]]:
    """Split a file set into UTF-8 text files (what a model may read) and the rest (path -> size)."""
    text: dict[str, str] = {}
    binary: dict[str, int] = {}
    for path, data in files.items():
        try:
            decoded = data.decode("utf-8")
        except UnicodeDecodeError:
            binary[path] = len(data)
            continue
        if "\x00" in decoded:
            binary[path] = len(data)
        else:
            text[path] = decoded
    return text, binary
