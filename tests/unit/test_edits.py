"""File changes (activities/edits.py): every path and size validated, a rejected change writes nothing."""

from __future__ import annotations

import pytest

from activities.edits import MAX_FILE_BYTES, EditMiss, apply_changes, replace_once, text_files
from activities.runners import Capability, RunnerTask, TemplateRunner, no_progress
from genloop.errors import ErrorKind, GenloopError


async def test_template_runner_output_is_valid_and_escaped():
    result = await TemplateRunner().run(
        RunnerTask(kind=Capability.NEW_APP, goal="<script>alert(1)</script>"), no_progress
    )
    files = {path: content.decode() for path, content in apply_changes({}, result.files).items()}
    assert set(files) == {"app.py", "Procfile", "README.md", ".env.example"}
    assert "<script>" not in files["app.py"] and "&lt;script&gt;" in files["app.py"]
    assert files["Procfile"].startswith("web: ")


async def test_template_runner_refuses_changes():
    task = RunnerTask(kind=Capability.CHANGE, goal="g", files={"app.py": "x"}, change="make it red")
    with pytest.raises(GenloopError) as info:
        await TemplateRunner().run(task, no_progress)
    assert info.value.kind is ErrorKind.INVALID_INPUT


@pytest.mark.parametrize(
    "path",
    ["../x", "a/../../x", "/etc/passwd", "~/x", "a\x00b", "a\\..\\b", "", ".", "a/..", "x" * 300],
)
def test_escaping_paths_rejected(path):
    with pytest.raises(GenloopError) as info:
        apply_changes({}, {path: "x"})
    assert info.value.kind is ErrorKind.BAD_GENERATED_FILES and not info.value.kind.transient
    with pytest.raises(GenloopError) as info:
        apply_changes({"a.py": b"x"}, {}, [path], kind=ErrorKind.INVALID_INPUT)
    assert info.value.kind is ErrorKind.INVALID_INPUT


def test_oversize_empty_and_contradictory_changes_rejected():
    with pytest.raises(GenloopError, match="limit"):
        apply_changes({}, {"big": "x" * (MAX_FILE_BYTES + 1)})
    with pytest.raises(GenloopError, match="no files"):
        apply_changes({}, {})
    with pytest.raises(GenloopError, match="no files"):
        apply_changes({"a.py": b"x"}, {}, ["a.py"])
    with pytest.raises(GenloopError, match="both written and deleted"):
        apply_changes({"a.py": b"x"}, {"a.py": "y", "b.py": "z"}, ["a.py"])
    with pytest.raises(GenloopError, match="no such file"):
        apply_changes({"a.py": b"x"}, {}, ["b.py"], strict_deletes=True)


def test_changes_apply_on_the_base_without_touching_it():
    base = {"a.py": b"1", "b.py": b"2", "c/d.txt": b"3"}
    out = apply_changes(base, {"a.py": "one", "./e.py": "5"}, ["b.py", "missing.py"])
    assert out == {"a.py": b"one", "c/d.txt": b"3", "e.py": b"5"}
    assert base == {"a.py": b"1", "b.py": b"2", "c/d.txt": b"3"}


def test_replace_once_needs_exactly_one_match():
    assert replace_once("a = 1\nb = 2\n", "b = 2", "b = 3", "x.py") == "a = 1\nb = 3\n"
    with pytest.raises(EditMiss, match="does not occur"):
        replace_once("a", "zzz", "y", "x.py")
    with pytest.raises(EditMiss, match="occurs 2 times"):
        replace_once("aa", "a", "y", "x.py")


def test_text_files_split_binary_out():
    text, binary = text_files({"a.py": b"print(1)", "logo.png": b"\x89PNG\x00\xff", "z": b"a\x00b"})
    assert text == {"a.py": "print(1)"} and binary == {"logo.png": 6, "z": 3}
