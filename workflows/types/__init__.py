"""The workflow DTOs, one module per workflow (build, project, preview); everything is re-exported
here, so `from workflows.types import X` names any of them.

No `from __future__ import annotations` in these modules: the SDK's converter calls
typing.get_type_hints on a dataclass for every value it decodes (each file of a manifest too), and
string annotations make that evaluate every field anew (2.4x slower decoding). A class is defined
before the classes whose fields name it."""

from workflows.types.build import *  # noqa: F403
from workflows.types.preview import *  # noqa: F403
from workflows.types.project import *  # noqa: F403
