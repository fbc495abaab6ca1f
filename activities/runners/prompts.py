"""Every word the LLM runner says to a model: the system prompt, the task prompts, the tools and the
re-asks. Change them here and bump PROMPT_VERSION, so logs tell which prompts produced a build."""

from __future__ import annotations

from collections.abc import Mapping

from activities.runners.base import Capability, Failure, RunnerTask
from activities.runners.providers.base import ToolSpec

PROMPT_VERSION = "2"  # 1 was the interim JSON-in-text prompt

FILES_BUDGET_CHARS = 200_000  # file contents shown to the model per prompt; the rest is listed by path and size
FAILURE_TAIL_CHARS = 16_000  # the failing command's output shown to the model (the tail)
MISS_CONTEXT_CHARS = 20_000  # a file shown back after an edit that missed, when it is at most this long

_SKIPPED_DIRS = ("node_modules/", ".venv/", "venv/", "__pycache__/", ".git/")
_LOCK_FILES = frozenset({"package-lock.json", "yarn.lock", "pnpm-lock.yaml", "poetry.lock", "Pipfile.lock",
                         "uv.lock", "npm-shrinkwrap.json"})
_FIRST = ("Procfile", "requirements.txt", "package.json")  # shown first: they decide how the app starts

SYSTEM = """You are the code writer of genloop, a service that turns a description into a running web app.
You write small, complete, working apps and change them on request.

The app runs in a Linux sandbox where Python 3 and Node.js (with npm) are available:
- It must listen on 0.0.0.0 on the port in the PORT environment variable (default 8080 if unset).
- GET /health must answer 200 once the app is up; GET / serves the app itself.
- A file named `Procfile` at the project root has a `web:` line with the command that starts the app,
  run from the project root (for example `web: python3 app.py` or `web: node server.js`).
- Python dependencies go in requirements.txt (installed with pip into .venv, which is on PATH when the
  app starts); Node dependencies go in package.json (installed with `npm install`). Prefer the
  standard library: every dependency is a chance for the install to fail. No build step, no database
  server, no external services or API keys.

You change files only through the tools:
- write_files: create or replace whole files (full content, never a placeholder or an ellipsis), delete
  files, and say in `summary` what you did in one or two sentences.
- edit_file (when offered): replace one exact, unique piece of text in an existing file.
Paths are relative to the project root, with forward slashes, never absolute and never `..`.
Never write lock files, node_modules/, .venv/ or binary files. Put everything in one answer."""

_STACKS = {
    "python": (
        "Stack: python. Write the app in Python 3. Use the standard library (http.server, json, sqlite3, ...) "
        "unless a package is really needed; list packages in requirements.txt. Procfile: `web: python3 app.py`."
    ),
    "node": (
        "Stack: node. Write the app in Node.js (CommonJS or ES modules). Use Node's built-in modules (http, fs, "
        "...) unless a package is really needed; list packages in package.json `dependencies`. Procfile: "
        "`web: node server.js`."
    ),
}

USE_THE_TOOL = (
    "You answered without calling a tool, so nothing was written. Use the write_files tool now"
    " (or edit_file, when offered) to make the change."
)
ANSWER_TOO_LONG = (
    "Note: your previous answer was cut off at the output limit and discarded. Keep this answer shorter: "
    "fewer and smaller files, edit_file for small changes to existing files, no comments or docs beyond "
    "what is needed."
)
CALLS_FAILED = (
    "Some of your tool calls failed (see the results above); the others were applied. Send corrected "
    "calls for the failed ones only."
)
NOT_APPLIED = "Not applied: an earlier call in this answer failed. Send it again if it is still needed."

WRITE_FILES = ToolSpec(
    name="write_files",
    description=(
        "Create or replace whole files and delete files in the project. `content` is the complete new "
        "content of the file. `summary` says in one or two sentences what changed."
    ),
    parameters={
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "description": "relative to the project root"},
                        "content": {"type": "string", "description": "the complete file content"},
                    },
                    "required": ["path", "content"],
                },
            },
            "delete": {"type": "array", "items": {"type": "string"}, "description": "paths of files to delete"},
            "summary": {"type": "string"},
        },
        "required": ["files", "summary"],
    },
)

EDIT_FILE = ToolSpec(
    name="edit_file",
    description=(
        "Replace one piece of text in an existing file. `old` must occur exactly once in the current "
        "file, character for character (include a few surrounding lines to make it unique); it is "
        "replaced by `new`. Use write_files to create a file or to rewrite most of one."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "old": {"type": "string", "description": "exact text to replace; occurs exactly once"},
            "new": {"type": "string", "description": "the replacement text"},
        },
        "required": ["path", "old", "new"],
    },
)


def tools_for(kind: Capability) -> tuple[ToolSpec, ...]:
    return (WRITE_FILES,) if kind is Capability.NEW_APP else (WRITE_FILES, EDIT_FILE)


def tool_choice_for(kind: Capability) -> str:
    # A new app is one write_files call; a change or a fix may use either tool, but must use one.
    return WRITE_FILES.name if kind is Capability.NEW_APP else "required"


def task_prompt(task: RunnerTask) -> str:
    stack = _STACKS.get(task.stack, _STACKS["python"])
    if task.kind is Capability.NEW_APP:
        return (
            f"Write a new app.\n\nGoal:\n{task.goal.strip()}\n\n{stack}\n\n"
            "Call write_files once with every file of the app (including the Procfile and a short README.md)."
        )
    files = render_files(task.files, task.binary_files, hints=_hints(task))
    if task.kind is Capability.CHANGE:
        return (
            f"Change an existing app.\n\nThe app's goal:\n{task.goal.strip()}\n\n{stack}\n\n"
            f"Current files:\n{files}\n\nRequested change:\n{task.change.strip()}\n\n"
            "Make the change with edit_file for small edits and write_files for new or rewritten files and "
            "deletions. Keep the Procfile, $PORT and /health working. Send every edit in this one answer."
        )
    return (
        f"Fix a failing app.\n\nThe app's goal:\n{task.goal.strip()}\n\n{stack}\n\n"
        f"Current files:\n{files}\n\n{render_failure(task.failure)}\n\n"
        "Find the cause and fix it with the smallest change that works (edit_file for small edits, "
        "write_files for new or rewritten files). If a dependency cannot be installed, replace it (the "
        "standard library is preferred). If nothing in the files can fix it, call write_files with no files "
        "and explain why in the summary."
    )


def render_failure(failure: Failure | None) -> str:
    if failure is None:
        return "The app failed (no details were recorded)."
    output = failure.output[-FAILURE_TAIL_CHARS:]
    exit_code = "no exit code (it did not finish)" if failure.exit_code is None else f"exit code {failure.exit_code}"
    return (
        f"What failed: stage {failure.stage}, command `{failure.command}`, {exit_code}.\n"
        f"Output (last {len(output)} characters):\n<output>\n{output}\n</output>"
    )


def _hints(task: RunnerTask) -> str:
    return task.change if task.kind is Capability.CHANGE else (task.failure.output if task.failure else "")


def render_files(
    files: Mapping[str, str], binary_files: Mapping[str, int] | None = None, *, hints: str = "",
    budget: int = FILES_BUDGET_CHARS,
) -> str:
    """The current files for a prompt: full contents while they fit in `budget` characters (the start
    files first, then files the change or failure mentions, then the smallest), the rest by path and size.
    Lock files are listed, never shown; node_modules/ and .venv/ are left out."""

    def skipped(path: str) -> bool:
        return any(path.startswith(d) or f"/{d}" in path for d in _SKIPPED_DIRS)

    def rank(path: str) -> tuple[int, int, str]:
        first = path in _FIRST
        mentioned = bool(hints) and (path in hints or path.rsplit("/", 1)[-1] in hints)
        return (0 if first else 1 if mentioned else 2, len(files[path]), path)

    shown: list[str] = []
    listed: list[str] = []
    left_out = 0
    remaining = budget
    for path in sorted(files, key=rank):
        if skipped(path):
            left_out += 1
            continue
        content = files[path]
        size = len(content.encode("utf-8"))
        if path.rsplit("/", 1)[-1] in _LOCK_FILES:
            listed.append(f"- {path} ({size} bytes, lock file, not shown)")
        elif len(content) <= remaining:
            shown.append(f'<file path="{path}">\n{content}\n</file>')
            remaining -= len(content)
        else:
            listed.append(f"- {path} ({size} bytes, not shown: too large for this prompt)")
    for path, size in sorted((binary_files or {}).items()):
        if skipped(path):
            left_out += 1
        else:
            listed.append(f"- {path} ({size} bytes, binary)")
    parts = shown or ["(no text files)"]
    if listed:
        parts.append("Other files (content not shown):\n" + "\n".join(listed))
    if left_out:
        parts.append(f"({left_out} files under node_modules/, .venv/ and similar left out)")
    return "\n".join(parts)


def edit_miss(message: str, path: str, content: str | None) -> str:
    """The tool result for an edit whose old text did not match: the reason, and the file as it is now
    when it is short enough to copy from."""
    text = f"Not applied: {message}. Copy `old` exactly from the current file, or rewrite it with write_files."
    if content is not None and len(content) <= MISS_CONTEXT_CHARS:
        text += f'\nCurrent content of {path}:\n<file path="{path}">\n{content}\n</file>'
    return text
