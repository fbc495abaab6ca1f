"""The workflow DTOs carry real annotations, not strings (see workflows/types/__init__.py): the
converter resolves a dataclass's hints for every value it decodes."""

from __future__ import annotations

import dataclasses
import inspect

import workflows.types.build
import workflows.types.preview
import workflows.types.project

MODULES = (workflows.types.build, workflows.types.preview, workflows.types.project)


def test_dto_fields_are_annotated_with_types_not_strings():
    checked = 0
    for module in MODULES:
        for _, cls in inspect.getmembers(module, dataclasses.is_dataclass):
            if cls.__module__ != module.__name__:
                continue
            for field in dataclasses.fields(cls):
                assert not isinstance(field.type, str), f"{cls.__name__}.{field.name}: {field.type!r}"
                checked += 1
    assert checked > 100  # every module was looked at
