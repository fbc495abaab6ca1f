"""The workflow DTOs, one module per workflow (build, project, preview); everything is re-exported
here, so `from workflows.types import X` names any of them."""

from workflows.types.build import *  # noqa: F403
from workflows.types.preview import *  # noqa: F403
from workflows.types.project import *  # noqa: F403
